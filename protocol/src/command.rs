//! GPRS command codecs: 12 (command 0x05 / response 0x06), and 13, 14, 15 recognised with an
//! opaque payload.
//!
//! Data field: `codec | 0x01 | type | size u32 | [timestamp u32] [IMEI 8 B] payload | 0x01`,
//! where `size` counts the timestamp and the packed IMEI when the codec has them:
//!
//! | codec | inside `size` |
//! |---|---|
//! | 12 | payload |
//! | 13 | timestamp (Unix seconds), payload |
//! | 14 | IMEI, payload (type 0x11 nACK: IMEI only) |
//! | 15 | timestamp, IMEI, payload |

use bytes::{BufMut, Bytes, BytesMut};

use crate::reader::Reader;
use crate::{Codec, EncodeError, FrameError, Imei};

/// A command (server → device) or a response/message (device → server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Codec 12, 13, 14 or 15.
    pub codec: Codec,
    /// The type byte: 0x05 command, 0x06 response, 0x11 Codec 14 nACK, 0x0B Codec 15 message
    /// (other values, such as traccar's camera 0x0D, are passed through).
    pub kind: u8,
    /// Codec 14 and 15: the addressed or sending device.
    pub imei: Option<Imei>,
    /// Codec 13 and 15: device time in Unix seconds.
    pub timestamp: Option<u32>,
    /// The command text or response bytes, uninterpreted.
    pub payload: Bytes,
}

impl Command {
    /// A Codec 12 command (type 0x05) carrying `text`, e.g. `getinfo`.
    pub fn codec12(text: impl Into<Bytes>) -> Command {
        Command {
            codec: Codec::Codec12,
            kind: 0x05,
            imei: None,
            timestamp: None,
            payload: text.into(),
        }
    }
}

/// The codec's fixed fields inside `size`: (timestamp, IMEI).
fn has_fields(codec: Codec) -> (bool, bool) {
    match codec {
        Codec::Codec13 => (true, false),
        Codec::Codec14 => (false, true),
        Codec::Codec15 => (true, true),
        _ => (false, false),
    }
}

/// Decodes the data field after the codec byte, which the caller has read as `codec`.
pub(crate) fn decode_command(codec: Codec, r: &mut Reader<'_>) -> Result<Command, FrameError> {
    let qty_at = r.pos();
    let qty = r.u8()?;
    if qty != 1 {
        return Err(FrameError::CommandCount {
            count: qty,
            offset: qty_at,
        });
    }
    let kind = r.u8()?;
    let size_at = r.pos();
    let size = r.u32()?;
    let (has_ts, has_imei) = has_fields(codec);
    let fixed = if has_ts { 4 } else { 0 } + if has_imei { 8 } else { 0 };
    let too_small = FrameError::CommandSize {
        codec,
        size,
        offset: size_at,
    };
    let size = usize::try_from(size).map_err(|_| too_small.clone())?;
    let payload_len = size.checked_sub(fixed).ok_or(too_small)?;
    if size > r.remaining() {
        return Err(FrameError::Truncated { offset: size_at });
    }
    let timestamp = if has_ts { Some(r.u32()?) } else { None };
    let imei = if has_imei {
        let at = r.pos();
        let packed: [u8; 8] = r
            .slice(8)?
            .try_into()
            .map_err(|_| FrameError::Truncated { offset: at })?;
        Some(Imei::from_packed(&packed, at)?)
    } else {
        None
    };
    let payload = r.bytes(payload_len)?;
    let qty2_at = r.pos();
    let qty2 = r.u8()?;
    if qty2 != qty {
        return Err(FrameError::CountMismatch {
            n1: qty,
            n2: qty2,
            offset: qty2_at,
        });
    }
    r.finish()?;
    Ok(Command {
        codec,
        kind,
        imei,
        timestamp,
        payload,
    })
}

/// Appends the data field (codec byte … second quantity).
pub(crate) fn encode_command_body(cmd: &Command, dst: &mut BytesMut) -> Result<(), EncodeError> {
    if cmd.codec.is_avl() {
        return Err(EncodeError::WrongCodec { codec: cmd.codec });
    }
    let (has_ts, has_imei) = has_fields(cmd.codec);
    let missing = |field| EncodeError::MissingField {
        codec: cmd.codec,
        field,
    };
    let size = cmd
        .payload
        .len()
        .checked_add(if has_ts { 4 } else { 0 } + if has_imei { 8 } else { 0 })
        .and_then(|s| u32::try_from(s).ok())
        .ok_or(EncodeError::TooLong {
            len: cmd.payload.len(),
        })?;
    dst.put_u8(cmd.codec.id());
    dst.put_u8(1);
    dst.put_u8(cmd.kind);
    dst.put_u32(size);
    if has_ts {
        dst.put_u32(cmd.timestamp.ok_or(missing("timestamp"))?);
    }
    if has_imei {
        dst.put_slice(&cmd.imei.ok_or(missing("imei"))?.to_packed());
    }
    dst.put_slice(&cmd.payload);
    dst.put_u8(1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &[u8]) -> Result<Command, FrameError> {
        let bytes = Bytes::copy_from_slice(body);
        let mut r = Reader::new(&bytes, 1, bytes.len());
        let codec = Codec::from_id(body[0]).unwrap();
        decode_command(codec, &mut r)
    }

    #[test]
    fn codec12_getinfo() {
        let mut buf = BytesMut::new();
        encode_command_body(&Command::codec12("getinfo"), &mut buf).unwrap();
        assert_eq!(&buf[..], b"\x0C\x01\x05\x00\x00\x00\x07getinfo\x01");
        assert_eq!(decode(&buf).unwrap(), Command::codec12("getinfo"));
    }

    #[test]
    fn every_command_codec_round_trips() {
        let imei = Imei::parse("352093081452251").unwrap();
        for codec in [
            Codec::Codec12,
            Codec::Codec13,
            Codec::Codec14,
            Codec::Codec15,
        ] {
            let (ts, im) = has_fields(codec);
            let cmd = Command {
                codec,
                kind: 0x06,
                imei: im.then_some(imei),
                timestamp: ts.then_some(1_699_440_036),
                payload: Bytes::from_static(b"Hello!\n"),
            };
            let mut buf = BytesMut::new();
            encode_command_body(&cmd, &mut buf).unwrap();
            assert_eq!(decode(&buf).unwrap(), cmd, "codec {codec}");
        }
    }

    #[test]
    fn size_smaller_than_fixed_fields() {
        let err = decode(b"\x0E\x01\x05\x00\x00\x00\x04abcd\x01").unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("command_size", Some(3)));
    }

    #[test]
    fn size_past_the_end() {
        let err = decode(b"\x0C\x01\x05\x00\x00\x00\x09getinfo\x01").unwrap_err();
        assert_eq!(err.reason(), "truncated");
    }

    #[test]
    fn missing_imei_is_an_encode_error() {
        let cmd = Command {
            codec: Codec::Codec14,
            ..Command::codec12("getver")
        };
        let err = encode_command_body(&cmd, &mut BytesMut::new()).unwrap_err();
        assert_eq!(err.reason(), "missing_field");
    }
}
