//! GT06 through the session's seam: login `0x01` (the same admission as Teltonika; an admitted
//! device gets the echo, a refused one nothing) → locations and alarms stored through the same
//! store script → the packet's echo, if it asks for one, written only after the store.
//!
//! A frame with a bad CRC, bad stop bits or a bad length is never answered: it is counted
//! and the connection closed, as Teltonika's malformed frames are. Packets with no stored
//! layout (information, LBS-only, unknown numbers) are counted and published raw to the events
//! stream; they do not end the session. Commands are Teltonika-only.

use bytes::BytesMut;
use trackgate_protocol::Limits;
use trackgate_protocol::gt06::{self, FrameDecoder, Gt06Error, Packet, UtcOffset};

use super::protocol::{DeviceProtocol, Login, Malformed, Records, Reply, Step};

/// Metric label of stored GT06 locations (the `codec` label of the frame and record counters).
const LABEL: &str = "gt06";
/// Metric label of GT06 packets kept raw.
const RAW_LABEL: &str = "gt06_raw";

pub(super) struct Gt06 {
    frames: FrameDecoder,
    /// How the devices' clocks are read (the pool's `gt06.utcOffsetMinutes`).
    utc_offset: UtcOffset,
}

impl Gt06 {
    pub(super) fn new(limits: Limits, settings: &trackgate_api::Gt06Settings) -> Self {
        Self {
            frames: FrameDecoder::new(limits),
            // Validated when the config was read.
            utc_offset: UtcOffset::from_minutes(settings.utc_offset_minutes).unwrap_or_default(),
        }
    }
}

fn malformed(err: &Gt06Error) -> Malformed {
    Malformed::new(err.reason(), None, err)
}

impl DeviceProtocol for Gt06 {
    const COMMANDS: bool = false;

    fn login(&mut self, buf: &mut BytesMut) -> Result<Option<Login>, Malformed> {
        let Some(frame) = self.frames.decode(buf).map_err(|e| malformed(&e))? else {
            return Ok(None);
        };
        match Packet::decode(&frame, self.utc_offset) {
            Ok(Packet::Login(login)) => Ok(Some(Login {
                imei: login.imei,
                accepted: gt06::reply_to(&frame).into(),
                // NB: GT06 has no "refused" answer, and an echo would tell the device it is
                // logged in.
                refused: Reply::NONE,
            })),
            Ok(_) => Err(Malformed::new(
                "not_login",
                None,
                "first packet is not a login",
            )),
            Err(err) => Err(malformed(&err)),
        }
    }

    fn frame(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, Malformed> {
        let Some(frame) = self.frames.decode(buf).map_err(|e| malformed(&e))? else {
            return Ok(None);
        };
        let reply = gt06::reply_to(&frame).into();
        match Packet::decode(&frame, self.utc_offset) {
            Ok(Packet::Location(location) | Packet::Alarm(location)) => Ok(Some(Step::Store {
                records: Records::Gt06(location),
                ack: reply,
                label: LABEL,
            })),
            // The keep-alive, and a repeated login of the same device: answered, nothing stored.
            Ok(Packet::Heartbeat(_) | Packet::Login(_)) => Ok(Some(Step::Answer(reply))),
            Ok(_) => Ok(Some(Step::Raw {
                protocol: frame.protocol,
                payload: frame.content,
                reply,
                label: RAW_LABEL,
            })),
            Err(err) => Err(malformed(&err)),
        }
    }
}
