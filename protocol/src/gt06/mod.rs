//! Sans-io codec for the GT06 family (Concox, Jimi IoT and their many clones).
//!
//! ```text
//!  TCP bytes ──▶ FrameDecoder ──▶ Frame { protocol, content, serial } ──▶ reply_to(&frame)
//!                                   └─▶ Packet::decode(&frame, UtcOffset) ──▶ Login | Heartbeat
//!                                           | Location | Alarm | Info | Raw
//! ```
//!
//! A session: the device sends a login (`0x01`, its IMEI); the server checks the IMEI and
//! answers with [`reply`]; then come heartbeats (`0x13`/`0x23`, answered), locations (`0x12`,
//! `0x22`, …, not answered) and alarms (`0x16`/`0x26`/`0x27`, answered) on the same
//! connection, which carry no identity of their own. [`needs_reply`] says which numbers a
//! device waits for; a store-then-ack server replies only after the packet is stored.
//!
//! Strictness: start bits, length, stop bits and CRC-ITU are checked ([`Gt06Error`], final
//! for the connection). The content is decoded where the layout is known and kept raw
//! otherwise ([`Packet`]): GT06 clones reuse protocol numbers, and a packet this crate cannot
//! read is still the device's data.
//!
//! Time: the wire time is the device's clock, UTC or local depending on the model, so
//! [`Packet::decode`] takes the [`UtcOffset`] to read it with; nothing here assumes one.
//!
//! Like the Teltonika codec: no sockets, no clock, every length checked against
//! [`crate::Limits`] before anything is reserved, and an encoder for every decoder (for the
//! simulator and the round-trip tests).
//!
//! ```
//! use bytes::BytesMut;
//! use trackgate_protocol::Limits;
//! use trackgate_protocol::gt06::{FrameDecoder, Packet, UtcOffset, reply_to};
//! # fn hex(s: &str) -> Vec<u8> {
//! #     (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
//! # }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A login, then a 0x12 location, as they arrive from the socket.
//! let mut buf = BytesMut::from(&hex("78780D01086471700328358100093F040D0A")[..]);
//! buf.extend_from_slice(&hex(
//!     "787823120F081B121D37CB01C8E2CC08AFD3C020D50201940701D600A1190041EE100576D1470D0A",
//! ));
//! let mut frames = FrameDecoder::new(Limits::default());
//! let mut replies = Vec::new();
//! let mut positions = Vec::new();
//! while let Some(frame) = frames.decode(&mut buf)? {
//!     match Packet::decode(&frame, UtcOffset::UTC)? {
//!         Packet::Login(login) => assert_eq!(login.imei.as_str(), "864717003283581"),
//!         Packet::Location(loc) => positions.push(loc.gps.latitude_e7()),
//!         _ => {}
//!     }
//!     replies.extend(reply_to(&frame)); // after storing what the frame carried
//! }
//! assert!(frames.decode_eof(&mut buf)?.is_none());
//! assert_eq!((replies.len(), positions.len()), (1, 1));
//! # Ok(())
//! # }
//! ```

mod encode;
mod error;
mod fields;
mod frame;
mod packet;
mod reply;
mod time;

#[cfg(test)]
mod tests;

pub use error::{Gt06EncodeError, Gt06Error};
pub use fields::{FIELDS, PROTOCOL};
pub use frame::{Frame, FrameDecoder, crc_itu, encode_frame};
pub use packet::{
    Gps, Heartbeat, Info, Lbs, Location, Login, Packet, RawPacket, Status, UNITS_PER_DEGREE,
};
pub use reply::{REPLY_LEN, needs_reply, reply, reply_to};
pub use time::UtcOffset;

use bytes::BytesMut;

/// Appends `packet` as a whole frame with serial number `serial` (what a device sends).
///
/// # Errors
/// As [`Packet::to_frame`]; `dst` is left as it was.
pub fn encode_packet(
    packet: &Packet,
    serial: u16,
    offset: UtcOffset,
    dst: &mut BytesMut,
) -> Result<(), Gt06EncodeError> {
    encode_frame(&packet.to_frame(serial, offset)?, dst)
}

/// Whether the protocol number has a decoded layout in [`Packet`] (others decode as
/// [`Packet::Raw`]).
pub fn is_known_protocol(protocol: u8) -> bool {
    packet::is_known(protocol)
}
