//! Errors: [`FrameError`] for anything read from a device, [`EncodeError`] for values that
//! cannot be put on the wire.

use crate::Codec;

/// Why a login frame, TCP frame or UDP datagram was rejected.
///
/// Every variant is final for the connection (TCP) or the datagram (UDP): the caller sends no
/// ack, counts the error by [`FrameError::reason`] and closes. Offsets are byte positions from
/// the start of the frame (TCP, including the preamble) or of the datagram (UDP).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame declares more bytes than [`crate::Limits::max_frame_bytes`] allows.
    #[error("frame of {len} bytes exceeds limit {max}")]
    TooLarge {
        /// Whole frame length implied by the length field (or the datagram size).
        len: u64,
        /// The configured limit.
        max: usize,
    },
    /// The four bytes before the data length are not zero.
    #[error("bad preamble at byte {offset}")]
    Preamble {
        /// Offset of the first non-zero preamble byte.
        offset: usize,
    },
    /// The data field length is too small to hold a codec id and both record counts.
    #[error("data field length {len} is too small")]
    BadLength {
        /// The data field length as read from the wire.
        len: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended with {have} bytes of an unfinished frame")]
    Incomplete {
        /// Bytes of the unfinished frame that were received.
        have: usize,
    },
    /// The CRC-16/IBM over codec id … N2 does not match the CRC field.
    #[error("CRC mismatch at byte {offset}: frame says {received:#010x}, computed {computed:#06x}")]
    Crc {
        /// Offset of the 4-byte CRC field.
        offset: usize,
        /// The CRC field as received.
        received: u32,
        /// The CRC computed over the data field.
        computed: u16,
    },
    /// The codec id is not one this crate knows (e.g. the legacy GH3000 codec 7).
    #[error("unknown codec id {id:#04x} at byte {offset}")]
    UnknownCodec {
        /// The codec byte.
        id: u8,
        /// Offset of the codec byte.
        offset: usize,
    },
    /// A known codec where it is not allowed (a command codec in a UDP datagram).
    #[error("codec {} not allowed here (byte {offset})", codec.label())]
    UnexpectedCodec {
        /// The codec found.
        codec: Codec,
        /// Offset of the codec byte.
        offset: usize,
    },
    /// Number of Data 1 and Number of Data 2 differ.
    #[error("record count mismatch: N1 = {n1}, N2 = {n2} at byte {offset}")]
    CountMismatch {
        /// Count before the records.
        n1: u8,
        /// Count after the records.
        n2: u8,
        /// Offset of N2.
        offset: usize,
    },
    /// A field runs past the end of the data field.
    #[error("field at byte {offset} runs past the end of the data")]
    Truncated {
        /// Offset of the field that did not fit.
        offset: usize,
    },
    /// The records end before the data field does.
    #[error("unexpected bytes at {offset} after the last field")]
    TrailingBytes {
        /// Offset of the first unexpected byte.
        offset: usize,
    },
    /// The IO element groups do not add up to the declared total.
    #[error(
        "IO total {declared} does not match the {found} elements in the groups (record at byte {offset})"
    )]
    IoCount {
        /// The declared total.
        declared: u16,
        /// The sum of the group counts.
        found: u32,
        /// Offset of the record.
        offset: usize,
    },
    /// The IMEI length field is not 15.
    #[error("IMEI length {len} at byte {offset} (expected 15)")]
    ImeiLength {
        /// The length read.
        len: u16,
        /// Offset of the length field.
        offset: usize,
    },
    /// The IMEI holds something other than ASCII digits.
    #[error("IMEI has a non-digit at byte {offset}")]
    Imei {
        /// Offset of the offending byte.
        offset: usize,
    },
    /// The UDP length field does not match the datagram size.
    #[error("UDP length field {declared} does not match the {actual} bytes that follow it")]
    UdpLength {
        /// Length as declared.
        declared: u16,
        /// Bytes actually following the length field.
        actual: usize,
    },
    /// A command frame carries a command count other than 1.
    #[error("command count {count} at byte {offset} (expected 1)")]
    CommandCount {
        /// The count read.
        count: u8,
        /// Offset of the count.
        offset: usize,
    },
    /// A command size too small for the fields the codec puts inside it (timestamp, IMEI).
    #[error("command size {size} at byte {offset} is too small for codec {}", codec.label())]
    CommandSize {
        /// The codec.
        codec: Codec,
        /// The size read.
        size: u32,
        /// Offset of the size field.
        offset: usize,
    },
}

impl FrameError {
    /// A short snake_case name for the error, from a fixed set: fit for a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Preamble { .. } => "bad_preamble",
            FrameError::BadLength { .. } => "bad_length",
            FrameError::Incomplete { .. } => "incomplete",
            FrameError::Crc { .. } => "crc",
            FrameError::UnknownCodec { .. } => "unknown_codec",
            FrameError::UnexpectedCodec { .. } => "unexpected_codec",
            FrameError::CountMismatch { .. } => "count_mismatch",
            FrameError::Truncated { .. } => "truncated",
            FrameError::TrailingBytes { .. } => "trailing_bytes",
            FrameError::IoCount { .. } => "io_count",
            FrameError::ImeiLength { .. } => "imei_length",
            FrameError::Imei { .. } => "bad_imei",
            FrameError::UdpLength { .. } => "udp_length",
            FrameError::CommandCount { .. } => "command_count",
            FrameError::CommandSize { .. } => "command_size",
        }
    }

    /// Byte offset in the frame or datagram where decoding went wrong, when there is one.
    pub fn offset(&self) -> Option<usize> {
        match self {
            // The length field of a TCP frame sits at byte 4; a datagram has no single culprit.
            FrameError::TooLarge { .. } | FrameError::BadLength { .. } => Some(4),
            FrameError::Incomplete { have } => Some(*have),
            FrameError::UdpLength { .. } => Some(0),
            FrameError::Preamble { offset }
            | FrameError::Crc { offset, .. }
            | FrameError::UnknownCodec { offset, .. }
            | FrameError::UnexpectedCodec { offset, .. }
            | FrameError::CountMismatch { offset, .. }
            | FrameError::Truncated { offset }
            | FrameError::TrailingBytes { offset }
            | FrameError::IoCount { offset, .. }
            | FrameError::ImeiLength { offset, .. }
            | FrameError::Imei { offset }
            | FrameError::CommandCount { offset, .. }
            | FrameError::CommandSize { offset, .. } => Some(*offset),
        }
    }
}

/// Why a value cannot be encoded with the chosen codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// `encode_avl`/`encode_udp` got a command codec, or `encode_command` an AVL codec.
    #[error("codec {} cannot be used here", codec.label())]
    WrongCodec {
        /// The codec given.
        codec: Codec,
    },
    /// More records than the 1-byte record count can carry.
    #[error("{count} records do not fit a 1-byte count")]
    TooManyRecords {
        /// Number of records.
        count: usize,
    },
    /// More IO elements in a group (or in total) than the codec's count width allows.
    #[error("{count} IO elements do not fit codec {}'s count field", codec.label())]
    TooManyIo {
        /// The codec.
        codec: Codec,
        /// The count that overflowed.
        count: usize,
    },
    /// An IO id or event id wider than the codec allows (Codec 8 ids are one byte).
    #[error("id {id} does not fit codec {}", codec.label())]
    IdTooLarge {
        /// The codec.
        codec: Codec,
        /// The id.
        id: u16,
    },
    /// A variable-length IO value in a codec without the NX group (only 8E has it).
    #[error("variable-length IO {id} needs codec 8E, not {}", codec.label())]
    VarNotAllowed {
        /// The codec.
        codec: Codec,
        /// The IO id.
        id: u16,
    },
    /// A variable-length IO value longer than its 2-byte length field.
    #[error("IO {id} value of {len} bytes is too long")]
    VarTooLong {
        /// The IO id.
        id: u16,
        /// Its length.
        len: usize,
    },
    /// `generation_type` is required by Codec 16 and absent from every other codec.
    #[error("generation type must be present exactly for codec 16 (codec {})", codec.label())]
    GenerationType {
        /// The codec.
        codec: Codec,
    },
    /// A command lacks a field its codec carries (Codec 14 IMEI, Codec 13/15 timestamp).
    #[error("codec {} command needs its {field}", codec.label())]
    MissingField {
        /// The codec.
        codec: Codec,
        /// `"imei"` or `"timestamp"`.
        field: &'static str,
    },
    /// The frame or datagram would exceed its length field.
    #[error("encoded size {len} overflows the length field")]
    TooLong {
        /// The size that did not fit.
        len: usize,
    },
}

impl EncodeError {
    /// A short snake_case name for the error, from a fixed set.
    pub fn reason(&self) -> &'static str {
        match self {
            EncodeError::WrongCodec { .. } => "wrong_codec",
            EncodeError::TooManyRecords { .. } => "too_many_records",
            EncodeError::TooManyIo { .. } => "too_many_io",
            EncodeError::IdTooLarge { .. } => "id_too_large",
            EncodeError::VarNotAllowed { .. } => "var_not_allowed",
            EncodeError::VarTooLong { .. } => "var_too_long",
            EncodeError::GenerationType { .. } => "generation_type",
            EncodeError::MissingField { .. } => "missing_field",
            EncodeError::TooLong { .. } => "too_long",
        }
    }
}
