//! The GT06 frame decoder on arbitrary bytes, fed in arbitrary chunks.
//!
//! Invariants: no panic; bytes are conserved (consumed + buffered = fed); while waiting the
//! decoder holds less than the limit; every accepted frame re-encodes to exactly the bytes it
//! was decoded from, and its packet decode never panics.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use trackgate_protocol::Limits;
use trackgate_protocol::gt06::{FrameDecoder, Packet, UtcOffset, encode_frame};

fuzz_target!(|data: &[u8]| {
    let [a, b, c, rest @ ..] = data else { return };
    let chunk = usize::from(*a).max(1);
    let limit = usize::from(u16::from_be_bytes([*b, *c])).max(10);
    let mut dec = FrameDecoder::new(Limits::new(limit));
    let mut buf = BytesMut::new();
    let (mut fed, mut consumed) = (0usize, 0usize);
    'feed: for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before - buf.len();
                    let original = &rest[consumed..consumed + used];
                    consumed += used;
                    let mut again = BytesMut::new();
                    encode_frame(&frame, &mut again).unwrap();
                    assert_eq!(&again[..], original, "re-encoding differs");
                    assert!(used <= limit);
                    let _ = Packet::decode(&frame, UtcOffset::UTC);
                }
                Ok(None) => {
                    assert!(buf.len() < limit.max(4), "buffered {} with limit {limit}", buf.len());
                    break;
                }
                Err(e) => {
                    assert!(!e.reason().is_empty());
                    break 'feed;
                }
            }
            assert_eq!(consumed + buf.len(), fed, "bytes not conserved");
        }
    }
});
