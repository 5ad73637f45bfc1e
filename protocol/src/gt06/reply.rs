//! The server's replies: the echo `78 78 05 <protocol> <serial> <CRC> 0D 0A` that a GT06
//! device waits for after a login, a heartbeat or an alarm.

use super::{Frame, crc_itu};

/// Bytes of every reply.
pub const REPLY_LEN: usize = 10;

/// Whether a device waits for a reply to this protocol number: the login (`0x01`), the
/// heartbeats (`0x13`, `0x23`) and the alarms (`0x16`, `0x26`, `0x27`). A device that gets
/// none resends (alarms) or drops the link after a few tries (login, heartbeat).
///
/// Locations (`0x12`, `0x22`, …) need none in the Concox documents; traccar replies to them
/// anyway, which devices tolerate.
pub fn needs_reply(protocol: u8) -> bool {
    matches!(protocol, 0x01 | 0x13 | 0x23 | 0x16 | 0x26 | 0x27)
}

/// The reply to a packet of `protocol` with serial number `serial`.
///
/// ```
/// // PROTOCOL.md §4: the reply to login 78780D01086471700328358100093F040D0A.
/// let r = trackgate_protocol::gt06::reply(0x01, 0x0009);
/// assert_eq!(r, [0x78, 0x78, 0x05, 0x01, 0x00, 0x09, 0x55, 0x94, 0x0D, 0x0A]);
/// ```
pub fn reply(protocol: u8, serial: u16) -> [u8; REPLY_LEN] {
    let [s0, s1] = serial.to_be_bytes();
    let mut out = [0x78, 0x78, 0x05, protocol, s0, s1, 0, 0, 0x0D, 0x0A];
    let [c0, c1] = crc_itu(&out[2..6]).to_be_bytes();
    out[6] = c0;
    out[7] = c1;
    out
}

/// The reply `frame` asks for, if it asks for one ([`needs_reply`]).
pub fn reply_to(frame: &Frame) -> Option<[u8; REPLY_LEN]> {
    needs_reply(frame.protocol).then(|| reply(frame.protocol, frame.serial))
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::*;
    use crate::gt06::FrameDecoder;
    use crate::test_util::hex;

    #[test]
    fn login_reply_matches_the_worked_example() {
        assert_eq!(reply(0x01, 9)[..], hex("78780501000955940D0A")[..]);
    }

    /// A reply is itself a valid frame with an empty content (what the simulator reads).
    #[test]
    fn replies_decode_as_frames() {
        for p in [0x01, 0x13, 0x23, 0x16, 0x26, 0x27] {
            let r = reply(p, 0xBEEF);
            let f = FrameDecoder::default()
                .decode(&mut BytesMut::from(&r[..]))
                .unwrap()
                .unwrap();
            assert_eq!((f.protocol, f.serial, &f.content[..]), (p, 0xBEEF, &[][..]));
            assert_eq!(reply_to(&f), Some(r));
        }
        let loc = Frame {
            extended: false,
            protocol: 0x12,
            content: Bytes::new(),
            serial: 1,
        };
        assert_eq!(reply_to(&loc), None);
    }
}
