//! `trackgate decode` for GT06: every frame of a capture → one JSON object (an array for more
//! than one), in the shape of the Teltonika output; locations carry the Redis entry fields.

use bytes::BytesMut;
use serde_json::{Map, Value, json};
use trackgate_protocol::Limits;
use trackgate_protocol::gt06::{Frame, FrameDecoder, Location, Packet, UtcOffset, reply_to};

use super::{hex, one_line_error};

/// GT06 frames start with `78 78` or `79 79`; no Teltonika packet does (a login starts
/// `00 0F`, a data frame `00 00 00 00`, a UDP datagram with its length, at most 0x0800 for the
/// usual limits).
pub(super) fn looks_like_gt06(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x78, 0x78]) || bytes.starts_with(&[0x79, 0x79])
}

/// Every frame in `bytes`, read with the device clock at `offset`.
pub(super) fn decode(bytes: &[u8], offset: UtcOffset) -> anyhow::Result<Value> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = FrameDecoder::new(Limits::default());
    let mut out = Vec::new();
    loop {
        let start = bytes.len() - buf.len();
        let frame = match frames.decode_eof(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err(one_line_error(
                    "GT06 packet",
                    e.reason(),
                    e.offset(),
                    &e,
                    start,
                ));
            }
        };
        let packet = Packet::decode(&frame, offset)
            .map_err(|e| one_line_error("GT06 packet", e.reason(), e.offset(), &e, start))?;
        out.push(frame_json(&frame, &packet));
    }
    Ok(match out.len() {
        1 => out.remove(0),
        _ => Value::Array(out),
    })
}

fn frame_json(frame: &Frame, packet: &Packet) -> Value {
    let mut v = Map::new();
    v.insert("protocol".into(), "gt06".into());
    v.insert("transport".into(), "tcp".into());
    let kind = match packet {
        Packet::Login(l) => {
            v.insert("imei".into(), l.imei.as_str().into());
            if let Some(t) = l.type_id {
                v.insert("type_id".into(), t.into());
            }
            if let Some(z) = l.time_zone_language {
                v.insert("time_zone_language".into(), z.into());
            }
            if let Some(o) = l.utc_offset() {
                v.insert("utc_offset_minutes".into(), o.minutes().into());
            }
            "login"
        }
        Packet::Heartbeat(h) => {
            let s = &h.status;
            v.insert("terminal_info".into(), s.terminal_info.into());
            v.insert("voltage".into(), s.voltage.into());
            v.insert("gsm_signal".into(), s.gsm_signal.into());
            if let Some(a) = s.alarm(h.protocol) {
                v.insert("alarm".into(), a.into());
            }
            v.insert("language".into(), (s.alarm_language & 0xFF).into());
            if !h.extra.is_empty() {
                v.insert("extra_hex".into(), hex(&h.extra).into());
            }
            "heartbeat"
        }
        Packet::Location(l) => {
            records(&mut v, l);
            "location"
        }
        Packet::Alarm(l) => {
            records(&mut v, l);
            "alarm"
        }
        Packet::Info(i) => {
            v.insert("kind".into(), i.kind.into());
            v.insert("data_hex".into(), hex(&i.data).into());
            if let Some(cv) = i.external_voltage() {
                v.insert("external_voltage".into(), json!(f64::from(cv) / 100.0));
            }
            if let Some(iccid) = i.iccid() {
                v.insert("iccid".into(), iccid.into());
            }
            "info"
        }
        Packet::Raw(r) => {
            v.insert("content_hex".into(), hex(&r.content).into());
            "raw"
        }
        _ => "other",
    };
    v.insert("type".into(), kind.into());
    v.insert("packet".into(), format!("{:#04x}", frame.protocol).into());
    v.insert("serial".into(), frame.serial.into());
    if let Some(reply) = reply_to(frame) {
        v.insert("reply_hex".into(), hex(&reply).into());
    }
    Value::Object(v)
}

/// The location as one record with the Redis entry fields (`io` nested as an object).
fn records(v: &mut Map<String, Value>, l: &Location) {
    let mut m = Map::new();
    for (name, value) in l.fields() {
        let value = match name {
            "io" => serde_json::from_str(&value).unwrap_or(Value::String(value)),
            _ => Value::String(value),
        };
        m.insert(name.into(), value);
    }
    v.insert("count".into(), 1.into());
    v.insert("records".into(), vec![Value::Object(m)].into());
}

#[cfg(test)]
mod tests {
    use super::super::{How, Protocol, decode_text};

    const LOGIN: &str = "78780D01086471700328358100093F040D0A";
    /// traccar vector 97: a 0x12 location.
    const LOCATION: &str =
        "787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a";

    #[test]
    fn login_is_auto_detected_with_its_reply() {
        let v = decode_text(LOGIN, How::default()).unwrap();
        assert_eq!(v["protocol"], "gt06");
        assert_eq!(v["type"], "login");
        assert_eq!(v["imei"], "864717003283581");
        assert_eq!(v["packet"], "0x01");
        assert_eq!(v["reply_hex"], "78780501000955940d0a");
    }

    #[test]
    fn location_has_the_redis_fields() {
        let v = decode_text(LOCATION, How::default()).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["count"].as_u64()),
            (Some("location"), Some(1))
        );
        let r = &v["records"][0];
        assert_eq!(r["ts"], "1440700195000");
        assert_eq!(
            (r["lat"].as_str(), r["lon"].as_str()),
            (Some("16.6347089"), Some("80.9670756"))
        );
        assert_eq!(r["io"]["mcc"], 404);
        assert!(v.get("reply_hex").is_none(), "locations are not answered");
    }

    #[test]
    fn utc_offset_moves_ts() {
        let how = How {
            utc_offset: trackgate_protocol::gt06::UtcOffset::from_minutes(60).unwrap(),
            ..How::default()
        };
        let v = decode_text(LOCATION, how).unwrap();
        assert_eq!(v["records"][0]["ts"], "1440696595000");
    }

    #[test]
    fn login_then_location_is_an_array() {
        let v = decode_text(&format!("{LOGIN} {LOCATION}"), How::default()).unwrap();
        let kinds: Vec<_> = v.as_array().unwrap().iter().map(|f| &f["type"]).collect();
        assert_eq!(kinds, ["login", "location"]);
    }

    /// A corrupted CRC names the reason and the absolute offset of the CRC field, on one line.
    #[test]
    fn bad_crc_in_the_second_frame() {
        let bad = LOCATION.replace("76d1470d0a", "76d1480d0a");
        let err = decode_text(&format!("{LOGIN}{bad}"), How::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("bad GT06 packet: crc at byte 54 (in the frame at byte 18):"),
            "{err}"
        );
        assert!(!err.contains('\n'));
    }

    #[test]
    fn forced_protocols() {
        // Forced to Teltonika, a GT06 login is not a Teltonika packet.
        let how = How {
            protocol: Some(Protocol::Teltonika),
            ..How::default()
        };
        assert!(decode_text(LOGIN, how).is_err());
        // Forced to GT06, a Teltonika login fails on its first byte.
        let how = How {
            protocol: Some(Protocol::Gt06),
            ..How::default()
        };
        let err = decode_text("000F333536333037303432343431303133", how)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("bad GT06 packet: start_bits at byte 0:"),
            "{err}"
        );
        let udp = How { udp: true, ..how };
        assert!(decode_text(LOGIN, udp).is_err());
    }

    #[test]
    fn half_frame_is_incomplete() {
        let err = decode_text(&LOGIN[..20], How::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad GT06 packet: incomplete:"), "{err}");
    }
}
