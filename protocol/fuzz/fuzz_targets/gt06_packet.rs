//! The GT06 packet decoder behind a valid frame: the first byte is the protocol number, the
//! second picks the UTC offset, the rest is the content, so the fuzzer reaches every layout
//! instead of stopping at the CRC.
//!
//! Invariants: no panic; only a login can fail; a decoded packet re-encodes to exactly the
//! content (at the same offset) and keeps its protocol number.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use trackgate_protocol::gt06::{Frame, Packet, UtcOffset};

fuzz_target!(|data: &[u8]| {
    let [protocol, zone, content @ ..] = data else { return };
    // -14 h … +14 h in 7-minute steps.
    let minutes = (i16::from(*zone as i8) * 7).clamp(-UtcOffset::MAX_MINUTES, UtcOffset::MAX_MINUTES);
    let offset = UtcOffset::from_minutes(minutes).unwrap();
    let frame = Frame {
        extended: content.len() > 250,
        protocol: *protocol,
        content: Bytes::copy_from_slice(content),
        serial: 0,
    };
    match Packet::decode(&frame, offset) {
        Ok(p) => {
            assert_eq!(p.protocol(), *protocol);
            let mut again = BytesMut::new();
            p.encode_content(offset, &mut again).unwrap();
            assert_eq!(&again[..], content, "re-encoding differs");
        }
        Err(e) => assert_eq!(*protocol, 0x01, "{e}"),
    }
});
