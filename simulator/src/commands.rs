//! How a simulated device answers GPRS commands (Codec 12 and 14), the way FMB devices do:
//! `getinfo` and `getver` with their status lines, `setdigout` with the new output state, and
//! the Codec 14 refusal (type 0x11) of a command addressed to another IMEI.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use trackgate_protocol::{Codec, Command, Frame, FrameDecoder, FrameError, Imei, encode_command};

use crate::device::SessionError;

/// The device's answer to a command frame from the server; `None` for what a device leaves
/// unanswered (a frame that is not a command, `cpureset`, which restarts it, or a command
/// it does not know).
pub fn answer(device: &Imei, command: &Command) -> Option<Command> {
    if command.kind != 0x05 || !matches!(command.codec, Codec::Codec12 | Codec::Codec14) {
        return None;
    }
    if command.codec == Codec::Codec14 && command.imei.as_ref() != Some(device) {
        // nACK: the IMEI only.
        return Some(Command {
            codec: Codec::Codec14,
            kind: 0x11,
            imei: Some(*device),
            timestamp: None,
            payload: Bytes::new(),
        });
    }
    let text = String::from_utf8_lossy(&command.payload);
    let mut words = text.split_whitespace();
    let reply = match words.next()? {
        "getinfo" => "RTC:2026/12/1 21:00 Init:2026/12/1 20:00 UpTime:3600s PWR:PwrVoltage RST:0 GPS:3 SAT:9 TTFF:31 TTLF:1 NOGPS:0:0 SR:12 FG:0 FL:0 SMS:0 REC:42 MD:0 DB:0".to_owned(),
        "getver" => format!(
            "Ver:03.28.07_00 GPS:AXN_5.10_3333 Hw:FMB920 Mod:14 IMEI:{} Init:2026-12-1 20:00 Uptime:3600 MAC:0000 SPC:1(0) AXL:0 OBD:0 BL:1.10 BT:4",
            device.as_str()
        ),
        "setdigout" => {
            let state = words.next().unwrap_or("0");
            let outputs: Vec<String> = state
                .chars()
                .enumerate()
                .map(|(i, c)| format!("DOUT{}:{c}", i + 1))
                .collect();
            format!("{} Timeout:INFINITY", outputs.join(" "))
        }
        _ => return None,
    };
    Some(Command {
        codec: command.codec,
        kind: 0x06,
        imei: command.imei,
        timestamp: None,
        payload: reply.into_bytes().into(),
    })
}

/// What the bytes at the head of the device's inbox are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// Four bytes of record count (0, a refusal some servers send, is an ack too).
    Ack,
    /// A frame: four zero bytes, then a non-zero data length.
    Frame,
    /// Too few bytes to tell (four zero bytes alone are an ack of 0 if nothing follows).
    Unknown,
}

pub(crate) fn head(inbox: &[u8]) -> Head {
    match inbox.len() {
        0..4 => Head::Unknown,
        _ if inbox[..4] != [0, 0, 0, 0] => Head::Ack,
        4..8 => Head::Unknown,
        _ if inbox[4..8] == [0, 0, 0, 0] => Head::Ack,
        _ => Head::Frame,
    }
}

/// Splits the command frames off the head of `inbox`; what is left at the head is an ack or
/// the rest of a frame still arriving.
///
/// # Errors
/// A frame that does not decode.
pub(crate) fn take_command_frames(
    inbox: &mut BytesMut,
    decoder: &mut FrameDecoder,
) -> Result<Vec<Command>, FrameError> {
    let mut commands = Vec::new();
    while head(inbox) == Head::Frame {
        match decoder.decode(inbox)? {
            Some(Frame::Command(command)) => commands.push(command),
            Some(_) => {}
            None => break,
        }
    }
    Ok(commands)
}

/// Answers the command frames at the head of `inbox` as the real device would.
pub(crate) async fn answer_commands<W: AsyncWrite + Unpin>(
    imei: &Imei,
    inbox: &mut BytesMut,
    decoder: &mut FrameDecoder,
    wr: &mut W,
) -> Result<(), SessionError> {
    let frames = take_command_frames(inbox, decoder).map_err(SessionError::BadFrame)?;
    for command in frames {
        if let Some(answer) = answer(imei, &command) {
            let mut buf = BytesMut::new();
            encode_command(&answer, &mut buf)?;
            wr.write_all(&buf).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imei() -> Imei {
        Imei::parse("352093081452251").unwrap()
    }

    #[test]
    fn answers_like_an_fmb() {
        let getver = answer(&imei(), &Command::codec12("getver")).unwrap();
        assert_eq!((getver.codec, getver.kind), (Codec::Codec12, 0x06));
        assert!(String::from_utf8_lossy(&getver.payload).contains("IMEI:352093081452251"));
        let dout = answer(&imei(), &Command::codec12("setdigout 10")).unwrap();
        assert_eq!(&dout.payload[..], b"DOUT1:1 DOUT2:0 Timeout:INFINITY");
        assert_eq!(answer(&imei(), &Command::codec12("cpureset")), None);
    }

    #[test]
    fn codec_14_for_another_imei_is_refused() {
        let mine = Command {
            codec: Codec::Codec14,
            imei: Some(imei()),
            ..Command::codec12("getinfo")
        };
        assert_eq!(answer(&imei(), &mine).unwrap().kind, 0x06);
        let theirs = Command {
            imei: Some(Imei::parse("356307042441013").unwrap()),
            ..mine
        };
        let nack = answer(&imei(), &theirs).unwrap();
        assert_eq!((nack.kind, nack.payload.len()), (0x11, 0));
    }

    #[test]
    fn command_frames_are_split_off_and_acks_left() {
        let mut inbox = BytesMut::new();
        encode_command(&Command::codec12("getinfo"), &mut inbox).unwrap();
        inbox.extend_from_slice(&[0, 0, 0, 2]);
        let mut decoder = FrameDecoder::new(trackgate_protocol::Limits::default());
        let commands = take_command_frames(&mut inbox, &mut decoder).unwrap();
        assert_eq!(commands, vec![Command::codec12("getinfo")]);
        assert_eq!(&inbox[..], &[0, 0, 0, 2]);
    }
}
