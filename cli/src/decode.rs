//! `trackgate decode`: a hex dump of one packet (as copied from tcpdump, Wireshark or a device
//! log) → JSON. Record fields carry the names and formats of the Redis entry (DESIGN.md).
//! Teltonika (TCP and UDP) and GT06 (`decode/gt06.rs`); the protocol is told by the start bits
//! (`78 78` / `79 79` is GT06) unless `--protocol` names it. Every object carries `protocol`
//! (`teltonika` or `gt06`), as every Redis entry will.

use std::io::Read;

use anyhow::{Context, bail};
use bytes::BytesMut;
use serde_json::{Map, Value, json};
use trackgate_protocol::gt06::UtcOffset;
use trackgate_protocol::{
    AvlPacket, Command, Frame, FrameDecoder, FrameError, Limits, LoginDecoder, decode_udp,
    encode_ack, login_reply, udp_ack,
};

/// Arguments of `trackgate decode`.
#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// The packet as hex; spaces, newlines, colons and `0x` prefixes are ignored. Read from
    /// stdin when absent.
    pub hex: Vec<String>,
    /// Decode as a UDP datagram (by default TCP is tried first, then UDP). Teltonika only.
    #[arg(long)]
    pub udp: bool,
    /// The protocol; by default GT06 when the bytes start with 7878 or 7979, else Teltonika.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// GT06 only: minutes east of UTC of the device's clock (GT06 devices send local time or
    /// UTC depending on the model); `ts` is the wire time less this offset.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub utc_offset: i16,
}

/// A protocol `trackgate decode` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// Teltonika: IMEI login, Codec 8/8E/16/12-15 over TCP, UDP datagrams.
    Teltonika,
    /// GT06 (Concox, Jimi IoT and clones): 7878/7979 frames.
    Gt06,
}

/// How to read the bytes: the options of [`DecodeArgs`] that are not the input.
#[derive(Debug, Clone, Copy, Default)]
pub struct How {
    /// The protocol, or `None` to tell it by the start bits.
    pub protocol: Option<Protocol>,
    /// Teltonika UDP.
    pub udp: bool,
    /// GT06 device clock.
    pub utc_offset: UtcOffset,
}

/// Runs the subcommand: prints the decoded packet as pretty JSON on stdout.
///
/// # Errors
/// Unreadable hex, or a packet that does not decode: the message names the reason and the
/// byte offset (the binary exits 1).
pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    let text = if args.hex.is_empty() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading hex from stdin")?;
        s
    } else {
        args.hex.join(" ")
    };
    let utc_offset = UtcOffset::from_minutes(args.utc_offset)
        .with_context(|| format!("--utc-offset {} is beyond ±14 h", args.utc_offset))?;
    let how = How {
        protocol: args.protocol,
        udp: args.udp,
        utc_offset,
    };
    let value = decode_text(&text, how)?;
    crate::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&value)?))?;
    Ok(())
}

/// Hex text → JSON; the testable core of [`run`].
pub fn decode_text(text: &str, how: How) -> anyhow::Result<Value> {
    let bytes = parse_hex(text)?;
    if bytes.is_empty() {
        bail!("no bytes to decode");
    }
    let protocol = how.protocol.unwrap_or(if gt06::looks_like_gt06(&bytes) {
        Protocol::Gt06
    } else {
        Protocol::Teltonika
    });
    if protocol == Protocol::Gt06 {
        if how.udp {
            bail!("--udp: GT06 is decoded over TCP only");
        }
        return gt06::decode(&bytes, how.utc_offset);
    }
    if how.udp {
        return decode_udp(&bytes, &Limits::default())
            .map(|d| udp_json(&d))
            .map_err(|e| packet_error("UDP datagram", &e, 0));
    }
    match decode_tcp(&bytes) {
        Ok(v) => Ok(v),
        Err(tcp_err) => match decode_udp(&bytes, &Limits::default()) {
            Ok(d) => Ok(udp_json(&d)),
            // Report the error of the transport the bytes look like: TCP frames start with
            // the zero preamble, a login with 0x000F, a keep-alive with 0xFF.
            Err(udp_err) if !looks_like_tcp(&bytes) => {
                Err(packet_error("UDP datagram", &udp_err, 0))
            }
            Err(_) => Err(packet_error("TCP packet", &tcp_err.0, tcp_err.1)),
        },
    }
}

fn looks_like_tcp(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0, 0, 0, 0]) || bytes.starts_with(&[0, 0x0F]) || bytes[0] == 0xFF
}

/// One line: reason, byte offset in the input, then the decoder's explanation.
fn packet_error(what: &str, e: &FrameError, frame_start: usize) -> anyhow::Error {
    one_line_error(what, e.reason(), e.offset(), e, frame_start)
}

/// The shape of every decode error: `bad <what>: <reason> at byte <n>[ (in the frame at byte
/// <s>)]: <message>`, with `n` counted from the start of the input.
fn one_line_error(
    what: &str,
    reason: &str,
    offset: Option<usize>,
    message: &dyn std::fmt::Display,
    frame_start: usize,
) -> anyhow::Error {
    // The decoder's own message counts from the start of the frame.
    let within = match frame_start {
        0 => String::new(),
        s => format!(" (in the frame at byte {s})"),
    };
    match offset {
        Some(at) => anyhow::anyhow!(
            "bad {what}: {reason} at byte {}{within}: {message}",
            frame_start + at
        ),
        None => anyhow::anyhow!("bad {what}: {reason}{within}: {message}"),
    }
}

/// Accepts `000F33…`, `00 0f 33`, `0x00,0x0F`, `00:0f:33` and line breaks.
fn parse_hex(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut digits = String::with_capacity(text.len());
    for token in text.split(|c: char| c.is_whitespace() || c == ':' || c == ',') {
        let token = token
            .strip_prefix("0x")
            .or_else(|| token.strip_prefix("0X"))
            .unwrap_or(token);
        digits.push_str(token);
    }
    if let Some((i, c)) = digits.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        bail!("not hex: {c:?} at hex digit {i}");
    }
    if !digits.len().is_multiple_of(2) {
        bail!("odd number of hex digits ({})", digits.len());
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).context("hex digit"))
        .collect()
}

/// A TCP capture: an optional login frame, then frames. One item prints as an object, more
/// as an array. An error comes with the capture offset of the frame it is in, since the
/// decoder's offsets count from the start of each frame.
fn decode_tcp(bytes: &[u8]) -> Result<Value, (FrameError, usize)> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    let is_login = bytes.len() >= 2 && bytes[0] != 0xFF && bytes[..2] != [0, 0];
    if is_login {
        match LoginDecoder::new(Limits::default()).decode(&mut buf) {
            Ok(Some(imei)) => out.push(json!({
                "protocol": "teltonika",
                "transport": "tcp",
                "type": "login",
                "imei": imei.as_str(),
                "reply_hex": hex(&[login_reply(true)]),
            })),
            Ok(None) => return Err((FrameError::Incomplete { have: buf.len() }, 0)),
            Err(e) => return Err((e, 0)),
        }
    }
    let mut frames = FrameDecoder::new(Limits::default());
    loop {
        let start = bytes.len() - buf.len();
        match frames.decode_eof(&mut buf) {
            Ok(Some(frame)) => out.push(frame_json(&frame)),
            Ok(None) => break,
            Err(e) => return Err((e, start)),
        }
    }
    Ok(match out.len() {
        1 => out.remove(0),
        _ => Value::Array(out),
    })
}

fn frame_json(frame: &Frame) -> Value {
    match frame {
        Frame::KeepAlive => {
            json!({"protocol": "teltonika", "transport": "tcp", "type": "keep_alive"})
        }
        Frame::Avl(p) => {
            let mut v = packet_json(p);
            v.insert("protocol".into(), "teltonika".into());
            v.insert("transport".into(), "tcp".into());
            v.insert("type".into(), "avl".into());
            let ack = encode_ack(u32::try_from(p.records.len()).unwrap_or(u32::MAX));
            v.insert("ack_hex".into(), hex(&ack).into());
            Value::Object(v)
        }
        Frame::Command(c) => command_json(c),
    }
}

fn udp_json(d: &trackgate_protocol::UdpDatagram) -> Value {
    let mut v = packet_json(&d.packet);
    v.insert("protocol".into(), "teltonika".into());
    v.insert("transport".into(), "udp".into());
    v.insert("type".into(), "avl".into());
    v.insert("imei".into(), d.imei.as_str().into());
    v.insert("packet_id".into(), d.packet_id.into());
    v.insert("avl_packet_id".into(), d.avl_packet_id.into());
    let n = u8::try_from(d.packet.records.len()).unwrap_or(u8::MAX);
    v.insert(
        "ack_hex".into(),
        hex(&udp_ack(d.packet_id, d.avl_packet_id, n)).into(),
    );
    Value::Object(v)
}

fn packet_json(p: &AvlPacket) -> Map<String, Value> {
    let records = p
        .records
        .iter()
        .map(|r| {
            let mut m = Map::new();
            for (name, value) in trackgate_api::redis_layout::record_fields(r) {
                // `io` is JSON text in Redis; nest it as an object here so it reads well.
                let value = match name {
                    "io" => serde_json::from_str(&value).unwrap_or(Value::String(value)),
                    _ => Value::String(value),
                };
                m.insert(name.into(), value);
            }
            if let Some(g) = r.generation_type {
                m.insert("generation_type".into(), g.into());
            }
            Value::Object(m)
        })
        .collect::<Vec<_>>();
    let mut v = Map::new();
    v.insert("codec".into(), p.codec.label().into());
    v.insert("count".into(), records.len().into());
    v.insert("records".into(), records.into());
    v
}

fn command_json(c: &Command) -> Value {
    let kind = match c.kind {
        0x05 => "command",
        0x06 => "response",
        0x11 => "nack",
        0x0B => "message",
        _ => "other",
    };
    let mut v = json!({
        "protocol": "teltonika",
        "transport": "tcp",
        "type": "command",
        "codec": c.codec.label(),
        "kind": c.kind,
        "kind_name": kind,
        "payload_hex": hex(&c.payload),
    });
    if let Ok(text) = std::str::from_utf8(&c.payload) {
        v["payload_text"] = text.into();
    }
    if let Some(imei) = &c.imei {
        v["imei"] = imei.as_str().into();
    }
    if let Some(ts) = c.timestamp {
        v["timestamp"] = ts.into();
    }
    v
}

mod gt06;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIKI_8: &str = "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF";

    #[test]
    fn wiki_codec8_to_redis_fields() {
        let v = decode_text(WIKI_8, How::default()).unwrap();
        assert_eq!(v["type"], "avl");
        assert_eq!(v["protocol"], "teltonika");
        assert_eq!(v["codec"], "8");
        assert_eq!(v["ack_hex"], "00000001");
        let r = &v["records"][0];
        assert_eq!(r["ts"], "1560161086000");
        assert_eq!(r["lat"], "0.0000000");
        assert_eq!(r["priority"], "1");
        assert_eq!(r["event"], "1");
        assert_eq!(
            r["io"],
            json!({"21": 3, "1": 1, "66": 24079, "241": 24602, "78": 0})
        );
    }

    #[test]
    fn separators_as_copied_from_tools() {
        let spaced = "0x00 0x0F 33:35:36:33:30:37:30:34\n32 34 34 31 30 31 33";
        let v = decode_text(spaced, How::default()).unwrap();
        assert_eq!(v["type"], "login");
        assert_eq!(v["imei"], "356307042441013");
    }

    #[test]
    fn login_then_frames_is_an_array() {
        let text = format!("000F333536333037303432343431303133 FF {WIKI_8}");
        let v = decode_text(&text, How::default()).unwrap();
        let kinds: Vec<_> = v.as_array().unwrap().iter().map(|f| &f["type"]).collect();
        assert_eq!(kinds, ["login", "keep_alive", "avl"]);
        assert!(
            v.as_array()
                .unwrap()
                .iter()
                .all(|f| f["protocol"] == "teltonika")
        );
    }

    #[test]
    fn udp_is_tried_after_tcp() {
        let dg = "003DCAFE0105000F33353230393330383634303336353508010000016B4F815B30010000000000000000000000000000000103021503010101425DBC000001";
        let v = decode_text(dg, How::default()).unwrap();
        assert_eq!(v["transport"], "udp");
        assert_eq!(v["ack_hex"], "0005cafe010501");
        assert_eq!(
            decode_text(
                dg,
                How {
                    udp: true,
                    ..How::default()
                }
            )
            .unwrap(),
            v
        );
    }

    #[test]
    fn command_response() {
        let v = decode_text(
            "00000000000000370C01060000002F4449313A31204449323A30204449333A302041494E313A302041494E323A313639323420444F313A3020444F323A3101000066E3",
            How::default(),
        )
        .unwrap();
        assert_eq!(v["kind_name"], "response");
        assert_eq!(
            v["payload_text"],
            "DI1:1 DI2:0 DI3:0 AIN1:0 AIN2:16924 DO1:0 DO2:1"
        );
    }

    /// A corrupted CRC must say "crc" and where the CRC field is.
    #[test]
    fn bad_crc_names_reason_and_offset() {
        let bad = WIKI_8.replace("C7CF", "C7CE");
        let err = decode_text(&bad, How::default()).unwrap_err().to_string();
        assert!(err.starts_with("bad TCP packet: crc at byte 62:"), "{err}");
        assert!(!err.contains('\n'));
    }

    /// Offsets count from the start of the input, not of the frame that failed.
    #[test]
    fn offset_is_absolute_in_a_capture() {
        let bad = WIKI_8.replace("C7CF", "C7CE");
        let err = decode_text(&format!("FF{bad}"), How::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("crc at byte 63 (in the frame at byte 1):"),
            "{err}"
        );
    }

    #[test]
    fn not_hex() {
        let err = decode_text("00zz", How::default()).unwrap_err().to_string();
        assert!(err.contains("not hex"), "{err}");
        assert!(decode_text("000", How::default()).is_err());
    }
}
