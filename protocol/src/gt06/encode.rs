//! The device-side encoders: [`Packet`] back to the content it was decoded from (the
//! simulator's packets, and the round-trip tests' canonical form).

use bytes::{BufMut, BytesMut};

use super::packet::{LbsForm, location_layout};
use super::time::encode_time;
use super::{
    Frame, Gt06EncodeError, Lbs, Location, Login, Packet, Status, UNITS_PER_DEGREE, UtcOffset,
};

impl Packet {
    /// Appends the packet's content (what goes between the protocol number and the serial),
    /// writing times in the device's clock (`offset`).
    ///
    /// # Errors
    /// A time the date field cannot hold, or a value wider than its field in the layout
    /// (e.g. a LAC over 65,535 in `0x12`); `dst` is left as it was.
    pub fn encode_content(
        &self,
        offset: UtcOffset,
        dst: &mut BytesMut,
    ) -> Result<(), Gt06EncodeError> {
        let start = dst.len();
        let result = match self {
            Packet::Login(l) => {
                encode_login(l, dst);
                Ok(())
            }
            Packet::Heartbeat(h) => encode_status(&h.status, h.protocol == 0x23, dst).map(|()| {
                dst.put_slice(&h.extra);
            }),
            Packet::Location(l) | Packet::Alarm(l) => encode_location(l, offset, dst),
            Packet::Info(i) => {
                dst.put_u8(i.kind);
                dst.put_slice(&i.data);
                Ok(())
            }
            Packet::Raw(r) => {
                dst.put_slice(&r.content);
                Ok(())
            }
        };
        if result.is_err() {
            dst.truncate(start);
        }
        result
    }

    /// The packet as a frame with serial number `serial`: a `78 78` frame when the content
    /// fits one, `79 79` otherwise.
    ///
    /// # Errors
    /// As [`Packet::encode_content`], or a content over 65,530 bytes.
    pub fn to_frame(&self, serial: u16, offset: UtcOffset) -> Result<Frame, Gt06EncodeError> {
        let mut content = BytesMut::new();
        self.encode_content(offset, &mut content)?;
        let len = content.len();
        if len > usize::from(u16::MAX) - 5 {
            return Err(Gt06EncodeError::TooLong { len });
        }
        Ok(Frame {
            extended: len > super::frame::MAX_SHORT_CONTENT,
            protocol: self.protocol(),
            content: content.freeze(),
            serial,
        })
    }
}

fn field(field: &'static str) -> Gt06EncodeError {
    Gt06EncodeError::Field { field }
}

fn encode_login(l: &Login, dst: &mut BytesMut) {
    dst.put_slice(&l.imei.to_packed());
    if let Some(t) = l.type_id {
        dst.put_u16(t);
        if let Some(z) = l.time_zone_language {
            dst.put_u16(z);
        }
    }
}

fn encode_status(s: &Status, wide: bool, dst: &mut BytesMut) -> Result<(), Gt06EncodeError> {
    dst.put_u8(s.terminal_info);
    if wide {
        dst.put_u16(s.voltage);
    } else {
        dst.put_u8(u8::try_from(s.voltage).map_err(|_| field("voltage"))?);
    }
    dst.put_u8(s.gsm_signal);
    dst.put_u16(s.alarm_language);
    Ok(())
}

fn encode_location(
    l: &Location,
    offset: UtcOffset,
    dst: &mut BytesMut,
) -> Result<(), Gt06EncodeError> {
    let Some((form, has_status)) = location_layout(l.protocol) else {
        return Err(field("protocol"));
    };
    let g = &l.gps;
    if g.latitude > 90 * UNITS_PER_DEGREE || g.longitude > 180 * UNITS_PER_DEGREE {
        return Err(field("coordinates"));
    }
    dst.put_slice(&encode_time(g.timestamp_ms, offset)?);
    dst.put_u8(g.info);
    dst.put_u32(g.latitude);
    dst.put_u32(g.longitude);
    dst.put_u8(g.speed);
    dst.put_u16(g.course_status);
    match (form, &l.lbs) {
        (LbsForm::None, None) => {}
        (LbsForm::None, Some(_)) | (_, None) => return Err(field("lbs")),
        (form, Some(lbs)) => encode_lbs(lbs, form, dst)?,
    }
    match (has_status, &l.status) {
        (true, Some(s)) => encode_status(s, false, dst)?,
        (false, None) => {}
        _ => return Err(field("status")),
    }
    dst.put_slice(&l.extra);
    Ok(())
}

fn encode_lbs(lbs: &Lbs, form: LbsForm, dst: &mut BytesMut) -> Result<(), Gt06EncodeError> {
    match (form, lbs.length) {
        (LbsForm::WithLength, Some(len)) => dst.put_u8(len),
        (LbsForm::WithLength, None) | (_, Some(_)) => return Err(field("lbs_length")),
        _ => {}
    }
    dst.put_u16(lbs.mcc);
    if lbs.mcc & 0x8000 != 0 {
        dst.put_u16(lbs.mnc);
    } else {
        dst.put_u8(u8::try_from(lbs.mnc).map_err(|_| field("mnc"))?);
    }
    if form == LbsForm::Long {
        dst.put_u32(lbs.lac);
        dst.put_u64(lbs.cell_id);
    } else {
        dst.put_u16(u16::try_from(lbs.lac).map_err(|_| field("lac"))?);
        let cell = u32::try_from(lbs.cell_id)
            .ok()
            .filter(|&c| c <= 0x00FF_FFFF)
            .ok_or(field("cell_id"))?;
        dst.put_slice(&cell.to_be_bytes()[1..]);
    }
    Ok(())
}
