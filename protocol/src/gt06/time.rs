//! The 6-byte GT06 date (`YY MM DD hh mm ss`, years from 2000) and the UTC offset it is read
//! with: GT06 devices send their local time or UTC depending on the model and its settings,
//! and the wire does not say which, so the caller states it ([`UtcOffset`]).

use super::Gt06EncodeError;

/// The offset of a device's clock from UTC: the wire time is `UTC + offset`.
///
/// [`UtcOffset::UTC`] (the default) is for devices that send UTC, which is what Concox
/// firmware does unless told otherwise; a pool of devices set to local time states its offset
/// (e.g. `UtcOffset::from_minutes(480)` for UTC+8). The login's time-zone word, when a device
/// sends one, is available as [`crate::gt06::Login::utc_offset`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct UtcOffset {
    minutes: i16,
}

impl UtcOffset {
    /// The wire time is UTC.
    pub const UTC: UtcOffset = UtcOffset { minutes: 0 };
    /// Largest offset on Earth (UTC+14, Kiribati), either way.
    pub const MAX_MINUTES: i16 = 14 * 60;

    /// The offset `minutes` east of UTC (negative is west); `None` beyond ±14 h.
    pub fn from_minutes(minutes: i16) -> Option<UtcOffset> {
        (minutes.unsigned_abs() <= Self::MAX_MINUTES.unsigned_abs())
            .then_some(UtcOffset { minutes })
    }

    /// Minutes east of UTC.
    pub fn minutes(self) -> i16 {
        self.minutes
    }

    fn seconds(self) -> i64 {
        i64::from(self.minutes) * 60
    }
}

/// Wire date → ms since the epoch (UTC); `None` for a date that does not exist (month 13,
/// 31 February, hour 24, …), which marks the content as some other layout.
pub(super) fn decode_time(b: [u8; 6], offset: UtcOffset) -> Option<u64> {
    let [yy, mo, d, h, mi, s] = b;
    let year = 2000 + i64::from(yy);
    if !(1..=12).contains(&mo)
        || d == 0
        || d > days_in_month(year, mo)
        || h > 23
        || mi > 59
        || s > 59
    {
        return None;
    }
    let local = days_from_civil(year, mo, d) * 86_400
        + i64::from(h) * 3600
        + i64::from(mi) * 60
        + i64::from(s);
    let utc = local - offset.seconds();
    u64::try_from(utc).ok().map(|s| s * 1000)
}

/// ms since the epoch → wire date in the device's clock.
///
/// # Errors
/// A time that is not whole seconds or falls outside 2000-2255 in the device's clock.
pub(super) fn encode_time(
    timestamp_ms: u64,
    offset: UtcOffset,
) -> Result<[u8; 6], Gt06EncodeError> {
    let bad = Gt06EncodeError::Time { timestamp_ms };
    if !timestamp_ms.is_multiple_of(1000) {
        return Err(bad);
    }
    let local = i64::try_from(timestamp_ms / 1000).map_err(|_| bad.clone())? + offset.seconds();
    let (days, secs) = (local.div_euclid(86_400), local.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let yy = u8::try_from(year - 2000).map_err(|_| bad)?;
    // Each value is below 60, so the casts are exact.
    Ok([
        yy,
        month,
        day,
        (secs / 3600) as u8,
        (secs % 3600 / 60) as u8,
        (secs % 60) as u8,
    ])
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u8) -> u8 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_and_offsets() {
        // 2015-08-27 18:29:55 (row 97 of the traccar vectors).
        let wire = [0x0F, 0x08, 0x1B, 0x12, 0x1D, 0x37];
        assert_eq!(decode_time(wire, UtcOffset::UTC), Some(1_440_700_195_000));
        let plus8 = UtcOffset::from_minutes(480).unwrap();
        assert_eq!(
            decode_time(wire, plus8),
            Some(1_440_700_195_000 - 8 * 3_600_000)
        );
        assert_eq!(
            encode_time(1_440_700_195_000 - 8 * 3_600_000, plus8),
            Ok(wire)
        );
        assert_eq!(UtcOffset::from_minutes(841), None);
        assert_eq!(
            UtcOffset::from_minutes(-840).map(UtcOffset::minutes),
            Some(-840)
        );
    }

    #[test]
    fn impossible_dates_are_none() {
        for wire in [
            [0, 0, 1, 0, 0, 0],
            [0, 13, 1, 0, 0, 0],
            [1, 2, 29, 0, 0, 0], // 2001 is not a leap year
            [0, 4, 31, 0, 0, 0],
            [0, 1, 1, 24, 0, 0],
            [0, 1, 1, 0, 60, 0],
            [0, 1, 1, 0, 0, 60],
        ] {
            assert_eq!(decode_time(wire, UtcOffset::UTC), None, "{wire:?}");
        }
        assert!(decode_time([0, 2, 29, 0, 0, 0], UtcOffset::UTC).is_some());
    }

    #[test]
    fn encode_refuses_what_the_field_cannot_hold() {
        assert!(encode_time(1_440_700_195_001, UtcOffset::UTC).is_err());
        assert!(encode_time(0, UtcOffset::UTC).is_err()); // 1970
        assert!(encode_time(946_684_800_000, UtcOffset::UTC).is_ok()); // 2000-01-01
    }

    /// Every day from 2000 to 2255 survives the round trip through the civil-date helpers.
    #[test]
    fn civil_round_trip() {
        let start = days_from_civil(2000, 1, 1);
        let end = days_from_civil(2255, 12, 31);
        for z in start..=end {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
            assert!(d <= days_in_month(y, m));
        }
    }
}
