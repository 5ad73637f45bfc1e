//! Deterministic GPS tracks and IO values: the same seed and device index always give the same
//! sequence of records, so a run can be repeated and a failing test replayed.

use bytes::Bytes;
use trackgate_protocol::{AvlRecord, Codec, IoElement, IoValue};

/// A small, fast, seedable generator (SplitMix64). Not for cryptography; chosen because it
/// needs no dependency and its output is fixed forever for a given seed, unlike `RandomState`.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for this seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// Metres per degree of latitude (and of longitude at the equator).
const METRES_PER_DEGREE: f64 = 111_320.0;

/// Teltonika IO ids the simulator reports, with the meaning the FMB firmware gives them.
mod io_id {
    pub const GSM_SIGNAL: u16 = 21;
    pub const SPEED: u16 = 24;
    pub const EXTERNAL_VOLTAGE: u16 = 66;
    pub const BATTERY_VOLTAGE: u16 = 67;
    pub const TOTAL_ODOMETER: u16 = 16;
    pub const IBUTTON: u16 = 78;
    pub const IGNITION: u16 = 239;
    pub const MOVEMENT: u16 = 240;
    /// Codec 8E only: the vehicle's VIN as a variable-length value.
    pub const VIN: u16 = 256;
}

/// One simulated vehicle's movement and sensor state.
///
/// Each call to [`Track::next_record`] advances the vehicle by one logging period (one second
/// of device time) and returns the record a device would log: a position that moves
/// continuously, sometimes a lost fix (satellites 0, speed and angle 0, last position kept),
/// ignition changes as events, and a handful of IO values of every width.
#[derive(Debug, Clone)]
pub struct Track {
    rng: SplitMix64,
    /// Degrees; may be negative (south, west).
    lat: f64,
    lon: f64,
    altitude: f64,
    heading: f64,
    speed_kmh: f64,
    ignition: bool,
    odometer_m: f64,
    next_ts_ms: u64,
    vin: Bytes,
}

/// Milliseconds of device time between two records of one device.
pub const LOG_PERIOD_MS: u64 = 1_000;

impl Track {
    /// The track of device `index` for `seed`, whose first record is stamped `start_ms` (device
    /// time, ms since the epoch). Starting points cover the whole globe between 60°S and 70°N,
    /// so negative latitudes and longitudes are common.
    pub fn new(seed: u64, index: u64, start_ms: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
        let lat = rng.range_f64(-60.0, 70.0);
        let lon = rng.range_f64(-180.0, 180.0);
        let altitude = rng.range_f64(-20.0, 800.0);
        let heading = rng.range_f64(0.0, 360.0);
        let vin = format!("WVWZZZ1KZ{:08}", rng.below(100_000_000));
        Self {
            rng,
            lat,
            lon,
            altitude,
            heading,
            speed_kmh: 0.0,
            ignition: true,
            odometer_m: 0.0,
            next_ts_ms: start_ms,
            vin: Bytes::from(vin.into_bytes()),
        }
    }

    /// The next record, shaped for `codec` (IO ids above 255 and variable-length values only
    /// where the codec can carry them; a generation type for Codec 16).
    pub fn next_record(&mut self, codec: Codec) -> AvlRecord {
        let timestamp_ms = self.next_ts_ms;
        self.next_ts_ms += LOG_PERIOD_MS;

        let mut event_id = 0;
        if self.rng.below(200) == 0 {
            self.ignition = !self.ignition;
            event_id = io_id::IGNITION;
        }
        let target = if self.ignition {
            self.rng.range_f64(0.0, 120.0)
        } else {
            0.0
        };
        // Speed follows its target slowly, as a vehicle does, rather than jumping.
        self.speed_kmh += (target - self.speed_kmh) * 0.1;
        self.heading = (self.heading + self.rng.range_f64(-15.0, 15.0)).rem_euclid(360.0);
        let metres = self.speed_kmh / 3.6 * (LOG_PERIOD_MS as f64 / 1000.0);
        self.odometer_m += metres;
        let (sin, cos) = self.heading.to_radians().sin_cos();
        self.lat = (self.lat + cos * metres / METRES_PER_DEGREE).clamp(-89.0, 89.0);
        let lon_scale = METRES_PER_DEGREE * self.lat.to_radians().cos().max(0.01);
        self.lon = wrap_longitude(self.lon + sin * metres / lon_scale);
        self.altitude = (self.altitude + self.rng.range_f64(-1.0, 1.0)).clamp(-100.0, 3000.0);

        let has_fix = self.rng.below(50) != 0;
        let (satellites, speed, angle) = if has_fix {
            (
                4 + self.rng.below(11) as u8,
                self.speed_kmh.round() as u16,
                self.heading.round() as u16 % 360,
            )
        } else {
            // A record without a fix keeps the last position with angle, satellites and speed 0.
            (0, 0, 0)
        };

        let mut io = vec![
            IoElement {
                id: io_id::IGNITION,
                value: IoValue::U8(u8::from(self.ignition)),
            },
            IoElement {
                id: io_id::MOVEMENT,
                value: IoValue::U8(u8::from(self.speed_kmh > 3.0)),
            },
            IoElement {
                id: io_id::GSM_SIGNAL,
                value: IoValue::U8(1 + self.rng.below(5) as u8),
            },
            IoElement {
                id: io_id::SPEED,
                value: IoValue::U16(speed),
            },
            IoElement {
                id: io_id::EXTERNAL_VOLTAGE,
                value: IoValue::U16(12_000 + self.rng.below(2_500) as u16),
            },
            IoElement {
                id: io_id::BATTERY_VOLTAGE,
                value: IoValue::U16(3_900 + self.rng.below(300) as u16),
            },
            IoElement {
                id: io_id::TOTAL_ODOMETER,
                value: IoValue::U32(self.odometer_m as u32),
            },
            IoElement {
                id: io_id::IBUTTON,
                value: IoValue::U64(self.rng.next_u64()),
            },
        ];
        if codec == Codec::Codec8Ext {
            io.push(IoElement {
                id: io_id::VIN,
                value: IoValue::Var(self.vin.clone()),
            });
        }

        AvlRecord {
            timestamp_ms,
            priority: u8::from(event_id != 0),
            longitude: to_fixed(self.lon),
            latitude: to_fixed(self.lat),
            altitude: self.altitude.round() as i16,
            angle,
            satellites,
            speed,
            event_id,
            // Codec 16 carries a generation type: 5 "on change" for events, 7 "periodical".
            generation_type: (codec == Codec::Codec16).then_some(if event_id != 0 { 5 } else { 7 }),
            io,
        }
    }
}

fn wrap_longitude(lon: f64) -> f64 {
    (lon + 180.0).rem_euclid(360.0) - 180.0
}

/// Degrees to the wire's degrees × 10^7.
fn to_fixed(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_index_give_the_same_track() {
        let mut a = Track::new(7, 3, 1_700_000_000_000);
        let mut b = Track::new(7, 3, 1_700_000_000_000);
        for _ in 0..100 {
            assert_eq!(a.next_record(Codec::Codec8), b.next_record(Codec::Codec8));
        }
        let mut c = Track::new(7, 4, 1_700_000_000_000);
        assert_ne!(
            Track::new(7, 3, 1_700_000_000_000).next_record(Codec::Codec8),
            c.next_record(Codec::Codec8)
        );
    }

    #[test]
    fn timestamps_advance_by_the_log_period() {
        let mut t = Track::new(1, 0, 1_000);
        let stamps: Vec<u64> = (0..3)
            .map(|_| t.next_record(Codec::Codec16).timestamp_ms)
            .collect();
        assert_eq!(stamps, vec![1_000, 2_000, 3_000]);
    }

    #[test]
    fn tracks_move_continuously_and_cover_both_hemispheres() {
        let (mut south, mut west) = (false, false);
        for index in 0..64 {
            let mut t = Track::new(42, index, 0);
            let mut prev = t.next_record(Codec::Codec8);
            for _ in 0..300 {
                let rec = t.next_record(Codec::Codec8);
                // At most 120 km/h for one second is ~33 m, i.e. ~3,000 units of 10^-7
                // degree of latitude.
                let dlat = (rec.latitude - prev.latitude).abs();
                assert!(dlat <= 3_000, "latitude jumped by {dlat}");
                assert!(rec.satellites == 0 || rec.satellites >= 4);
                if rec.satellites == 0 {
                    assert_eq!((rec.speed, rec.angle), (0, 0));
                }
                assert!(rec.angle < 360);
                prev = rec;
            }
            south |= prev.latitude < 0;
            west |= prev.longitude < 0;
        }
        assert!(
            south && west,
            "expected negative coordinates among 64 devices"
        );
    }

    #[test]
    fn io_fits_the_codec() {
        let mut t = Track::new(5, 0, 0);
        let c8 = t.next_record(Codec::Codec8);
        assert!(
            c8.io
                .iter()
                .all(|e| e.id <= 255 && e.value.as_u64().is_some())
        );
        assert_eq!(c8.generation_type, None);
        let c8e = t.next_record(Codec::Codec8Ext);
        assert!(c8e.io.iter().any(|e| matches!(e.value, IoValue::Var(_))));
        let c16 = t.next_record(Codec::Codec16);
        assert!(matches!(c16.generation_type, Some(5 | 7)));
        assert!(c16.io.iter().all(|e| e.value.as_u64().is_some()));
    }
}
