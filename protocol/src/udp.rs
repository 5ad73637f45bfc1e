//! UDP datagrams: no preamble and no CRC, the IMEI in every datagram, a 7-byte ack.
//!
//! `length u16 | packet id u16 | not-usable u8 | AVL packet id u8 | IMEI length u16 | IMEI |
//! codec | N1 | records | N2`, where `length` counts every byte after itself.

use bytes::{BufMut, Bytes, BytesMut};

use crate::login::IMEI_LEN;
use crate::reader::Reader;
use crate::{AvlPacket, EncodeError, FrameError, Imei, Limits, avl};

/// The byte between the packet id and the AVL packet id that encoders write. Wiki revisions
/// show both 0x00 and 0x01 here, so the decoder accepts any value.
const NOT_USABLE: u8 = 0x01;

/// One decoded UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    /// Transport-level id, echoed in the ack.
    pub packet_id: u16,
    /// AVL packet id, echoed in the ack; devices retry until they see it.
    pub avl_packet_id: u8,
    /// The sending device.
    pub imei: Imei,
    /// The records.
    pub packet: AvlPacket,
}

/// Decodes one datagram.
///
/// # Errors
/// A datagram over the limit, a length field that disagrees with the datagram size, a bad
/// IMEI, a non-AVL codec, or any AVL body error (offsets are from the start of the datagram).
pub fn decode_udp(datagram: &[u8], limits: &Limits) -> Result<UdpDatagram, FrameError> {
    if datagram.len() > limits.max_frame_bytes {
        return Err(FrameError::TooLarge {
            len: datagram.len() as u64,
            max: limits.max_frame_bytes,
        });
    }
    // NB: one copy, so that variable-length IO values can be zero-copy slices of it.
    let buf = Bytes::copy_from_slice(datagram);
    let mut r = Reader::new(&buf, 0, buf.len());
    let declared = r.u16()?;
    let actual = r.remaining();
    if usize::from(declared) != actual {
        return Err(FrameError::UdpLength { declared, actual });
    }
    let packet_id = r.u16()?;
    let _not_usable = r.u8()?;
    let avl_packet_id = r.u8()?;
    let imei_len_at = r.pos();
    let imei_len = r.u16()?;
    if usize::from(imei_len) != IMEI_LEN {
        return Err(FrameError::ImeiLength {
            len: imei_len,
            offset: imei_len_at,
        });
    }
    let imei_at = r.pos();
    let imei = Imei::from_ascii(r.slice(IMEI_LEN)?, imei_at)?;
    let packet = avl::decode_packet(&mut r)?;
    Ok(UdpDatagram {
        packet_id,
        avl_packet_id,
        imei,
        packet,
    })
}

/// Appends a whole datagram.
///
/// # Errors
/// As [`crate::encode_avl`], plus [`EncodeError::TooLong`] past the u16 length; `dst` is left
/// as it was.
pub fn encode_udp(datagram: &UdpDatagram, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_u16(0);
    dst.put_u16(datagram.packet_id);
    dst.put_u8(NOT_USABLE);
    dst.put_u8(datagram.avl_packet_id);
    dst.put_u16(IMEI_LEN as u16);
    dst.put_slice(datagram.imei.as_str().as_bytes());
    if let Err(e) = avl::encode_packet(&datagram.packet, dst) {
        dst.truncate(start);
        return Err(e);
    }
    let body_len = dst.len() - start - 2;
    let Ok(len) = u16::try_from(body_len) else {
        dst.truncate(start);
        return Err(EncodeError::TooLong { len: body_len });
    };
    dst[start..start + 2].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// The server's ack: `0005 | packet id | 01 | AVL packet id | accepted count`.
pub fn udp_ack(packet_id: u16, avl_packet_id: u8, accepted: u8) -> [u8; 7] {
    let [p0, p1] = packet_id.to_be_bytes();
    [0x00, 0x05, p0, p1, 0x01, avl_packet_id, accepted]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Codec;
    use crate::test_util::hex;

    const WIKI_UDP: &str = "003DCAFE0105000F33353230393330383634303336353508010000016B4F815B30010000000000000000000000000000000103021503010101425DBC000001";

    #[test]
    fn wiki_datagram_and_ack() {
        let bytes = hex(WIKI_UDP);
        let d = decode_udp(&bytes, &Limits::default()).unwrap();
        assert_eq!(d.packet_id, 0xCAFE);
        assert_eq!(d.avl_packet_id, 0x05);
        assert_eq!(d.imei.as_str(), "352093086403655");
        assert_eq!(d.packet.codec, Codec::Codec8);
        assert_eq!(d.packet.records.len(), 1);
        assert_eq!(
            udp_ack(d.packet_id, d.avl_packet_id, 1),
            hex("0005CAFE010501")[..]
        );
        let mut out = BytesMut::new();
        encode_udp(&d, &mut out).unwrap();
        assert_eq!(&out[..], &bytes[..]);
    }

    #[test]
    fn not_usable_byte_zero_is_accepted() {
        let mut bytes = hex(WIKI_UDP);
        bytes[4] = 0;
        assert!(decode_udp(&bytes, &Limits::default()).is_ok());
    }

    #[test]
    fn length_mismatch() {
        let mut bytes = hex(WIKI_UDP);
        bytes.push(0);
        let err = decode_udp(&bytes, &Limits::default()).unwrap_err();
        assert_eq!(err.reason(), "udp_length");
    }

    #[test]
    fn over_limit() {
        let bytes = hex(WIKI_UDP);
        let err = decode_udp(&bytes, &Limits::new(10)).unwrap_err();
        assert_eq!(err.reason(), "too_large");
    }

    #[test]
    fn command_codec_is_unexpected() {
        let mut bytes = hex(WIKI_UDP);
        bytes[23] = 0x0C;
        let err = decode_udp(&bytes, &Limits::default()).unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("unexpected_codec", Some(23)));
    }
}
