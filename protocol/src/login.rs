//! The IMEI login frame (`u16` length, then that many ASCII digits) and its one-byte reply.

use std::fmt;

use bytes::{Buf, BufMut, BytesMut};

use crate::{FrameError, Limits};

/// Length of an IMEI in digits; the only login length this crate accepts.
pub const IMEI_LEN: usize = 15;

/// A device identity: exactly 15 ASCII digits. No Luhn check: test devices and simulators
/// routinely use `123456789012345`, which fails it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Imei([u8; IMEI_LEN]);

impl Imei {
    /// Parses 15 ASCII digits.
    ///
    /// # Errors
    /// [`FrameError::ImeiLength`] for any other length, [`FrameError::Imei`] (with the offset in
    /// `s`) for a non-digit.
    pub fn parse(s: &str) -> Result<Imei, FrameError> {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        if s.len() != IMEI_LEN {
            return Err(FrameError::ImeiLength { len, offset: 0 });
        }
        Imei::from_ascii(s.as_bytes(), 0)
    }

    /// `digits` must be 15 bytes; `offset` is where they sit in the frame, for errors.
    pub(crate) fn from_ascii(digits: &[u8], offset: usize) -> Result<Imei, FrameError> {
        let mut out = [0u8; IMEI_LEN];
        if digits.len() != IMEI_LEN {
            let len = u16::try_from(digits.len()).unwrap_or(u16::MAX);
            return Err(FrameError::ImeiLength { len, offset });
        }
        for (i, (&d, o)) in digits.iter().zip(out.iter_mut()).enumerate() {
            if !d.is_ascii_digit() {
                return Err(FrameError::Imei { offset: offset + i });
            }
            *o = d;
        }
        Ok(Imei(out))
    }

    /// Codec 14/15 carry the IMEI as 8 bytes of hex digits with a leading zero nibble
    /// (`0352093081452251`).
    pub(crate) fn from_packed(packed: &[u8; 8], offset: usize) -> Result<Imei, FrameError> {
        if packed[0] >> 4 != 0 {
            return Err(FrameError::Imei { offset });
        }
        let mut out = [0u8; IMEI_LEN];
        let nibbles = packed
            .iter()
            .flat_map(|b| [b >> 4, b & 0x0F])
            .skip(1)
            .enumerate();
        for ((i, n), o) in nibbles.zip(out.iter_mut()) {
            if n > 9 {
                // Digit i is nibble i + 1 of the packed bytes.
                let nibble = i + 1;
                return Err(FrameError::Imei {
                    offset: offset + nibble / 2,
                });
            }
            *o = b'0' + n;
        }
        Ok(Imei(out))
    }

    /// The packed 8-byte form used by Codec 14/15.
    pub(crate) fn to_packed(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        // Nibble 0 is the zero pad; digit i goes to nibble i + 1.
        for (i, d) in self.0.iter().enumerate() {
            let nibble = i + 1;
            let v = d - b'0';
            out[nibble / 2] |= if nibble % 2 == 0 { v << 4 } else { v };
        }
        out
    }

    /// The 15 digits.
    pub fn as_str(&self) -> &str {
        // Construction admits ASCII digits only, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub(crate) fn as_bytes(&self) -> &[u8; IMEI_LEN] {
        &self.0
    }

    /// The IMEI as an integer (below 10^15, so it fits 50 bits): the compact form a listener
    /// keeps a million admitted devices in. Leading zeros are kept by [`Imei::from_u64`].
    pub fn to_u64(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
    }

    /// The IMEI whose integer form is `n`, zero-padded to 15 digits; `None` from 10^15 up.
    pub fn from_u64(mut n: u64) -> Option<Imei> {
        if n >= 1_000_000_000_000_000 {
            return None;
        }
        let mut out = [b'0'; IMEI_LEN];
        for o in out.iter_mut().rev() {
            // NB: n % 10 < 10, so the cast cannot truncate.
            *o = b'0' + (n % 10) as u8;
            n /= 10;
        }
        Some(Imei(out))
    }
}

impl fmt::Display for Imei {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Imei {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Imei({})", self.as_str())
    }
}

impl std::str::FromStr for Imei {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Imei, FrameError> {
        Imei::parse(s)
    }
}

/// The server's reply to a login: `0x01` accepts the device, `0x00` refuses it.
pub fn login_reply(accepted: bool) -> u8 {
    u8::from(accepted)
}

/// Appends the login frame for `imei` (what a device sends first).
pub fn encode_login(imei: &Imei, dst: &mut BytesMut) {
    dst.reserve(2 + IMEI_LEN);
    dst.put_u16(IMEI_LEN as u16);
    dst.put_slice(imei.as_bytes());
}

/// Incremental decoder for the login frame, the first thing a device sends on a TCP connection.
#[derive(Debug, Clone, Default)]
pub struct LoginDecoder {
    limits: Limits,
}

impl LoginDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        LoginDecoder { limits }
    }

    /// `Ok(None)`: need more bytes. `Ok(Some(imei))`: the login frame was consumed from `src`,
    /// and anything after it is left in place.
    ///
    /// # Errors
    /// A length other than 15 fails as soon as the two length bytes arrive (so a stranger
    /// speaking another protocol is turned away without buffering); a non-digit fails with
    /// its offset.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Imei>, FrameError> {
        let Some(len_bytes) = src.get(..2) else {
            return Ok(None);
        };
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]);
        let total = usize::from(len) + 2;
        if total > self.limits.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len: total as u64,
                max: self.limits.max_frame_bytes,
            });
        }
        if usize::from(len) != IMEI_LEN {
            return Err(FrameError::ImeiLength { len, offset: 0 });
        }
        let Some(digits) = src.get(2..total) else {
            src.reserve(total - src.len());
            return Ok(None);
        };
        let imei = Imei::from_ascii(digits, 2)?;
        src.advance(total);
        Ok(Some(imei))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIKI: &[u8] = b"\x00\x0F356307042441013";

    #[test]
    fn decodes_wiki_login_byte_by_byte() {
        let mut dec = LoginDecoder::default();
        let mut buf = BytesMut::new();
        for (i, b) in WIKI.iter().enumerate() {
            buf.put_u8(*b);
            let got = dec.decode(&mut buf).unwrap();
            if i + 1 < WIKI.len() {
                assert_eq!(got, None);
            } else {
                assert_eq!(got.unwrap().as_str(), "356307042441013");
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn integer_form_round_trips_with_leading_zeros() {
        for s in ["356307042441013", "000000000000001", "999999999999999"] {
            let imei = Imei::parse(s).unwrap();
            assert_eq!(Imei::from_u64(imei.to_u64()), Some(imei));
        }
        assert_eq!(Imei::parse("000000000000042").unwrap().to_u64(), 42);
        assert_eq!(Imei::from_u64(1_000_000_000_000_000), None);
    }

    #[test]
    fn leaves_following_bytes() {
        let mut buf = BytesMut::from(WIKI);
        buf.put_u8(0xFF);
        LoginDecoder::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], &[0xFF]);
    }

    #[test]
    fn wrong_length_fails_before_the_digits_arrive() {
        let mut buf = BytesMut::from(&b"\x00\x10"[..]);
        let err = LoginDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!(err.reason(), "imei_length");
        // An AVL frame sent without a login starts with the zero preamble.
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(
            LoginDecoder::default()
                .decode(&mut buf)
                .unwrap_err()
                .reason(),
            "imei_length"
        );
    }

    #[test]
    fn non_digit_reports_offset() {
        let mut buf = BytesMut::from(&b"\x00\x0F35630704244101X"[..]);
        let err = LoginDecoder::default().decode(&mut buf).unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("bad_imei", Some(16)));
    }

    #[test]
    fn encode_round_trip_and_reply() {
        let imei = Imei::parse("123456789012345").unwrap();
        let mut buf = BytesMut::new();
        encode_login(&imei, &mut buf);
        assert_eq!(
            LoginDecoder::default().decode(&mut buf).unwrap(),
            Some(imei)
        );
        assert_eq!((login_reply(true), login_reply(false)), (1, 0));
    }

    #[test]
    fn imei_parse_rules() {
        assert!(Imei::parse("35630704244101").is_err());
        assert!(Imei::parse("3563070424410133").is_err());
        assert_eq!(
            Imei::parse("35630704244101a").unwrap_err().offset(),
            Some(14)
        );
        assert_eq!(
            Imei::parse("356307042441013").unwrap().to_string(),
            "356307042441013"
        );
    }

    #[test]
    fn packed_imei_round_trip() {
        let packed = [0x03, 0x52, 0x09, 0x30, 0x81, 0x45, 0x22, 0x51];
        let imei = Imei::from_packed(&packed, 0).unwrap();
        assert_eq!(imei.as_str(), "352093081452251");
        assert_eq!(imei.to_packed(), packed);
        assert!(Imei::from_packed(&[0x13, 0, 0, 0, 0, 0, 0, 0], 0).is_err());
        assert!(Imei::from_packed(&[0x0A, 0, 0, 0, 0, 0, 0, 0], 0).is_err());
    }
}
