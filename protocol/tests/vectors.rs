//! Golden vectors: every row of `tests/vectors/*.jsonl` (see `tests/vectors/SOURCE.md`).
//!
//! - `strict: accept` rows decode to exactly the row's counts and its independently derived
//!   first/last record; Teltonika wiki rows also re-encode byte-exact and produce the
//!   documented server ack.
//! - Other rows are rejected with a specific reason (see [`expected_rejection`]).
//! - Two decisions, asserted here: the legacy GH3000 codec 7 is `unknown_codec`, and the two
//!   traccar frames that need its non-standard 16-byte "extended" IO group fail as
//!   `io_count` (without that group, the IO groups do not add up to the declared total).

use std::collections::BTreeMap;

use bytes::BytesMut;
use serde_json::Value;
use trackgate_protocol::{
    AvlRecord, Codec, Command, Frame, FrameDecoder, FrameError, Imei, IoValue, Limits,
    LoginDecoder, crc16_ibm, decode_udp, encode_ack, encode_avl, encode_command, encode_login,
    encode_udp, udp_ack,
};

struct Row {
    file: &'static str,
    line: usize,
    v: Value,
}

impl Row {
    fn name(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
    fn hex(&self) -> Vec<u8> {
        hex(self.v["hex"].as_str().unwrap())
    }
    fn derived(&self) -> &Value {
        &self.v["derived"]
    }
    fn is_wiki(&self) -> bool {
        self.file.starts_with("teltonika_wiki")
    }
    fn strict(&self) -> &str {
        self.v["strict"].as_str().unwrap()
    }
}

fn rows() -> Vec<Row> {
    let mut out = Vec::new();
    for (file, text) in [
        (
            "teltonika_wiki_vectors.jsonl",
            include_str!("vectors/teltonika_wiki_vectors.jsonl"),
        ),
        (
            "traccar_vectors.jsonl",
            include_str!("vectors/traccar_vectors.jsonl"),
        ),
    ] {
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            out.push(Row {
                file,
                line: i + 1,
                v: serde_json::from_str(line).unwrap(),
            });
        }
    }
    out
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds a whole capture to a fresh decoder, as a connection that then closes.
fn decode_tcp(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(f) = dec.decode_eof(&mut buf)? {
        frames.push(f);
    }
    Ok(frames)
}

fn codec_of(row: &Row) -> u8 {
    let s = row.derived()["codec_id"].as_str().unwrap();
    u8::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// Degrees as printed by the derivation → the wire integer (degrees × 10^7).
fn e7(v: &Value) -> i32 {
    (v.as_f64().unwrap() * 1e7).round() as i32
}

fn check_record(name: &str, rec: &AvlRecord, want: &Value) {
    let ctx = format!("{name}: {want}");
    assert_eq!(
        rec.timestamp_ms,
        want["timestamp_ms"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        u64::from(rec.priority),
        want["priority"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(rec.longitude, e7(&want["longitude"]), "{ctx}");
    assert_eq!(rec.latitude, e7(&want["latitude"]), "{ctx}");
    assert_eq!(
        i64::from(rec.altitude),
        want["altitude"].as_i64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        u64::from(rec.angle),
        want["angle"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        u64::from(rec.satellites),
        want["satellites"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        u64::from(rec.speed),
        want["speed_kmh"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        u64::from(rec.event_id),
        want["event_io_id"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        rec.io.len() as u64,
        want["io_total"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        rec.io.len() as u64,
        want["io_count"].as_u64().unwrap(),
        "{ctx}"
    );
    assert_eq!(
        rec.generation_type.map(u64::from),
        want.get("generation_type").and_then(Value::as_u64),
        "{ctx}"
    );
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SS.000Z` (civil-from-days, proleptic Gregorian).
fn iso(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn check_command(name: &str, cmd: &Command, want: &Value) {
    assert_eq!(
        u64::from(cmd.kind),
        want["type"].as_u64().unwrap(),
        "{name}"
    );
    match want["text"].as_str() {
        Some(text) => assert_eq!(cmd.payload, text.as_bytes(), "{name}"),
        None => {
            assert_eq!(
                to_hex(&cmd.payload),
                want["hex"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(
                cmd.payload.len() + cmd.timestamp.map_or(0, |_| 4),
                want["size"].as_u64().unwrap() as usize,
                "{name}"
            );
        }
    }
    let want_imei = want["imei_field"]
        .as_str()
        .map(|h| Imei::parse(&h[1..]).unwrap());
    assert_eq!(cmd.imei, want_imei, "{name}");
    let want_ts = want["timestamp"].as_str().map(str::to_owned);
    assert_eq!(cmd.timestamp.map(|t| iso(t.into())), want_ts, "{name}");
}

/// The reason a non-accepted row (or a knowingly unsupported one) must be rejected with.
fn expected_rejection(row: &Row, bytes: &[u8]) -> Option<&'static str> {
    let d = row.derived();
    let ctx = &row.v["context"];
    let declared = d["data_field_length"].as_u64();
    match row.strict() {
        "reject_crc" => Some("crc"),
        // A length too small to hold codec + N1 + N2 fails on the head; a length that
        // promises more bytes than the capture holds leaves a half frame at EOF.
        "reject_length" => match declared {
            Some(len) if len < 3 => Some("bad_length"),
            Some(len) if (len as usize) + 12 > bytes.len() => Some("incomplete"),
            other => panic!("{}: unexpected reject_length shape {other:?}", row.name()),
        },
        // The CRC is checked before the body is read (see `reject_body_rows_fail_on_body_once_crc_is_fixed`).
        "reject_body" => {
            assert_eq!(d["crc_ok"], Value::Bool(false), "{}", row.name());
            Some("crc")
        }
        "accept" if d["codec_id"] == "0x07" => Some("unknown_codec"),
        "accept" if ctx["traccar_extended_16byte_io_group"] == Value::Bool(true) => {
            Some("io_count")
        }
        _ => None,
    }
}

/// Computed from the jsonl files: N1 summed over `strict: accept` AVL rows, less the two
/// extended-IO-group frames (11 records each) that are rejected on purpose.
const EXPECTED_RECORDS: usize = 79;

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
    let mut records = 0;
    for row in &rows {
        let name = row.name();
        let bytes = row.hex();
        let d = row.derived();
        match d["kind"].as_str().unwrap() {
            "imei" => {
                let mut buf = BytesMut::from(&bytes[..]);
                let imei = LoginDecoder::new(Limits::default())
                    .decode(&mut buf)
                    .unwrap()
                    .unwrap();
                assert!(buf.is_empty(), "{name}");
                assert_eq!(imei.as_str(), d["imei"].as_str().unwrap(), "{name}");
                let mut out = BytesMut::new();
                encode_login(&imei, &mut out);
                assert_eq!(&out[..], &bytes[..], "{name}");
                if let Some(want) = row.v["expect"]["imei"].as_str() {
                    assert_eq!(imei.as_str(), want, "{name}");
                }
                tally.add("login");
            }
            "ping_0xff" => {
                let mut buf = BytesMut::from(&bytes[..]);
                let f = FrameDecoder::new(Limits::default())
                    .decode(&mut buf)
                    .unwrap();
                assert_eq!(f, Some(Frame::KeepAlive), "{name}");
                // The frame-decoder rows put a login after the ping; it must be left intact.
                let first = row.v["expect"]["first_frame_hex"].as_str().unwrap_or("ff");
                assert_eq!(bytes.len() - buf.len(), first.len() / 2, "{name}");
                tally.add("keep_alive");
            }
            "data" => {
                if let Some(reason) = expected_rejection(row, &bytes) {
                    let err = decode_tcp(&bytes).expect_err(&name);
                    assert_eq!(err.reason(), reason, "{name}: {err}");
                    assert!(err.offset().is_some(), "{name}");
                    tally.add(reason);
                    continue;
                }
                assert_eq!(row.strict(), "accept", "{name}");
                let frames = decode_tcp(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
                let [frame] = &frames[..] else {
                    panic!("{name}: {} frames", frames.len())
                };
                let codec = Codec::from_id(codec_of(row)).unwrap();
                let n1 = d["number_of_data_1"].as_u64().unwrap() as usize;
                let mut reencoded = BytesMut::new();
                match frame {
                    Frame::Avl(p) => {
                        assert_eq!(p.codec, codec, "{name}");
                        assert_eq!(p.records.len(), n1, "{name}");
                        for key in ["records", "positions"] {
                            if let Some(n) = row.v["expect"][key].as_u64() {
                                assert_eq!(p.records.len() as u64, n, "{name}");
                            }
                        }
                        check_record(&name, &p.records[0], &d["first_record"]);
                        if let Some(last) = d.get("last_record") {
                            check_record(&name, p.records.last().unwrap(), last);
                        }
                        check_attribute(&name, &p.records[0], &row.v["expect"]);
                        if let Some(ack) = row.v["expect"]["server_ack_hex"].as_str() {
                            assert_eq!(encode_ack(n1 as u32)[..], hex(ack)[..], "{name}");
                        }
                        records += p.records.len();
                        encode_avl(p, &mut reencoded).unwrap();
                        tally.add("avl");
                    }
                    Frame::Command(c) => {
                        assert_eq!(c.codec, codec, "{name}");
                        assert_eq!(n1, 1, "{name}");
                        check_command(&name, c, &d["first_record"]);
                        if let Some(id) =
                            row.v["expect"]["first_position_attribute"]["driverUniqueId"].as_str()
                        {
                            let text = String::from_utf8_lossy(&c.payload);
                            assert!(text.contains(id), "{name}");
                        }
                        if let Some(text) = row.v["expect"]["encodes_from_command_data"].as_str() {
                            // traccar's rule: hex pairs are sent raw, anything else as ASCII.
                            let is_hex = text.len().is_multiple_of(2)
                                && text.bytes().all(|b| b.is_ascii_hexdigit());
                            let payload = if is_hex { hex(text) } else { text.into() };
                            let mut out = BytesMut::new();
                            encode_command(&Command::codec12(payload), &mut out).unwrap();
                            assert_eq!(&out[..], &bytes[..], "{name}");
                        }
                        encode_command(c, &mut reencoded).unwrap();
                        tally.add("command");
                    }
                    Frame::KeepAlive => panic!("{name}: keep-alive"),
                }
                // Every accepted frame here is canonical, so re-encoding is byte-exact
                // (required for the wiki rows, and it holds for traccar's too).
                assert_eq!(to_hex(&reencoded), to_hex(&bytes), "{name}");
                if row.is_wiki() {
                    tally.add("wiki_reencoded");
                }
            }
            "udp_data" => {
                assert_eq!(row.strict(), "accept", "{name}");
                let dg = decode_udp(&bytes, &Limits::default()).unwrap();
                assert_eq!(dg.imei.as_str(), d["imei"].as_str().unwrap(), "{name}");
                let pid = u16::from_str_radix(&d["packet_id"].as_str().unwrap()[2..], 16).unwrap();
                let avl_id =
                    u8::from_str_radix(&d["avl_packet_id"].as_str().unwrap()[2..], 16).unwrap();
                assert_eq!((dg.packet_id, dg.avl_packet_id), (pid, avl_id), "{name}");
                assert_eq!(dg.packet.codec.id(), codec_of(row), "{name}");
                let n1 = d["number_of_data_1"].as_u64().unwrap();
                assert_eq!(dg.packet.records.len() as u64, n1, "{name}");
                check_record(&name, &dg.packet.records[0], &d["first_record"]);
                let ack = udp_ack(dg.packet_id, dg.avl_packet_id, n1 as u8);
                let doc = d["expected_server_ack_hex_per_teltonika_doc"]
                    .as_str()
                    .unwrap();
                assert_eq!(to_hex(&ack), doc.to_lowercase(), "{name}");
                for key in ["server_ack_hex", "wiki_server_ack_hex"] {
                    if let Some(want) = row.v["expect"][key].as_str() {
                        assert_eq!(to_hex(&ack), want.to_lowercase(), "{name}");
                    }
                }
                let mut out = BytesMut::new();
                encode_udp(&dg, &mut out).unwrap();
                assert_eq!(to_hex(&out), to_hex(&bytes), "{name}");
                records += dg.packet.records.len();
                tally.add("udp");
            }
            other => panic!("{name}: unknown kind {other}"),
        }
    }
    // Guards against rows silently skipped: the totals of SOURCE.md and PROTOCOL.md.
    assert_eq!(rows.len(), 14 + 56);
    let t = &tally.0;
    assert_eq!(t["login"], 1 + 3, "{tally:?}");
    assert_eq!(t["keep_alive"], 2, "{tally:?}");
    assert_eq!(t["udp"], 3, "{tally:?}");
    assert_eq!(t["wiki_reencoded"], 11, "{tally:?}");
    assert_eq!(t["crc"], 4 + 1, "{tally:?}"); // 4 reject_crc + the reject_body row
    assert_eq!(t["bad_length"] + t["incomplete"], 4, "{tally:?}");
    assert_eq!(t["unknown_codec"], 2, "{tally:?}"); // codec 7; the third is reject_length
    assert_eq!(t["io_count"], 2, "{tally:?}");
    assert_eq!(tally.0.values().sum::<usize>() - t["wiki_reencoded"], 70);
    // Sum of N1 over the accepted codec 8/8E/16 rows (TCP and UDP), from the derived fields.
    assert_eq!(records, EXPECTED_RECORDS);
}

/// traccar's attribute assertions, where they are a property of the raw record.
fn check_attribute(name: &str, rec: &AvlRecord, expect: &Value) {
    let attr = &expect["first_position_attribute"];
    if let Some(t) = attr["eyeTemp1"].as_f64() {
        // EYE sensor temperature 1 is IO 10800: signed 2 bytes, × 0.01 °C.
        let v = rec.io.iter().find(|e| e.id == 10800).unwrap();
        let IoValue::U16(raw) = v.value else {
            panic!("{name}: {v:?}")
        };
        assert_eq!(f64::from(raw as i16) / 100.0, t, "{name}");
    }
    for key in ["tag1Voltage", "tag1Battery"] {
        if attr.get(key).is_some() {
            // traccar reads these from the sub-structure of a BLE beacon NX element, which
            // this codec deliberately keeps raw: check only that the element is there.
            let nx = rec
                .io
                .iter()
                .any(|e| matches!(e.value, IoValue::Var(ref b) if !b.is_empty()));
            assert!(nx, "{name}: {key} needs a non-empty NX value");
        }
    }
}

/// The reject_body row is rejected for its CRC first; with the CRC recomputed, the body
/// itself must still be refused (its command size disagrees with its contents).
#[test]
fn reject_body_rows_fail_on_body_once_crc_is_fixed() {
    let mut seen = 0;
    for row in rows().iter().filter(|r| r.strict() == "reject_body") {
        let mut bytes = row.hex();
        let crc_at = bytes.len() - 4;
        let crc = crc16_ibm(&bytes[8..crc_at]);
        bytes[crc_at..].copy_from_slice(&u32::from(crc).to_be_bytes());
        let err = decode_tcp(&bytes).unwrap_err();
        assert_eq!(err.reason(), "count_mismatch", "{}: {err}", row.name());
        seen += 1;
    }
    assert_eq!(seen, 1);
}

/// Every vector is also decoded when it arrives one byte at a time, with identical results.
#[test]
fn byte_at_a_time_matches_whole() {
    for row in rows() {
        if row.v["transport"] != "tcp" || row.derived()["kind"] != "data" {
            continue;
        }
        let bytes = row.hex();
        let whole = decode_tcp(&bytes);
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
