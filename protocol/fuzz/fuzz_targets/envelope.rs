//! The TCP frame decoder on arbitrary bytes, fed in arbitrary chunks.
//!
//! Invariants: no panic; bytes are conserved (consumed + buffered = fed); while waiting the
//! decoder never holds a whole frame's worth past the limit; every accepted frame re-encodes
//! to exactly the bytes it was decoded from (the decoder is canonical).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use trackgate_protocol::{Frame, FrameDecoder, Limits, encode_avl, encode_command};

fuzz_target!(|data: &[u8]| {
    let [a, b, c, rest @ ..] = data else { return };
    let chunk = usize::from(*a).max(1);
    let limit = usize::from(u16::from_be_bytes([*b, *c])).max(12);
    let mut dec = FrameDecoder::new(Limits::new(limit));
    let mut buf = BytesMut::new();
    let mut fed = 0usize;
    let mut consumed = 0usize;
    'feed: for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let used = before - buf.len();
                    let start = consumed;
                    consumed += used;
                    let original = &rest[start..consumed];
                    let mut again = BytesMut::new();
                    match &frame {
                        Frame::KeepAlive => again.extend_from_slice(&[0xFF]),
                        Frame::Avl(p) => encode_avl(p, &mut again).unwrap(),
                        Frame::Command(c) => encode_command(c, &mut again).unwrap(),
                    }
                    assert_eq!(&again[..], original, "re-encoding differs");
                    assert!(used <= limit.max(1));
                }
                Ok(None) => {
                    assert!(
                        buf.len() < limit.max(8),
                        "buffered {} with limit {limit}",
                        buf.len()
                    );
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
