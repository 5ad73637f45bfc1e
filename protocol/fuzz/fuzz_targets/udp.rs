//! The UDP datagram decoder on arbitrary bytes.
//!
//! Invariants: no panic; an accepted datagram re-encodes to the same bytes (except the
//! not-usable byte, which encoders always write as 0x01); the ack echoes both ids.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use trackgate_protocol::{Limits, decode_udp, encode_udp, udp_ack};

fuzz_target!(|data: &[u8]| {
    match decode_udp(data, &Limits::default()) {
        Ok(d) => {
            let mut again = BytesMut::new();
            encode_udp(&d, &mut again).unwrap();
            let mut expected = data.to_vec();
            expected[4] = 0x01;
            assert_eq!(&again[..], &expected[..]);
            let ack = udp_ack(d.packet_id, d.avl_packet_id, 1);
            assert_eq!(ack[2..4], data[2..4]);
            assert_eq!(ack[5], data[5]);
        }
        Err(e) => assert!(!e.reason().is_empty()),
    }
});
