//! The data-field parsers (AVL codecs 8/8E/16 and commands 12-15) behind a valid envelope:
//! the input is wrapped with preamble, length and a correct CRC so the fuzzer reaches the
//! body parsers instead of stopping at the checksum.
//!
//! Invariants: no panic; an accepted body re-encodes byte-exact; records round-trip.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use trackgate_protocol::{Frame, FrameDecoder, Limits, crc16_ibm, encode_avl, encode_command};

fuzz_target!(|data: &[u8]| {
    let Ok(len) = u32::try_from(data.len()) else {
        return;
    };
    let mut frame = BytesMut::with_capacity(data.len() + 12);
    frame.put_u32(0);
    frame.put_u32(len);
    frame.put_slice(data);
    frame.put_u32(u32::from(crc16_ibm(data)));
    let original = frame.clone();
    let mut dec = FrameDecoder::new(Limits::new(usize::MAX));
    match dec.decode_eof(&mut frame) {
        Ok(Some(f)) => {
            assert!(frame.is_empty());
            let mut again = BytesMut::new();
            match &f {
                Frame::Avl(p) => encode_avl(p, &mut again).unwrap(),
                Frame::Command(c) => encode_command(c, &mut again).unwrap(),
                Frame::KeepAlive => unreachable!("a frame with a zero preamble"),
            }
            assert_eq!(again, original, "re-encoding differs");
        }
        Ok(None) => unreachable!("a whole frame was given"),
        Err(e) => {
            // Only body errors are possible past a valid envelope.
            assert!(
                !matches!(
                    e.reason(),
                    "bad_preamble" | "too_large" | "crc" | "incomplete"
                ),
                "{e}"
            );
        }
    }
});
