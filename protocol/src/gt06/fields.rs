//! How a GT06 location is written out: the Redis entry fields of DESIGN.md, with the same
//! names as a Teltonika record where the meaning is the same, and GT06-only values in `io`
//! under the names documented in `docs/protocols.md`.

use std::fmt::Write as _;

use super::{Location, Status};

/// The value of the `protocol` field on GT06 entries.
pub const PROTOCOL: &str = "gt06";

/// Field names shared with Teltonika entries (`crate::AvlRecord::fields`), in entry order.
// NB: spelled here until the Redis layout has its one home (issue 9 moves the Teltonika names
// to api's redis_layout); `shares_the_teltonika_field_names` guards that they stay the same.
pub const FIELDS: [&str; 8] = [
    "protocol", "ts", "lat", "lon", "angle", "sats", "speed", "io",
];

impl Location {
    /// The Redis entry fields that come from the location, in this order:
    /// `protocol, ts, lat, lon, angle, sats, speed, io`.
    ///
    /// `ts` is device time in ms (UTC, as read with the pool's [`super::UtcOffset`]); `lat` and
    /// `lon` are signed decimal degrees with exactly 7 decimals, rounded to nearest from the
    /// wire's 1/1,800,000° (the error is under 0.5 × 10^-7°, about 5 mm); `angle` is the course
    /// in degrees; `speed` km/h. GT06 has no altitude, priority or event id, so `alt`,
    /// `priority` and `event` are absent. `io` is a JSON object: see [`Location::io_json`].
    pub fn fields(&self) -> [(&'static str, String); 8] {
        let g = &self.gps;
        [
            (FIELDS[0], PROTOCOL.to_owned()),
            (FIELDS[1], g.timestamp_ms.to_string()),
            (FIELDS[2], degrees(g.latitude_e7())),
            (FIELDS[3], degrees(g.longitude_e7())),
            (FIELDS[4], g.course().to_string()),
            (FIELDS[5], g.satellites().to_string()),
            (FIELDS[6], g.speed.to_string()),
            (FIELDS[7], self.io_json()),
        ]
    }

    /// The `io` field, keys in this order (absent when the packet has no such block):
    ///
    /// - `type`: the protocol number (18 for `0x12`, 22 for `0x16`, …);
    /// - `fix`: 1 when the position is a GPS fix, 0 when it is the last known one;
    /// - `acc`: ignition 0/1, when the course word carries it;
    /// - `mcc`, `mnc`, `lac`, `cell`: the serving cell;
    /// - `terminal_info`, `voltage`, `gsm`, `alarm`, `language`: the status block of alarms
    ///   (`alarm` is the alarm code, e.g. 1 SOS, 2 power cut, 6 overspeed);
    /// - `extra`: the raw bytes after the decoded layout, lowercase hex.
    ///
    /// Values are unsigned integers except `extra`.
    pub fn io_json(&self) -> String {
        let mut io = Io::default();
        io.num("type", self.protocol.into());
        io.num("fix", self.gps.is_positioned().into());
        if let Some(acc) = self.gps.acc() {
            io.num("acc", acc.into());
        }
        if let Some(l) = &self.lbs {
            io.num("mcc", l.country().into());
            io.num("mnc", l.mnc.into());
            io.num("lac", l.lac.into());
            io.num("cell", l.cell_id);
        }
        if let Some(s) = &self.status {
            status_io(&mut io, s, self.protocol);
        }
        if !self.extra.is_empty() {
            io.hex("extra", &self.extra);
        }
        io.finish()
    }

    /// A deterministic 64-bit hash of the packet type and every decoded value (FNV-1a, no
    /// per-process seed): the dedup key for a location the device sends again.
    pub fn fingerprint(&self) -> u64 {
        let g = &self.gps;
        let mut h = Fnv::new();
        h.write(&[self.protocol, g.info, g.speed]);
        h.write(&g.timestamp_ms.to_be_bytes());
        h.write(&g.latitude.to_be_bytes());
        h.write(&g.longitude.to_be_bytes());
        h.write(&g.course_status.to_be_bytes());
        match &self.lbs {
            Some(l) => {
                h.write(&[1, l.length.unwrap_or(0), u8::from(l.length.is_some())]);
                h.write(&l.mcc.to_be_bytes());
                h.write(&l.mnc.to_be_bytes());
                h.write(&l.lac.to_be_bytes());
                h.write(&l.cell_id.to_be_bytes());
            }
            None => h.write(&[0]),
        }
        match &self.status {
            Some(s) => {
                h.write(&[1, s.terminal_info, s.gsm_signal]);
                h.write(&s.voltage.to_be_bytes());
                h.write(&s.alarm_language.to_be_bytes());
            }
            None => h.write(&[0]),
        }
        // Length-prefixed so that a byte cannot move between `extra` and another field.
        h.write(&(self.extra.len() as u64).to_be_bytes());
        h.write(&self.extra);
        h.finish()
    }
}

fn status_io(io: &mut Io, s: &Status, protocol: u8) {
    io.num("terminal_info", s.terminal_info.into());
    io.num("voltage", s.voltage.into());
    io.num("gsm", s.gsm_signal.into());
    if let Some(alarm) = s.alarm(protocol) {
        io.num("alarm", alarm.into());
    }
    io.num("language", u64::from(s.alarm_language & 0xFF));
}

/// A JSON object writer for names that need no escaping.
#[derive(Default)]
struct Io(String);

impl Io {
    fn key(&mut self, k: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        // Writing to a String cannot fail.
        let _ = write!(self.0, "\"{k}\":");
    }
    fn num(&mut self, k: &str, v: u64) {
        self.key(k);
        let _ = write!(self.0, "{v}");
    }
    fn hex(&mut self, k: &str, bytes: &[u8]) {
        self.key(k);
        self.0.push('"');
        for b in bytes {
            let _ = write!(self.0, "{b:02x}");
        }
        self.0.push('"');
    }
    fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        self.0
    }
}

/// `value / 10^7` with exactly seven decimals, sign included (`-0.5000000`): the format of
/// Teltonika's `lat`/`lon`.
fn degrees(value: i32) -> String {
    let abs = value.unsigned_abs();
    let sign = if value < 0 { "-" } else { "" };
    format!("{sign}{}.{:07}", abs / 10_000_000, abs % 10_000_000)
}

/// FNV-1a, 64-bit, as the Teltonika fingerprint uses.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::gt06::{FrameDecoder, Packet, UtcOffset};
    use crate::test_util::hex;

    fn decode(h: &str) -> Location {
        let f = FrameDecoder::default()
            .decode(&mut BytesMut::from(&hex(h)[..]))
            .unwrap()
            .unwrap();
        match Packet::decode(&f, UtcOffset::UTC).unwrap() {
            Packet::Location(l) | Packet::Alarm(l) => l,
            other => panic!("{other:?}"),
        }
    }

    /// traccar vector 97 (values derived by hand in `gt06::tests::location_0x12_by_hand`).
    #[test]
    fn location_fields() {
        let l = decode(
            "787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a",
        );
        let f = l.fields();
        let got: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("protocol", "gt06"),
                ("ts", "1440700195000"),
                ("lat", "16.6347089"),
                ("lon", "80.9670756"),
                ("angle", "258"),
                ("sats", "11"),
                ("speed", "32"),
                (
                    "io",
                    r#"{"type":18,"fix":1,"acc":1,"mcc":404,"mnc":7,"lac":470,"cell":41241,"extra":"0041ee10"}"#
                ),
            ]
        );
    }

    /// traccar vector 119: an alarm carries its status block in `io`.
    #[test]
    fn alarm_io() {
        let l = decode(
            "787825161a011c141001cf00bc62e0043533a231113808028005006800124b470603300204baa49a0d0a",
        );
        assert_eq!(
            l.io_json(),
            r#"{"type":22,"fix":1,"mcc":640,"mnc":5,"lac":104,"cell":4683,"terminal_info":71,"voltage":6,"gsm":3,"alarm":48,"language":2}"#
        );
    }

    #[test]
    fn south_west_and_fingerprint() {
        let mut l = decode(
            "787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a",
        );
        l.gps.course_status = (l.gps.course_status & !0x0400) | 0x0800;
        assert_eq!(
            (l.fields()[2].1.as_str(), l.fields()[3].1.as_str()),
            ("-16.6347089", "-80.9670756")
        );
        let a = l.fingerprint();
        let mut b = l.clone();
        b.extra = Bytes::from_static(&[0x00, 0x41, 0xEE]);
        assert_ne!(a, b.fingerprint());
        let mut c = l.clone();
        c.gps.timestamp_ms += 1000;
        assert_ne!(a, c.fingerprint());
        assert_eq!(a, l.clone().fingerprint());
        assert_eq!(degrees(0), "0.0000000");
    }
}
