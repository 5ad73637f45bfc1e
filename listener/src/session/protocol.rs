//! The seam between a session and the protocol its device speaks.
//!
//! The session owns the socket, the clock, admission, the store, metrics and events; a
//! protocol only reads bytes and says what they are: the login (identity, and the reply for an
//! accepted or a refused device), then one [`Step`] per frame (records to store and the ack to
//! write once they are stored, a keep-alive and its answer, a packet kept raw, a command
//! response). No IO and no clock here, so a protocol is a pair of sans-io decoders.
//!
//! ```text
//!  bytes ─▶ DeviceProtocol::login ─▶ Login { imei, replies } ─▶ admission ─▶ reply
//!  bytes ─▶ DeviceProtocol::frame ─▶ Step::Store ─▶ sink ─▶ ack
//!                                    Step::Answer / Raw / Command ─▶ reply, event
//! ```

use bytes::{Bytes, BytesMut};
use trackgate_protocol::{AvlPacket, Command, Imei, gt06};

/// What a session needs from a protocol.
pub(super) trait DeviceProtocol {
    /// Whether commands to devices (Codec 12/14) are served to this protocol's devices.
    const COMMANDS: bool;

    /// Reads the login from `buf`: `Ok(None)` until it is complete.
    fn login(&mut self, buf: &mut BytesMut) -> Result<Option<Login>, Malformed>;

    /// Reads the next frame after the login: `Ok(None)` until one is complete.
    fn frame(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, Malformed>;
}

/// A complete login.
pub(super) struct Login {
    pub(super) imei: Imei,
    /// Written when the device is admitted.
    pub(super) accepted: Reply,
    /// Written when it is refused, before the connection is closed.
    pub(super) refused: Reply,
}

/// What a frame asks of the session.
pub(super) enum Step {
    /// Store the records, then write `ack`: nothing is answered before the store.
    Store {
        records: Records,
        ack: Reply,
        /// The `codec` label of the frame and record counters.
        label: &'static str,
    },
    /// Nothing to store (a keep-alive, a repeated login): write `reply`.
    Answer(Reply),
    /// A packet with no stored layout: counted under `label`, published raw to the events
    /// stream, then `reply` written.
    Raw {
        protocol: u8,
        payload: Bytes,
        reply: Reply,
        label: &'static str,
    },
    /// A command response (Codec 12-15): to the command side and the events stream, never
    /// acked.
    Command(Command),
}

/// Records of one frame, in the shape the sink stores for their protocol.
pub(super) enum Records {
    Teltonika(AvlPacket),
    Gt06(gt06::Location),
}

impl Records {
    pub(super) fn count(&self) -> u32 {
        match self {
            Records::Teltonika(packet) => u32::try_from(packet.records.len()).unwrap_or(u32::MAX),
            Records::Gt06(_) => 1,
        }
    }
}

/// Input the protocol cannot read: final for the connection.
pub(super) struct Malformed {
    /// Bounded metric label.
    pub(super) reason: &'static str,
    /// Where in the frame, when the decoder knows.
    pub(super) offset: Option<usize>,
    /// For the log line.
    pub(super) detail: String,
}

impl Malformed {
    pub(super) fn new(
        reason: &'static str,
        offset: Option<usize>,
        detail: impl std::fmt::Display,
    ) -> Self {
        Self {
            reason,
            offset,
            detail: detail.to_string(),
        }
    }
}

/// Bytes a session writes back: at most a GT06 echo (10 bytes), usually less, never
/// allocated.
#[derive(Clone, Copy, Default)]
pub(super) struct Reply {
    bytes: [u8; gt06::REPLY_LEN],
    len: u8,
}

impl Reply {
    /// Nothing to write.
    pub(super) const NONE: Reply = Reply {
        bytes: [0; gt06::REPLY_LEN],
        len: 0,
    };

    /// `bytes`, which must fit (longer input is cut, which no caller does).
    pub(super) fn of(bytes: &[u8]) -> Self {
        let mut reply = Reply::NONE;
        let len = bytes.len().min(reply.bytes.len());
        reply.bytes[..len].copy_from_slice(&bytes[..len]);
        reply.len = len as u8;
        reply
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl From<Option<[u8; gt06::REPLY_LEN]>> for Reply {
    fn from(reply: Option<[u8; gt06::REPLY_LEN]>) -> Self {
        reply.map_or(Reply::NONE, |bytes| Reply::of(&bytes))
    }
}
