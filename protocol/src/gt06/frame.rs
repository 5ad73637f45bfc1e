//! GT06 framing: `78 78 | len u8 | protocol | content | serial u16 | CRC u16 | 0D 0A`, or the
//! extended `79 79 | len u16 | …` form. `len` counts protocol … CRC; the CRC is CRC-ITU
//! (CRC-16/X-25) over the length field … serial.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Gt06EncodeError, Gt06Error};
use crate::Limits;

/// Start bits of the short form (1-byte length).
const SHORT: u8 = 0x78;
/// Start bits of the extended form (2-byte length).
const EXTENDED: u8 = 0x79;
/// The stop bits.
const STOP: [u8; 2] = [0x0D, 0x0A];
/// Protocol number (1) + serial (2) + CRC (2): the smallest length field that means anything.
const MIN_LEN: u16 = 5;
/// Largest content of a short frame: 255 less protocol, serial and CRC.
pub(super) const MAX_SHORT_CONTENT: usize = 255 - MIN_LEN as usize;

// === Frame ===

/// One delimited GT06 frame, CRC and stop bits checked; its content is not yet interpreted
/// (that is [`crate::gt06::Packet::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// `79 79` start bits and a 2-byte length (`78 78` and 1 byte otherwise).
    pub extended: bool,
    /// The protocol number, the byte after the length: what the content is.
    pub protocol: u8,
    /// Everything between the protocol number and the serial number.
    pub content: Bytes,
    /// The information serial number; the server's reply echoes it.
    pub serial: u16,
}

impl Frame {
    /// Bytes the frame takes on the wire.
    pub fn wire_len(&self) -> usize {
        let head = if self.extended { 4 } else { 3 };
        head + 1 + self.content.len() + 2 + 2 + 2
    }
}

/// Appends `frame` with its length, CRC and stop bits.
///
/// # Errors
/// [`Gt06EncodeError::TooLong`] when the content does not fit the length field; `dst` is left
/// as it was.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) -> Result<(), Gt06EncodeError> {
    let len = frame.content.len() + usize::from(MIN_LEN);
    let too_long = Gt06EncodeError::TooLong {
        len: frame.content.len(),
    };
    let start = dst.len();
    // Checked before anything is written, so a refused frame leaves `dst` as it was.
    let max = if frame.extended {
        usize::from(u16::MAX)
    } else {
        usize::from(u8::MAX)
    };
    if len > max {
        return Err(too_long);
    }
    dst.reserve(frame.wire_len());
    if frame.extended {
        dst.put_slice(&[EXTENDED, EXTENDED]);
        dst.put_u16(len as u16);
    } else {
        dst.put_slice(&[SHORT, SHORT]);
        dst.put_u8(len as u8);
    }
    dst.put_u8(frame.protocol);
    dst.put_slice(&frame.content);
    dst.put_u16(frame.serial);
    let crc = crc_itu(&dst[start + 2..]);
    dst.put_u16(crc);
    dst.put_slice(&STOP);
    Ok(())
}

// === Decoder ===

/// Incremental decoder for the GT06 frames a device sends, login included.
///
/// Contract (tokio-util's `Decoder`, as [`crate::FrameDecoder`]): `Ok(None)` means "need more
/// bytes" (it may reserve the rest of the current frame, never past the limit);
/// `Ok(Some(frame))` has split exactly one frame off the front of `src`; `Err` means the
/// connection is over.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    limits: Limits,
    /// Whole length of the frame at the front of the buffer, once its head was validated.
    pending: Option<usize>,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            pending: None,
        }
    }

    /// Decodes the next frame from the front of `src`.
    ///
    /// # Errors
    /// Bad start bits fail as soon as they arrive; a length below 5 or a frame over the limit
    /// fails on the head, before anything is reserved. Stop bits and then the CRC are checked
    /// once the frame is complete (it has been removed from `src`).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Gt06Error> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                let Some(len) = self.head(src)? else {
                    return Ok(None);
                };
                self.pending = Some(len);
                len
            }
        };
        if src.len() < len {
            src.reserve(len - src.len());
            return Ok(None);
        }
        self.pending = None;
        let frame = src.split_to(len).freeze();
        parse(frame).map(Some)
    }

    /// Like [`FrameDecoder::decode`], for when the peer has closed: leftover bytes that do not
    /// make a whole frame are an error.
    ///
    /// # Errors
    /// As `decode`, plus [`Gt06Error::Incomplete`] for a half frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Gt06Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(Gt06Error::Incomplete { have: src.len() }),
        }
    }

    /// The whole frame length once the start bits and length field are in; checks them.
    fn head(&self, src: &BytesMut) -> Result<Option<usize>, Gt06Error> {
        let Some(&first) = src.first() else {
            return Ok(None);
        };
        if first != SHORT && first != EXTENDED {
            return Err(Gt06Error::StartBits { offset: 0 });
        }
        match src.get(1) {
            None => return Ok(None),
            Some(&b) if b != first => return Err(Gt06Error::StartBits { offset: 1 }),
            Some(_) => {}
        }
        let (len, head) = if first == SHORT {
            let Some(&l) = src.get(2) else {
                return Ok(None);
            };
            (u16::from(l), 3)
        } else {
            let Some(l) = src.get(2..4) else {
                return Ok(None);
            };
            (u16::from_be_bytes([l[0], l[1]]), 4)
        };
        if len < MIN_LEN {
            return Err(Gt06Error::BadLength { len, offset: 2 });
        }
        // Start bits + length field + len + stop bits: at most 65,541, no overflow.
        let total = head + usize::from(len) + STOP.len();
        if total > self.limits.max_frame_bytes {
            return Err(Gt06Error::TooLarge {
                len: total,
                max: self.limits.max_frame_bytes,
            });
        }
        Ok(Some(total))
    }
}

/// Checks the stop bits and CRC of a whole frame (head already validated) and splits it.
fn parse(mut frame: Bytes) -> Result<Frame, Gt06Error> {
    let extended = frame.first() == Some(&EXTENDED);
    let head = if extended { 4 } else { 3 };
    let stop_at = frame.len() - STOP.len();
    if frame[stop_at..] != STOP {
        return Err(Gt06Error::StopBits { offset: stop_at });
    }
    let crc_at = stop_at - 2;
    let received = u16::from_be_bytes([frame[crc_at], frame[crc_at + 1]]);
    let computed = crc_itu(&frame[2..crc_at]);
    if received != computed {
        return Err(Gt06Error::Crc {
            offset: crc_at,
            received,
            computed,
        });
    }
    // The head guaranteed len >= 5, so protocol and serial are there.
    let serial = u16::from_be_bytes([frame[crc_at - 2], frame[crc_at - 1]]);
    frame.truncate(crc_at - 2);
    frame.advance(head);
    let protocol = frame.get_u8();
    Ok(Frame {
        extended,
        protocol,
        content: frame,
        serial,
    })
}

// === CRC-ITU ===

/// CRC-16/X-25 (the "CRC-ITU" of the GT06 documents): poly 0x1021 reflected (0x8408), init
/// and final xor 0xFFFF.
///
/// ```
/// assert_eq!(trackgate_protocol::gt06::crc_itu(b"123456789"), 0x906E);
/// ```
pub fn crc_itu(data: &[u8]) -> u16 {
    let mut crc = 0xFFFF_u16;
    for &b in data {
        crc = (crc >> 8) ^ X25_TABLE[usize::from((crc ^ u16::from(b)) & 0xFF)];
    }
    !crc
}

/// Byte table of the reflected polynomial, built at compile time (512 B). GT06 frames are
/// short (tens of bytes), so the plain table loop is enough.
static X25_TABLE: [u16; 256] = crate::crc::reflected_table(0x8408);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::hex;

    /// PROTOCOL.md §4's login (IMEI 864717003283581, serial 9, CRC 0x3F04).
    const LOGIN: &str = "78780D01086471700328358100093F040D0A";

    /// CRC-16/X-25 bit by bit: init 0xFFFF, final xor 0xFFFF.
    fn bitwise(data: &[u8]) -> u16 {
        !crate::crc::bitwise_reflected(0x8408, 0xFFFF, data)
    }

    #[test]
    fn crc_check_value_and_table() {
        assert_eq!(crc_itu(b"123456789"), 0x906E);
        let data: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37) ^ 0xA5).collect();
        for n in 0..data.len() {
            assert_eq!(crc_itu(&data[..n]), bitwise(&data[..n]));
        }
    }

    #[test]
    fn login_frame_splits_and_re_encodes() {
        let bytes = hex(LOGIN);
        let mut buf = BytesMut::from(&bytes[..]);
        buf.extend_from_slice(&[0x78]);
        let f = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!((f.extended, f.protocol, f.serial), (false, 0x01, 9));
        assert_eq!(f.content.len(), 8);
        assert_eq!(&buf[..], &[0x78]);
        let mut out = BytesMut::new();
        encode_frame(&f, &mut out).unwrap();
        assert_eq!(&out[..], &bytes[..]);
        assert_eq!(f.wire_len(), bytes.len());
    }

    #[test]
    fn byte_at_a_time_yields_the_frame_once() {
        let mut dec = FrameDecoder::default();
        let mut buf = BytesMut::new();
        let mut frames = 0;
        for b in hex(LOGIN) {
            buf.put_u8(b);
            while dec.decode(&mut buf).unwrap().is_some() {
                frames += 1;
            }
        }
        assert_eq!((frames, buf.len()), (1, 0));
    }

    #[test]
    fn bad_start_bits_fail_on_the_byte() {
        let err = FrameDecoder::default()
            .decode(&mut BytesMut::from(&[0x78, 0x79][..]))
            .unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("start_bits", Some(1)));
        // A Teltonika login (000F…) is turned away on its first byte.
        let err = FrameDecoder::default()
            .decode(&mut BytesMut::from(&[0x00][..]))
            .unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("start_bits", Some(0)));
    }

    /// An extended length over the limit fails on the head alone, without reserving the body.
    #[test]
    fn too_large_fails_before_reserving() {
        let mut buf = BytesMut::from(&[0x79, 0x79, 0xFF, 0xFF][..]);
        let cap = buf.capacity();
        let err = FrameDecoder::new(Limits::new(1024))
            .decode(&mut buf)
            .unwrap_err();
        assert_eq!(
            err,
            Gt06Error::TooLarge {
                len: 65541,
                max: 1024
            }
        );
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn limit_is_inclusive_of_the_whole_frame() {
        let bytes = hex(LOGIN);
        let ok =
            FrameDecoder::new(Limits::new(bytes.len())).decode(&mut BytesMut::from(&bytes[..]));
        assert!(ok.unwrap().is_some());
        let err = FrameDecoder::new(Limits::new(bytes.len() - 1))
            .decode(&mut BytesMut::from(&bytes[..]))
            .unwrap_err();
        assert_eq!(err.reason(), "too_large");
    }

    #[test]
    fn short_length_is_refused() {
        let err = FrameDecoder::default()
            .decode(&mut BytesMut::from(&[0x78, 0x78, 0x04][..]))
            .unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("bad_length", Some(2)));
    }

    #[test]
    fn stop_bits_then_crc_are_checked() {
        let mut bytes = hex(LOGIN);
        let n = bytes.len();
        bytes[n - 1] = 0x0B;
        let err = FrameDecoder::default()
            .decode(&mut BytesMut::from(&bytes[..]))
            .unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("stop_bits", Some(n - 2)));
        let mut bytes = hex(LOGIN);
        bytes[5] ^= 1;
        let mut buf = BytesMut::from(&bytes[..]);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("crc", Some(n - 4)));
        assert!(buf.is_empty(), "a delimited bad frame is consumed");
    }

    #[test]
    fn half_frame_at_eof() {
        let bytes = hex(LOGIN);
        let err = FrameDecoder::default()
            .decode_eof(&mut BytesMut::from(&bytes[..7]))
            .unwrap_err();
        assert_eq!(err, Gt06Error::Incomplete { have: 7 });
        assert_eq!(
            FrameDecoder::default().decode_eof(&mut BytesMut::new()),
            Ok(None)
        );
    }

    #[test]
    fn short_frame_refuses_long_content_and_leaves_dst() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let f = Frame {
            extended: false,
            protocol: 0x94,
            content: Bytes::from(vec![0; MAX_SHORT_CONTENT + 1]),
            serial: 1,
        };
        assert_eq!(
            encode_frame(&f, &mut out),
            Err(Gt06EncodeError::TooLong { len: 251 })
        );
        assert_eq!(&out[..], b"keep");
        let ext = Frame {
            extended: true,
            ..f
        };
        encode_frame(&ext, &mut out).unwrap();
        let mut buf = out.split_off(4);
        assert_eq!(FrameDecoder::default().decode(&mut buf).unwrap(), Some(ext));
    }
}
