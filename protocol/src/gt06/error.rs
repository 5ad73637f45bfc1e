//! Errors of the GT06 codec: [`Gt06Error`] for bytes read from a device, [`Gt06EncodeError`]
//! for values that cannot be put on the wire.

/// Why a GT06 frame (or the login inside one) was rejected.
///
/// Every variant is final for the connection: the caller sends no reply, counts the error by
/// [`Gt06Error::reason`] and closes. Offsets are byte positions from the frame's first start
/// bit. A packet type this crate does not decode is *not* an error: it is kept raw
/// ([`crate::gt06::Packet::Raw`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Gt06Error {
    /// The frame does not start with `78 78` or `79 79`.
    #[error("bad start bits at byte {offset} (expected 7878 or 7979)")]
    StartBits {
        /// Offset of the first byte that is not a start bit.
        offset: usize,
    },
    /// The length field promises a frame larger than [`crate::Limits::max_frame_bytes`].
    #[error("frame of {len} bytes exceeds limit {max}")]
    TooLarge {
        /// Whole frame length implied by the length field.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The length field is too small to hold the protocol number, serial and CRC.
    #[error("length field {len} at byte {offset} is below the minimum 5")]
    BadLength {
        /// The length as read.
        len: u16,
        /// Offset of the length field.
        offset: usize,
    },
    /// The two bytes the length field points at are not `0D 0A`.
    #[error("bad stop bits at byte {offset} (expected 0d0a)")]
    StopBits {
        /// Offset where the stop bits should be.
        offset: usize,
    },
    /// The CRC-ITU over length … serial does not match the CRC field.
    #[error("CRC mismatch at byte {offset}: frame says {received:#06x}, computed {computed:#06x}")]
    Crc {
        /// Offset of the 2-byte CRC field.
        offset: usize,
        /// The CRC field as received.
        received: u16,
        /// The CRC computed over length … serial.
        computed: u16,
    },
    /// The stream ended inside a frame.
    #[error("stream ended with {have} bytes of an unfinished frame")]
    Incomplete {
        /// Bytes of the unfinished frame that were received.
        have: usize,
    },
    /// A login (0x01) whose content is not 8, 10 or 12 bytes.
    #[error("login content of {len} bytes at byte {offset} (expected 8, 10 or 12)")]
    LoginLength {
        /// Content length.
        len: usize,
        /// Offset of the content.
        offset: usize,
    },
    /// The BCD terminal id has a non-decimal nibble or a non-zero leading nibble.
    #[error("terminal id is not a BCD IMEI (byte {offset})")]
    Imei {
        /// Offset of the offending byte.
        offset: usize,
    },
}

impl Gt06Error {
    /// A short snake_case name for the error, from a fixed set: fit for a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Gt06Error::StartBits { .. } => "start_bits",
            Gt06Error::TooLarge { .. } => "too_large",
            Gt06Error::BadLength { .. } => "bad_length",
            Gt06Error::StopBits { .. } => "stop_bits",
            Gt06Error::Crc { .. } => "crc",
            Gt06Error::Incomplete { .. } => "incomplete",
            Gt06Error::LoginLength { .. } => "login_length",
            Gt06Error::Imei { .. } => "bad_imei",
        }
    }

    /// The byte offset the error points at, from the frame's first byte, where there is one.
    pub fn offset(&self) -> Option<usize> {
        match self {
            Gt06Error::TooLarge { .. } | Gt06Error::Incomplete { .. } => None,
            Gt06Error::StartBits { offset }
            | Gt06Error::BadLength { offset, .. }
            | Gt06Error::StopBits { offset }
            | Gt06Error::Crc { offset, .. }
            | Gt06Error::LoginLength { offset, .. }
            | Gt06Error::Imei { offset } => Some(*offset),
        }
    }
}

/// Why a GT06 value cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Gt06EncodeError {
    /// The content does not fit the frame's length field (250 bytes in a `7878` frame, 65,530
    /// in a `7979` one).
    #[error("content of {len} bytes does not fit the length field")]
    TooLong {
        /// The content length.
        len: usize,
    },
    /// A time outside what the 6-byte `YY MM DD hh mm ss` field can hold (years 2000-2255,
    /// whole seconds), after the UTC offset is applied.
    #[error("time {timestamp_ms} ms cannot be written as a GT06 date")]
    Time {
        /// The timestamp given.
        timestamp_ms: u64,
    },
    /// A value wider than its field in the packet's layout, or a block the layout does not
    /// have (e.g. a status block in a `0x12` location).
    #[error("{field} does not fit the packet's layout")]
    Field {
        /// The field's name.
        field: &'static str,
    },
}

impl Gt06EncodeError {
    /// A short snake_case name for the error, from a fixed set.
    pub fn reason(&self) -> &'static str {
        match self {
            Gt06EncodeError::TooLong { .. } => "too_long",
            Gt06EncodeError::Time { .. } => "time",
            Gt06EncodeError::Field { .. } => "field",
        }
    }
}
