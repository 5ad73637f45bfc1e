//! The login decoder on arbitrary bytes in arbitrary chunks.
//!
//! Invariants: no panic; it never waits with more than a login frame buffered; an accepted
//! login consumed exactly 17 bytes, which `encode_login` reproduces.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use trackgate_protocol::{Imei, Limits, LoginDecoder, encode_login};

fuzz_target!(|data: &[u8]| {
    let [a, rest @ ..] = data else { return };
    let chunk = usize::from(*a).max(1);
    let mut dec = LoginDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        let before = buf.len();
        match dec.decode(&mut buf) {
            Ok(Some(imei)) => {
                assert_eq!(before - buf.len(), 17);
                let mut again = BytesMut::new();
                encode_login(&imei, &mut again);
                assert_eq!(&again[..], &rest[..17]);
                assert_eq!(Imei::parse(imei.as_str()), Ok(imei));
                return;
            }
            Ok(None) => assert!(buf.len() < 17),
            Err(e) => {
                assert!(!e.reason().is_empty());
                return;
            }
        }
    }
});
