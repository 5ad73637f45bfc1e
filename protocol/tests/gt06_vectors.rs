//! GT06 golden vectors: every row of `tests/vectors/gt06/traccar_gt06_vectors.jsonl` (see
//! its `SOURCE.md`: 125 packets from traccar's `Gt06ProtocolDecoderTest`).
//!
//! - `strict: accept` rows split into exactly one frame that re-encodes byte-exact, and decode
//!   to a packet whose content re-encodes byte-exact; which packet each protocol number decodes
//!   to is pinned below ([`expected_kind`]), so a row that silently falls back to `Raw` fails.
//! - Location rows that traccar checks with `verifyPosition` decode to a position that passes
//!   the same sanity checks (time after 1999 and not in the future of the capture, coordinates
//!   in range), except the model-specific layouts this codec keeps raw (listed in
//!   [`RAW_POSITION_TYPES`]). Hand-derived values are asserted for a few rows, and traccar's
//!   attribute assertions where the value is a field of the layout.
//! - Every other row is rejected with the reason its bytes call for ([`expected_rejection`]),
//!   computed from the bytes here independently of the decoder.
//! - Login and heartbeat replies are byte-exact against values computed outside this crate.

use std::collections::BTreeMap;

use bytes::BytesMut;
use serde_json::Value;
use trackgate_protocol::Limits;
use trackgate_protocol::gt06::{
    Frame, FrameDecoder, Gt06Error, Location, Packet, UtcOffset, encode_frame, needs_reply,
    reply_to,
};

struct Row {
    line: usize,
    v: Value,
}

impl Row {
    fn hex(&self) -> Vec<u8> {
        hex(self.v["hex"].as_str().unwrap())
    }
    fn str(&self, key: &str) -> &str {
        self.v[key].as_str().unwrap()
    }
    fn name(&self) -> String {
        format!(
            "traccar_gt06_vectors.jsonl:{} ({})",
            self.line,
            self.str("source")
        )
    }
}

fn rows() -> Vec<Row> {
    include_str!("vectors/gt06/traccar_gt06_vectors.jsonl")
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Row {
            line: i + 1,
            v: serde_json::from_str(l).unwrap(),
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A whole capture through a fresh decoder, as a connection that then closes.
fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, Gt06Error> {
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = dec.decode_eof(&mut buf)? {
        out.push(f);
    }
    Ok(out)
}

/// The reason a non-accepted row must fail with, from its bytes alone: a length field below 5
/// fails on the head; a frame longer than the capture is a half frame at EOF; otherwise the
/// bytes where the length puts the stop bits decide between `stop_bits` and `crc`, or, when
/// the stop bits are there and more bytes follow, `None`: the capture is several frames back
/// to back (row 102, three `0xFD` frames that SOURCE.md counts as one of the wrong length).
fn expected_rejection(bytes: &[u8]) -> Option<&'static str> {
    let extended = bytes[0] == 0x79;
    let (len, head) = if extended {
        (usize::from(u16::from_be_bytes([bytes[2], bytes[3]])), 4)
    } else {
        (usize::from(bytes[2]), 3)
    };
    let total = head + len + 2;
    Some(if len < 5 {
        "bad_length"
    } else if total > bytes.len() {
        "incomplete"
    } else if bytes[total - 2..total] != [0x0D, 0x0A] {
        "stop_bits"
    } else if total < bytes.len() {
        return None;
    } else {
        "crc"
    })
}

/// What each protocol number of an accepted row decodes to.
fn expected_kind(protocol: u8, content_len: usize) -> &'static str {
    match protocol {
        0x01 => "login",
        0x13 => "heartbeat",
        // Row 1 is an empty 0x12; row 120 is a 0x12 variant with the IMEI before the GPS.
        0x12 if content_len < 26 || content_len == 34 => "raw",
        0x12 | 0x22 if content_len == 55 => "raw", // row 118: IMEI-prefixed 0x22 variant
        0x10 | 0x12 | 0x22 | 0xA0 => "location",
        // Row 22: a 31-byte 0x16 without the standard LBS/status blocks.
        0x16 if content_len < 32 => "raw",
        0x16 | 0x26 | 0x27 => "alarm",
        0x94 => "info",
        _ => "raw",
    }
}

/// Types traccar reads a position from that this codec keeps raw: model-specific layouts
/// (JI09 0x1E, X1 0x34, 0x38, modular 0x70, GK310 Wi-Fi 0xA2) and the IMEI-prefixed 0x12.
const RAW_POSITION_TYPES: [u8; 6] = [0x1E, 0x34, 0x38, 0x70, 0xA2, 0x12];

/// The capture year is 20YY; traccar's "not in the future" bound is the test run, ours the
/// vectors' newest date (2026).
fn check_position(name: &str, l: &Location) {
    let ts = l.gps.timestamp_ms;
    assert!(ts >= 946_684_800_000, "{name}: ts {ts} before 2000");
    assert!(ts < 1_830_297_600_000, "{name}: ts {ts} after 2027");
    assert!(l.gps.latitude_e7().abs() <= 900_000_000, "{name}");
    assert!(l.gps.longitude_e7().abs() <= 1_800_000_000, "{name}");
    assert!(l.gps.course() < 360, "{name}: course {}", l.gps.course());
}

#[derive(Default, Debug)]
struct Tally(BTreeMap<&'static str, usize>);

impl Tally {
    fn add(&mut self, what: &'static str) {
        *self.0.entry(what).or_default() += 1;
    }
}

#[test]
fn every_vector_row() {
    let rows = rows();
    let mut tally = Tally::default();
    for row in &rows {
        let name = row.name();
        let bytes = row.hex();
        if row.str("strict") != "accept" {
            let Some(want) = expected_rejection(&bytes) else {
                assert_eq!(row.str("strict"), "bad_length", "{name}");
                let frames = decode_all(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(frames.len() > 1, "{name}");
                tally.add("concatenated");
                continue;
            };
            if row.str("strict") == "bad_crc" {
                assert_eq!(want, "crc", "{name}");
            }
            let err = decode_all(&bytes).expect_err(&name);
            assert_eq!(err.reason(), want, "{name}: {err}");
            tally.add(want);
            continue;
        }
        let frames = decode_all(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let [frame] = &frames[..] else {
            panic!("{name}: {} frames", frames.len())
        };
        let protocol = u8::from_str_radix(row.str("protocol_number"), 16).unwrap();
        assert_eq!(frame.protocol, protocol, "{name}");
        let mut again = BytesMut::new();
        encode_frame(frame, &mut again).unwrap();
        assert_eq!(&again[..], &bytes[..], "{name}: frame re-encoding");

        let packet =
            Packet::decode(frame, UtcOffset::UTC).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut content = BytesMut::new();
        packet.encode_content(UtcOffset::UTC, &mut content).unwrap();
        assert_eq!(
            &content[..],
            &frame.content[..],
            "{name}: content re-encoding"
        );
        let kind = match &packet {
            Packet::Login(_) => "login",
            Packet::Heartbeat(_) => "heartbeat",
            Packet::Location(_) => "location",
            Packet::Alarm(_) => "alarm",
            Packet::Info(_) => "info",
            Packet::Raw(_) => "raw",
            _ => "other",
        };
        assert_eq!(kind, expected_kind(protocol, frame.content.len()), "{name}");
        tally.add(kind);
        assert_eq!(reply_to(frame).is_some(), needs_reply(protocol), "{name}");

        if row.str("traccar_verify") == "verifyPosition" {
            match &packet {
                Packet::Location(l) | Packet::Alarm(l) => check_position(&name, l),
                Packet::Raw(r) => assert!(RAW_POSITION_TYPES.contains(&r.protocol), "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        check_traccar_attribute(&name, row, &packet);
        check_by_hand(row.line, &packet);
    }
    // Guards against rows silently skipped: SOURCE.md's counts.
    assert_eq!(rows.len(), 125);
    let t = &tally.0;
    let rejected = t["crc"] + t["stop_bits"] + t["bad_length"] + t["incomplete"];
    assert_eq!((rejected, t["concatenated"]), (19, 1), "{tally:?}");
    assert_eq!(
        (t["bad_length"], t["incomplete"], t["stop_bits"]),
        (6, 2, 2),
        "{tally:?}"
    );
    assert_eq!(t["crc"], 9, "{tally:?}");
    assert_eq!(
        (
            t["login"],
            t["heartbeat"],
            t["location"],
            t["alarm"],
            t["info"]
        ),
        (4, 7, 16, 10, 17),
        "{tally:?}"
    );
    assert_eq!(t["raw"], 105 - 4 - 7 - 16 - 10 - 17, "{tally:?}");
}

/// traccar's `verifyAttribute` checks where the value is a field of the decoded layout.
fn check_traccar_attribute(name: &str, row: &Row, packet: &Packet) {
    let args = row.str("traccar_args");
    match (packet, args) {
        // KEY_IGNITION false on 0xA0: the ACC byte after the LBS.
        (Packet::Location(l), "Position.KEY_IGNITION, false") if l.protocol == 0xA0 => {
            assert_eq!(l.extra.first(), Some(&0), "{name}");
        }
        (Packet::Alarm(l), "Position.KEY_ALARM, Position.ALARM_BRAKING") => {
            assert_eq!(l.status.unwrap().alarm(l.protocol), Some(0x30), "{name}");
        }
        (Packet::Alarm(l), "Position.KEY_EVENT, 0xEA") => {
            assert_eq!(l.status.unwrap().alarm(l.protocol), Some(0xEA), "{name}");
        }
        (Packet::Info(i), a) if a.starts_with("Position.KEY_ICCID") => {
            let want = a.split('"').nth(1).unwrap();
            assert_eq!(i.iccid().as_deref(), Some(want), "{name}");
        }
        _ => {}
    }
}

/// Values derived by hand from the layout (PROTOCOL.md §4 and the packet tables in
/// docs/protocols.md), independent of traccar's assertions.
fn check_by_hand(line: usize, packet: &Packet) {
    match (line, packet) {
        (2, Packet::Login(l)) => {
            assert_eq!(l.imei.as_str(), "864717003283581");
            assert_eq!((l.type_id, l.time_zone_language), (None, None));
        }
        (80, Packet::Login(l)) => {
            assert_eq!(l.imei.as_str(), "863586038760942");
            assert_eq!(
                (l.type_id, l.utc_offset()),
                (Some(0xA001), Some(UtcOffset::UTC))
            );
        }
        (94, Packet::Login(l)) => assert_eq!(l.imei.as_str(), "123456789012345"),
        // 2015-08-27 18:29:55 UTC, 16.6347089 N 80.9670756 E, 32 km/h, course 258.
        (97, Packet::Location(l)) => {
            assert_eq!(
                l.fields()[1..7]
                    .iter()
                    .map(|(_, v)| v.as_str())
                    .collect::<Vec<_>>(),
                [
                    "1440700195000",
                    "16.6347089",
                    "80.9670756",
                    "258",
                    "11",
                    "32"
                ]
            );
        }
        // 0xA0: 2021-04-16 07:53:14, 0x027AC8A2 = 41601186 → 23.1117700 N,
        // 0x0C4658BE = 205936830 → 114.4093500 E; MCC 460 (0x81CC, 2-byte MNC), LAC 0x287D.
        (121, Packet::Location(l)) => {
            assert_eq!(l.gps.timestamp_ms, 1_618_559_594_000);
            assert_eq!(
                (l.gps.latitude_e7(), l.gps.longitude_e7()),
                (231_117_700, 1_144_093_500)
            );
            let lbs = l.lbs.unwrap();
            assert_eq!(
                (lbs.country(), lbs.mnc, lbs.lac, lbs.cell_id),
                (460, 0, 0x287D, 0x02EA_5E01)
            );
            assert_eq!(&l.extra[..], &[0x00, 0x04, 0x00]);
        }
        // 0x13: terminal info 0x44, voltage level 6, GSM 4, alarm 0, language 2.
        (95, Packet::Heartbeat(h)) => {
            let s = h.status;
            assert_eq!(
                (s.terminal_info, s.voltage, s.gsm_signal, s.alarm_language),
                (0x44, 6, 4, 2)
            );
        }
        (2 | 80 | 94 | 97 | 121 | 95, other) => panic!("line {line}: {other:?}"),
        _ => {}
    }
}

/// The replies a device waits for, byte-exact. Expected bytes come from PROTOCOL.md §4 (login)
/// and a CRC-16/X-25 computed outside this crate (Python, bitwise) for the heartbeat.
#[test]
fn replies_are_byte_exact() {
    let rows = rows();
    let reply = |line: usize| {
        let f = &decode_all(&rows[line - 1].hex()).unwrap()[0];
        reply_to(f).map(|r| r.iter().map(|b| format!("{b:02x}")).collect::<String>())
    };
    assert_eq!(reply(2).as_deref(), Some("78780501000955940d0a"));
    assert_eq!(reply(95).as_deref(), Some("7878051301bafb710d0a"));
    assert_eq!(reply(97), None, "locations are not answered");
}

/// Every row, fed one byte at a time, gives the same frames or the same error as whole.
#[test]
fn byte_at_a_time_matches_whole() {
    for row in rows() {
        let bytes = row.hex();
        let whole = decode_all(&bytes);
        let mut dec = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut result = Ok(());
        for b in &bytes {
            buf.extend_from_slice(&[*b]);
            match dec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = dec.decode_eof(&mut buf).map(|f| frames.extend(f));
        }
        match whole {
            Ok(w) => assert_eq!((result, frames), (Ok(()), w), "{}", row.name()),
            Err(e) => assert_eq!(result.unwrap_err().reason(), e.reason(), "{}", row.name()),
        }
    }
}

/// All accepted rows back to back in one stream, as one connection would carry them.
#[test]
fn accepted_rows_as_one_stream() {
    let rows = rows();
    let accepted: Vec<_> = rows
        .iter()
        .filter(|r| r.str("strict") == "accept")
        .collect();
    let stream: Vec<u8> = accepted.iter().flat_map(|r| r.hex()).collect();
    let frames = decode_all(&stream).unwrap();
    assert_eq!(frames.len(), accepted.len());
}
