//! The command stream's entries, checked, and the queued form a driver takes.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;
use trackgate_api::redis_layout::{
    CommandReason, DEFAULT_COMMAND_TTL_SECONDS, MAX_COMMAND_BYTES, MAX_COMMAND_ID_LEN,
    MAX_COMMAND_TTL_SECONDS, command_field as field,
};
use trackgate_protocol::Imei;

/// A command-stream entry, checked: what ROUTE gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Routed {
    pub(crate) id: String,
    pub(crate) imei: String,
    pub(crate) codec: u8,
    pub(crate) payload: Vec<u8>,
    pub(crate) text: Option<String>,
    pub(crate) ttl: Duration,
    /// Set when the entry cannot be sent: it is recorded `failed` with this reason.
    pub(crate) reject: Option<CommandReason>,
}

/// Reads one entry of the command stream. Never fails: a bad entry becomes a `failed` command
/// with a reason, so its producer learns why.
pub(crate) fn parse_entry(entry_id: &str, fields: &HashMap<String, Value>) -> Routed {
    let get = |name: &str| -> Option<String> {
        match fields.get(name)? {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut reject = None;
    let mut bad = |reason| {
        reject.get_or_insert(reason);
    };
    let id = match get(field::ID) {
        Some(id) if is_valid_id(&id) => id,
        Some(_) => {
            bad(CommandReason::Malformed);
            entry_id.to_owned()
        }
        None => entry_id.to_owned(),
    };
    let imei = get(field::IMEI).unwrap_or_default();
    if Imei::parse(&imei).is_err() {
        bad(CommandReason::Malformed);
    }
    let codec = match get(field::CODEC).as_deref().map(str::trim) {
        None | Some("" | "12") => 12,
        Some("14") => 14,
        Some(_) => {
            bad(CommandReason::Malformed);
            12
        }
    };
    let ttl = match get(field::TTL).map(|s| s.trim().parse::<u64>()) {
        None => DEFAULT_COMMAND_TTL_SECONDS,
        Some(Ok(s)) if (1..=MAX_COMMAND_TTL_SECONDS).contains(&s) => s,
        Some(_) => {
            bad(CommandReason::Malformed);
            DEFAULT_COMMAND_TTL_SECONDS
        }
    };
    let (payload, text) = match (get(field::COMMAND), get(field::PAYLOAD)) {
        (Some(text), None) if !text.is_empty() => (text.clone().into_bytes(), Some(text)),
        (None, Some(hex)) => match from_hex(&hex) {
            Some(bytes) if !bytes.is_empty() => (bytes, None),
            _ => {
                bad(CommandReason::Malformed);
                (Vec::new(), None)
            }
        },
        _ => {
            bad(CommandReason::Malformed);
            (Vec::new(), None)
        }
    };
    if payload.len() > MAX_COMMAND_BYTES {
        bad(CommandReason::TooLarge);
    }
    Routed {
        id,
        imei,
        codec,
        payload,
        text,
        ttl: Duration::from_secs(ttl),
        reject,
    }
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_COMMAND_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

/// A command taken from a device's queue (the JSON body ROUTE wrote).
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct QueuedCommand {
    pub(crate) id: String,
    pub(crate) codec: u8,
    /// Hex.
    payload: String,
    /// Ms since the epoch (Redis time).
    expires: String,
}

impl QueuedCommand {
    pub(crate) fn payload(&self) -> Option<Vec<u8>> {
        from_hex(&self.payload)
    }

    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        self.expires.parse::<u64>().map_or(true, |e| e <= now_ms)
    }
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    crate::session::hex(bytes)
}

pub(super) fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Routed {
        let map = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::BulkString(v.as_bytes().to_vec())))
            .collect();
        parse_entry("1-0", &map)
    }

    #[test]
    fn a_text_command_defaults_to_codec_12_and_an_hour() {
        let r = entry(&[
            ("id", "c1"),
            ("imei", "356307042441013"),
            ("command", "getinfo"),
        ]);
        assert_eq!(r.reject, None);
        assert_eq!((r.codec, r.ttl), (12, Duration::from_secs(3600)));
        assert_eq!(r.payload, b"getinfo");
        assert_eq!(r.text.as_deref(), Some("getinfo"));
    }

    #[test]
    fn a_raw_payload_and_codec_14() {
        let r = entry(&[
            ("imei", "356307042441013"),
            ("payload", "0303AB"),
            ("codec", "14"),
            ("ttl", "60"),
        ]);
        assert_eq!(r.reject, None);
        assert_eq!(r.id, "1-0", "the entry id stands in for a missing id");
        assert_eq!((r.codec, r.payload.as_slice()), (14, &[3u8, 3, 0xAB][..]));
    }

    #[test]
    fn bad_entries_get_a_reason() {
        let imei = ("imei", "356307042441013");
        let cases: [(&[(&str, &str)], CommandReason); 7] = [
            (
                &[("imei", "12"), ("command", "getver")],
                CommandReason::Malformed,
            ),
            (&[imei], CommandReason::Malformed),
            (
                &[imei, ("command", "a"), ("payload", "00")],
                CommandReason::Malformed,
            ),
            (&[imei, ("payload", "0g")], CommandReason::Malformed),
            (
                &[imei, ("command", "a"), ("codec", "13")],
                CommandReason::Malformed,
            ),
            (
                &[imei, ("command", "a"), ("ttl", "0")],
                CommandReason::Malformed,
            ),
            (
                &[imei, ("id", "a{b}"), ("command", "a")],
                CommandReason::Malformed,
            ),
        ];
        for (fields, reason) in cases {
            assert_eq!(entry(fields).reject, Some(reason), "{fields:?}");
        }
        let big = "x".repeat(MAX_COMMAND_BYTES + 1);
        assert_eq!(
            entry(&[imei, ("command", &big)]).reject,
            Some(CommandReason::TooLarge)
        );
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex("00ab0F"), Some(vec![0, 0xab, 0x0f]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(hex(&[1, 0xfe]), "01fe");
    }
}
