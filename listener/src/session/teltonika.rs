//! Teltonika through the session's seam: the IMEI login (`0x01` / `0x00` reply), then AVL
//! frames acked with their record count once stored, `0xFF` keep-alives absorbed unanswered,
//! and Codec 12-15 frames handed to the command side.

use bytes::BytesMut;
use trackgate_protocol::{Frame, FrameDecoder, Limits, LoginDecoder, encode_ack, login_reply};

use super::protocol::{DeviceProtocol, Login, Malformed, Records, Reply, Step};

pub(super) struct Teltonika {
    login: LoginDecoder,
    frames: FrameDecoder,
}

impl Teltonika {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            login: LoginDecoder::new(limits),
            frames: FrameDecoder::new(limits),
        }
    }
}

fn malformed(err: &trackgate_protocol::FrameError) -> Malformed {
    Malformed::new(err.reason(), err.offset(), err)
}

impl DeviceProtocol for Teltonika {
    const COMMANDS: bool = true;

    fn login(&mut self, buf: &mut BytesMut) -> Result<Option<Login>, Malformed> {
        Ok(self
            .login
            .decode(buf)
            .map_err(|e| malformed(&e))?
            .map(|imei| Login {
                imei,
                accepted: Reply::of(&[login_reply(true)]),
                refused: Reply::of(&[login_reply(false)]),
            }))
    }

    fn frame(&mut self, buf: &mut BytesMut) -> Result<Option<Step>, Malformed> {
        let frame = self.frames.decode(buf).map_err(|e| malformed(&e))?;
        Ok(frame.map(|frame| match frame {
            Frame::KeepAlive => Step::Answer(Reply::NONE),
            Frame::Command(command) => Step::Command(command),
            Frame::Avl(packet) => {
                let count = u32::try_from(packet.records.len()).unwrap_or(u32::MAX);
                Step::Store {
                    label: packet.codec.label(),
                    ack: Reply::of(&encode_ack(count)),
                    records: Records::Teltonika(packet),
                }
            }
        }))
    }
}
