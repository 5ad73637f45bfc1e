//! How a record is written out: the Redis entry fields of DESIGN.md and a stable fingerprint.

use std::fmt::Write as _;

use crate::{AvlRecord, IoValue};

impl AvlRecord {
    /// The Redis entry fields that come from the record, in this order:
    /// `ts, lat, lon, alt, angle, sats, speed, priority, event, io`.
    ///
    /// `lat`/`lon` are the wire integer / 10^7 with exactly 7 decimals (`54.6872345`,
    /// `-3.1000000`), so no float rounding ever changes a stored coordinate. `io` is a JSON
    /// object in wire order: IO id as a string → unsigned integer, or a lowercase hex string
    /// for variable-length values. (The listener adds `imei`, `codec`, `port` and `recv`.)
    pub fn fields(&self) -> [(&'static str, String); 10] {
        [
            ("ts", self.timestamp_ms.to_string()),
            ("lat", degrees(self.latitude)),
            ("lon", degrees(self.longitude)),
            ("alt", self.altitude.to_string()),
            ("angle", self.angle.to_string()),
            ("sats", self.satellites.to_string()),
            ("speed", self.speed.to_string()),
            ("priority", self.priority.to_string()),
            ("event", self.event_id.to_string()),
            ("io", self.io_json()),
        ]
    }

    /// The `io` field: `{"239":1,"256":"575657"}`.
    pub fn io_json(&self) -> String {
        let mut out = String::with_capacity(2 + self.io.len() * 12);
        out.push('{');
        for (i, e) in self.io.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Writing to a String cannot fail.
            let _ = write!(out, "\"{}\":", e.id);
            match &e.value {
                IoValue::Var(bytes) => {
                    out.push('"');
                    for b in bytes {
                        let _ = write!(out, "{b:02x}");
                    }
                    out.push('"');
                }
                fixed => {
                    let _ = write!(out, "{}", fixed.as_u64().unwrap_or_default());
                }
            }
        }
        out.push('}');
        out
    }

    /// A deterministic 64-bit hash of every field (FNV-1a; no per-process random seed), the
    /// same for the same record whichever frame or codec carried it: the dedup key for
    /// records a device resends after a lost ack.
    pub fn fingerprint(&self) -> u64 {
        let mut h = Fnv::new();
        h.write(&self.timestamp_ms.to_be_bytes());
        h.write(&[self.priority]);
        h.write(&self.longitude.to_be_bytes());
        h.write(&self.latitude.to_be_bytes());
        h.write(&self.altitude.to_be_bytes());
        h.write(&self.angle.to_be_bytes());
        h.write(&[self.satellites]);
        h.write(&self.speed.to_be_bytes());
        h.write(&self.event_id.to_be_bytes());
        match self.generation_type {
            Some(g) => h.write(&[1, g]),
            None => h.write(&[0]),
        }
        h.write(&(self.io.len() as u64).to_be_bytes());
        for e in &self.io {
            h.write(&e.id.to_be_bytes());
            // The width is hashed so that U8(1) and U16(1) differ, and Var values are
            // length-prefixed so that adjacent values cannot run together.
            h.write(&(e.value.width() as u64).to_be_bytes());
            match &e.value {
                IoValue::Var(b) => {
                    h.write(&[4]);
                    h.write(b);
                }
                fixed => {
                    h.write(&[0]);
                    h.write(&fixed.as_u64().unwrap_or_default().to_be_bytes());
                }
            }
        }
        h.finish()
    }
}

/// `value / 10^7` with exactly seven decimals, sign included (`-0.5000000`).
fn degrees(value: i32) -> String {
    let v = i64::from(value);
    let sign = if v < 0 { "-" } else { "" };
    let abs = v.unsigned_abs();
    format!("{sign}{}.{:07}", abs / 10_000_000, abs % 10_000_000)
}

/// FNV-1a, 64-bit: tiny, fast on short inputs, and stable across processes and versions.
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Fnv(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::IoElement;

    fn rec() -> AvlRecord {
        AvlRecord {
            timestamp_ms: 1_560_161_086_000,
            priority: 1,
            longitude: -31_000_000,
            latitude: 546_872_345,
            altitude: 120,
            angle: 90,
            satellites: 7,
            speed: 42,
            event_id: 239,
            generation_type: None,
            io: vec![
                IoElement {
                    id: 239,
                    value: IoValue::U8(1),
                },
                IoElement {
                    id: 72,
                    value: IoValue::U32(4_294_967_294),
                },
                IoElement {
                    id: 256,
                    value: IoValue::Var(Bytes::from_static(&[0x57, 0x0a])),
                },
            ],
        }
    }

    #[test]
    fn fields_follow_the_redis_contract() {
        let f = rec().fields();
        let names: Vec<_> = f.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "ts", "lat", "lon", "alt", "angle", "sats", "speed", "priority", "event", "io"
            ]
        );
        assert_eq!(f[0].1, "1560161086000");
        assert_eq!(f[1].1, "54.6872345");
        assert_eq!(f[2].1, "-3.1000000");
        assert_eq!(f[9].1, r#"{"239":1,"72":4294967294,"256":"570a"}"#);
    }

    #[test]
    fn degrees_edges() {
        assert_eq!(degrees(0), "0.0000000");
        assert_eq!(degrees(-5_000_000), "-0.5000000");
        assert_eq!(degrees(1_800_000_000), "180.0000000");
        assert_eq!(degrees(i32::MIN), "-214.7483648");
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = rec();
        // Pinned: a change here would break dedup against records already stored.
        assert_eq!(a.fingerprint(), 0x0545_1be8_7c41_fa7e);
        let mut b = a.clone();
        b.io[0].value = IoValue::U16(1);
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.timestamp_ms += 1;
        assert_ne!(a.fingerprint(), c.fingerprint());
        let mut d = a.clone();
        d.generation_type = Some(0);
        assert_ne!(a.fingerprint(), d.fingerprint());
    }
}
