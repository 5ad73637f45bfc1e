//! Sans-io codecs for the Teltonika tracker protocol (the crate root) and the GT06 family
//! (Concox, Jimi IoT and clones: the [`gt06`] module, with its own frame decoder, packets,
//! replies and Redis mapping; the two share [`Imei`] and [`Limits`]).
//!
//! What it is: the byte-level rules of a Teltonika device session, as plain functions and
//! small state machines over [`bytes::BytesMut`]:
//!
//! ```text
//!  TCP bytes ──▶ LoginDecoder ──▶ Imei ──▶ (server replies login_reply(..))
//!            └─▶ FrameDecoder ──▶ Frame::KeepAlive | Frame::Avl(AvlPacket) | Frame::Command(Command)
//!                                    └─▶ (server stores the records, then replies encode_ack(n))
//!  UDP datagram ──▶ decode_udp ──▶ UdpDatagram ──▶ (server replies udp_ack(..))
//! ```
//!
//! Codecs 8, 8 Extended (with the variable-length NX group) and 16 carry AVL records; Codec 12
//! carries commands and responses; 13, 14 and 15 are recognised with an opaque payload. Every
//! decoder has a matching encoder, used by the simulator and by property tests.
//!
//! What it is not: no sockets, no async runtime, no clock and no randomness. The caller owns
//! the IO and stamps receive times. Every length read from the wire is checked against
//! [`Limits`] before anything is allocated, and all wire arithmetic is checked.
//!
//! Strictness: preamble, data length, CRC-16/IBM, `N1 == N2`, IO group counts and the exact end
//! of the data field are all checked. The legacy GH3000 codec 7 is rejected as
//! `unknown_codec`, and traccar's non-standard 16-byte "extended" IO group is not decoded
//! (such frames fail with a body error, `io_count`).
//!
//! # Driving it
//!
//! The loop a TCP server runs (this is what `tokio_util::codec::Decoder` adapts):
//!
//! ```
//! use bytes::BytesMut;
//! use trackgate_protocol::{encode_ack, login_reply, Frame, FrameDecoder, Limits, LoginDecoder};
//!
//! # fn hex(s: &str) -> Vec<u8> {
//! #     (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Bytes as they arrive from the socket: the login, a keep-alive and a Codec 8 frame.
//! let mut chunks = vec![
//!     hex("000F333536333037303432343431303133"),
//!     hex("FF000000000000003608010000016B40D8EA3001000000000000000000"),
//!     hex("0000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF"),
//! ]
//! .into_iter();
//! let mut buf = BytesMut::new();
//! let mut replies = Vec::new();
//!
//! let mut login = LoginDecoder::new(Limits::default());
//! let imei = loop {
//!     if let Some(imei) = login.decode(&mut buf)? {
//!         break imei;
//!     }
//!     buf.extend_from_slice(&chunks.next().ok_or("closed before login")?);
//! };
//! replies.push(login_reply(true)); // after checking the IMEI against the allowed devices
//!
//! let mut frames = FrameDecoder::new(Limits::default());
//! let mut stored = 0;
//! loop {
//!     match frames.decode(&mut buf)? {
//!         Some(Frame::KeepAlive) => {}
//!         Some(Frame::Avl(packet)) => {
//!             stored += packet.records.len(); // store first, ack after
//!             replies.extend(encode_ack(packet.records.len() as u32));
//!         }
//!         Some(Frame::Command(_)) => {} // responses are never acked
//!         None => match chunks.next() {
//!             Some(chunk) => buf.extend_from_slice(&chunk),
//!             None => {
//!                 // EOF: a half frame left in the buffer is an error.
//!                 assert!(frames.decode_eof(&mut buf)?.is_none());
//!                 break;
//!             }
//!         },
//!     }
//! }
//! assert_eq!(imei.as_str(), "356307042441013");
//! assert_eq!((stored, replies), (1, vec![1, 0, 0, 0, 1]));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod avl;
mod command;
mod crc;
mod envelope;
mod error;
pub mod gt06;
mod login;
mod reader;
mod udp;

pub use avl::{AvlPacket, AvlRecord, IoElement, IoValue};
pub use command::Command;
pub use crc::crc16_ibm;
pub use envelope::{FrameDecoder, encode_ack, encode_avl, encode_command};
pub use error::{EncodeError, FrameError};
pub use login::{IMEI_LEN, Imei, LoginDecoder, encode_login, login_reply};
pub use udp::{UdpDatagram, decode_udp, encode_udp, udp_ack};

/// The codec id byte that follows the data length (TCP) or the IMEI (UDP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Codec {
    /// 0x08: AVL records, 1-byte IO ids and counts.
    Codec8,
    /// 0x8E: AVL records, 2-byte IO ids and counts, plus variable-length (NX) values.
    Codec8Ext,
    /// 0x10: AVL records, 2-byte IO ids, 1-byte counts, a generation type per record.
    Codec16,
    /// 0x0C: GPRS command (type 0x05) and response (type 0x06).
    Codec12,
    /// 0x0D: device-to-server message with a timestamp (COM TCP link mode).
    Codec13,
    /// 0x0E: command addressed to an IMEI; the device answers ACK (0x06) or nACK (0x11).
    Codec14,
    /// 0x0F: device-to-server message with timestamp and IMEI (FMX6).
    Codec15,
}

impl Codec {
    /// The wire byte.
    pub fn id(self) -> u8 {
        match self {
            Codec::Codec8 => 0x08,
            Codec::Codec8Ext => 0x8E,
            Codec::Codec16 => 0x10,
            Codec::Codec12 => 0x0C,
            Codec::Codec13 => 0x0D,
            Codec::Codec14 => 0x0E,
            Codec::Codec15 => 0x0F,
        }
    }

    /// The codec for a wire byte, or `None` for ids this crate does not know (e.g. 0x07).
    pub fn from_id(id: u8) -> Option<Codec> {
        Some(match id {
            0x08 => Codec::Codec8,
            0x8E => Codec::Codec8Ext,
            0x10 => Codec::Codec16,
            0x0C => Codec::Codec12,
            0x0D => Codec::Codec13,
            0x0E => Codec::Codec14,
            0x0F => Codec::Codec15,
            _ => return None,
        })
    }

    /// A short name fit for a metric label: `"8"`, `"8e"`, `"16"`, `"12"`, `"13"`, `"14"`, `"15"`.
    pub fn label(self) -> &'static str {
        match self {
            Codec::Codec8 => "8",
            Codec::Codec8Ext => "8e",
            Codec::Codec16 => "16",
            Codec::Codec12 => "12",
            Codec::Codec13 => "13",
            Codec::Codec14 => "14",
            Codec::Codec15 => "15",
        }
    }

    /// True for the codecs that carry AVL records (8, 8E, 16).
    pub fn is_avl(self) -> bool {
        matches!(self, Codec::Codec8 | Codec::Codec8Ext | Codec::Codec16)
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Bounds on what a peer can make us buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole frame accepted: a TCP frame including preamble, length and CRC, a login
    /// frame, or a UDP datagram. Checked against the length field before any allocation.
    ///
    /// Default 32 KiB: Teltonika devices send at most 1280-byte AVL packets (512 on the
    /// FMx640 family), but Codec 12 responses and camera transfers run to a few KiB
    /// (traccar's photo vector is 2,079 bytes); traccar caps all Teltonika frames at 32 KiB
    /// too. A connection therefore never holds more than ~32 KiB of unparsed input.
    pub max_frame_bytes: usize,
}

impl Limits {
    /// The default limit: see [`Limits::max_frame_bytes`].
    pub const DEFAULT_MAX_FRAME_BYTES: usize = 32 * 1024;

    /// Limits with the given frame cap.
    pub fn new(max_frame_bytes: usize) -> Self {
        Limits { max_frame_bytes }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(Limits::DEFAULT_MAX_FRAME_BYTES)
    }
}

/// One decoded TCP frame after login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The lone `0xFF` byte a device sends to keep the link open; it gets no reply.
    KeepAlive,
    /// AVL records (Codec 8, 8E, 16); acked with [`encode_ack`] once stored.
    Avl(AvlPacket),
    /// A command or response (Codec 12, 13, 14, 15); never acked.
    Command(Command),
}

#[cfg(test)]
mod test_util {
    /// Bytes from a hex string as printed in the vendor's and traccar's examples.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
