//! GT06 packets the integration tests send by hand: PROTOCOL.md §4's login and traccar's
//! `0x12` vector 97 of the same device, and a heartbeat.

use bytes::{Bytes, BytesMut};
use trackgate_protocol::gt06::{self, Frame};

/// The device of [`LOGIN`] and [`LOCATION`].
pub const IMEI: &str = "864717003283581";
/// PROTOCOL.md §4's login of [`IMEI`], serial 9.
pub const LOGIN: &str = "78780D01086471700328358100093F040D0A";
/// traccar's `0x12` vector 97: the device's clock reads 2015-08-27 18:29:55, at 16.6347089 N,
/// 80.9670756 E.
pub const LOCATION: &str =
    "787823120F081B121D37CB01C8E2CC08AFD3C020D50201940701D600A1190041EE100576D1470D0A";

/// Bytes from a hex string.
///
/// # Panics
/// On a character that is not a hex digit.
pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
        .collect()
}

/// A status heartbeat (`0x13`) with serial `serial`, which the listener echoes.
///
/// # Panics
/// Never for this fixed content (the encoder refuses only oversized frames).
pub fn heartbeat(serial: u16) -> Vec<u8> {
    let frame = Frame {
        extended: false,
        protocol: 0x13,
        content: Bytes::from_static(&[0x44, 0x06, 0x04, 0x00, 0x02]),
        serial,
    };
    let mut out = BytesMut::new();
    gt06::encode_frame(&frame, &mut out).expect("a heartbeat encodes");
    out.to_vec()
}
