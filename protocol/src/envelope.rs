//! TCP framing after login: `00000000 | data length u32 | data | CRC u32`, where the CRC is
//! CRC-16/IBM of the data in the low two bytes, and a lone `0xFF` is a keep-alive.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::reader::Reader;
use crate::{
    AvlPacket, Codec, Command, EncodeError, Frame, FrameError, Limits, avl, command, crc16_ibm,
};

/// Preamble (4) + data length (4).
const HEAD_LEN: usize = 8;
/// Preamble, data length and CRC around the data field.
const OVERHEAD: usize = HEAD_LEN + 4;
/// Codec id, N1, N2: the smallest data field that can mean anything.
const MIN_DATA_LEN: u32 = 3;
/// The keep-alive byte.
const KEEP_ALIVE: u8 = 0xFF;

// === Decoder ===

/// Incremental decoder for the frames a device sends after login.
///
/// Contract (tokio-util's `Decoder`): `Ok(None)` means "need more bytes" (it may reserve the
/// rest of the current frame, never more than the limit); `Ok(Some(frame))` has split exactly
/// one frame off the front of the buffer; `Err` means the connection is over.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    limits: Limits,
    state: State,
}

#[derive(Debug, Clone, Copy, Default)]
enum State {
    /// Waiting for a keep-alive or the 8-byte head of a frame.
    #[default]
    Head,
    /// The head was validated; the whole frame is `len` bytes.
    Body { len: usize },
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            state: State::Head,
        }
    }

    /// Decodes the next frame from the front of `src`.
    ///
    /// # Errors
    /// A bad preamble or a data length over the limit fails as soon as the 8-byte head
    /// arrives, before anything is reserved. A delimited frame whose CRC, codec or body is
    /// wrong fails once it is complete (it has been removed from `src`).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let len = match self.state {
            State::Body { len } => len,
            State::Head => {
                let Some(&first) = src.first() else {
                    return Ok(None);
                };
                if first == KEEP_ALIVE {
                    src.advance(1);
                    return Ok(Some(Frame::KeepAlive));
                }
                // Fail on a non-zero preamble byte as soon as it arrives.
                let seen = src.len().min(4);
                if let Some(i) = src[..seen].iter().position(|&b| b != 0) {
                    return Err(FrameError::Preamble { offset: i });
                }
                let Some(head) = src.get(4..HEAD_LEN) else {
                    return Ok(None);
                };
                let data_len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
                let len = frame_len(data_len, &self.limits)?;
                self.state = State::Body { len };
                len
            }
        };
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        self.state = State::Head;
        let frame = src.split_to(len).freeze();
        parse_frame(&frame).map(Some)
    }

    /// Like [`FrameDecoder::decode`], for when the peer has closed: leftover bytes that do not
    /// make a whole frame are an error.
    ///
    /// # Errors
    /// As `decode`, plus [`FrameError::Incomplete`] for a half frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Incomplete { have: src.len() }),
        }
    }
}

/// Whole frame length for a data length, checked against the limit.
fn frame_len(data_len: u32, limits: &Limits) -> Result<usize, FrameError> {
    if data_len < MIN_DATA_LEN {
        return Err(FrameError::BadLength { len: data_len });
    }
    let total = u64::from(data_len) + OVERHEAD as u64;
    match usize::try_from(total) {
        Ok(len) if len <= limits.max_frame_bytes => Ok(len),
        _ => Err(FrameError::TooLarge {
            len: total,
            max: limits.max_frame_bytes,
        }),
    }
}

/// Checks the CRC of a complete frame, then decodes its data field.
fn parse_frame(frame: &Bytes) -> Result<Frame, FrameError> {
    let crc_at = frame.len().saturating_sub(4);
    let data = frame
        .get(HEAD_LEN..crc_at)
        .ok_or(FrameError::Truncated { offset: HEAD_LEN })?;
    let received = frame
        .get(crc_at..)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(FrameError::Truncated { offset: crc_at })?;
    let computed = crc16_ibm(data);
    if received != u32::from(computed) {
        return Err(FrameError::Crc {
            offset: crc_at,
            received,
            computed,
        });
    }
    let Some(&id) = data.first() else {
        return Err(FrameError::Truncated { offset: HEAD_LEN });
    };
    let codec = Codec::from_id(id).ok_or(FrameError::UnknownCodec {
        id,
        offset: HEAD_LEN,
    })?;
    let mut r = Reader::new(frame, HEAD_LEN, crc_at);
    if codec.is_avl() {
        avl::decode_packet(&mut r).map(Frame::Avl)
    } else {
        r.u8()?;
        command::decode_command(codec, &mut r).map(Frame::Command)
    }
}

// === Encoders ===

/// The server's ack of an AVL frame: the number of records accepted, u32 big-endian.
/// A count other than the frame's makes the device resend the whole frame.
pub fn encode_ack(count: u32) -> [u8; 4] {
    count.to_be_bytes()
}

/// Appends a whole TCP AVL frame (preamble, length, data, CRC).
///
/// # Errors
/// When a record does not fit the codec (see [`EncodeError`]); `dst` is left as it was.
pub fn encode_avl(packet: &AvlPacket, dst: &mut BytesMut) -> Result<(), EncodeError> {
    write_frame(dst, |d| avl::encode_packet(packet, d))
}

/// Appends a whole TCP command frame (Codec 12, 13, 14 or 15).
///
/// # Errors
/// An AVL codec, or a missing IMEI/timestamp for a codec that carries one; `dst` is left as
/// it was.
pub fn encode_command(cmd: &Command, dst: &mut BytesMut) -> Result<(), EncodeError> {
    write_frame(dst, |d| command::encode_command_body(cmd, d))
}

/// Writes the head, lets `body` append the data field, then backfills the length and CRC.
fn write_frame(
    dst: &mut BytesMut,
    body: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.put_bytes(0, HEAD_LEN);
    if let Err(e) = body(dst) {
        dst.truncate(start);
        return Err(e);
    }
    let data_start = start + HEAD_LEN;
    let data_len = dst.len() - data_start;
    let Ok(len) = u32::try_from(data_len) else {
        dst.truncate(start);
        return Err(EncodeError::TooLong { len: data_len });
    };
    dst[start + 4..data_start].copy_from_slice(&len.to_be_bytes());
    let crc = crc16_ibm(&dst[data_start..]);
    dst.put_u32(u32::from(crc));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::hex;

    const WIKI_8: &str = "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF";

    #[test]
    fn wiki_codec8_then_keepalive_in_one_buffer() {
        let mut buf = BytesMut::from(&hex(WIKI_8)[..]);
        buf.put_u8(0xFF);
        let mut dec = FrameDecoder::default();
        let Some(Frame::Avl(p)) = dec.decode(&mut buf).unwrap() else {
            panic!("expected AVL")
        };
        assert_eq!((p.codec, p.records.len()), (Codec::Codec8, 1));
        assert_eq!(p.records[0].timestamp_ms, 1_560_161_086_000);
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(Frame::KeepAlive));
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert_eq!(dec.decode_eof(&mut buf).unwrap(), None);
    }

    #[test]
    fn byte_at_a_time_yields_the_frame_once() {
        let bytes = hex(WIKI_8);
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut frames = 0;
        for b in bytes {
            buf.put_u8(b);
            while let Some(_f) = dec.decode(&mut buf).unwrap() {
                frames += 1;
            }
        }
        assert_eq!((frames, buf.len()), (1, 0));
    }

    /// An oversized length must fail on the head alone, without reserving the body.
    #[test]
    fn too_large_fails_before_reserving() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF][..]);
        let cap = buf.capacity();
        let err = FrameDecoder::new(Limits::new(1280))
            .decode(&mut buf)
            .unwrap_err();
        assert_eq!(err.reason(), "too_large");
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn limit_is_inclusive_of_the_whole_frame() {
        let bytes = hex(WIKI_8);
        let mut exact = FrameDecoder::new(Limits::new(bytes.len()));
        assert!(
            exact
                .decode(&mut BytesMut::from(&bytes[..]))
                .unwrap()
                .is_some()
        );
        let mut short = FrameDecoder::new(Limits::new(bytes.len() - 1));
        let err = short.decode(&mut BytesMut::from(&bytes[..])).unwrap_err();
        assert_eq!(err.reason(), "too_large");
    }

    #[test]
    fn bad_preamble_fails_on_first_byte() {
        let err = FrameDecoder::default()
            .decode(&mut BytesMut::from(&[0x00, 0x12][..]))
            .unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("bad_preamble", Some(1)));
    }

    #[test]
    fn crc_error_names_the_crc_offset_and_consumes_the_frame() {
        let mut bytes = hex(WIKI_8);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let mut buf = BytesMut::from(&bytes[..]);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("crc", Some(bytes.len() - 4)));
        assert!(buf.is_empty());
    }

    #[test]
    fn half_frame_at_eof() {
        let bytes = hex(WIKI_8);
        let mut buf = BytesMut::from(&bytes[..20]);
        let err = FrameDecoder::default().decode_eof(&mut buf).unwrap_err();
        assert_eq!(err.reason(), "incomplete");
    }

    #[test]
    fn codec7_is_unknown() {
        let mut buf = BytesMut::new();
        let data = [0x07, 0x00, 0x00];
        buf.put_u32(0);
        buf.put_u32(3);
        buf.put_slice(&data);
        buf.put_u32(u32::from(crc16_ibm(&data)));
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("unknown_codec", Some(8)));
    }

    #[test]
    fn encode_avl_matches_wiki_bytes() {
        let bytes = hex(WIKI_8);
        let Some(Frame::Avl(p)) = FrameDecoder::default()
            .decode(&mut BytesMut::from(&bytes[..]))
            .unwrap()
        else {
            panic!("expected AVL")
        };
        let mut out = BytesMut::new();
        encode_avl(&p, &mut out).unwrap();
        assert_eq!(&out[..], &bytes[..]);
    }

    #[test]
    fn failed_encode_leaves_dst_untouched() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let bad = AvlPacket {
            codec: Codec::Codec12,
            records: vec![],
        };
        assert!(encode_avl(&bad, &mut out).is_err());
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn ack_is_big_endian_count() {
        assert_eq!(encode_ack(2), [0, 0, 0, 2]);
    }
}
