//! What a GT06 frame's content means, by protocol number, and the device-side encoders.
//!
//! Decoded layouts (the Concox GT06/GT06N and GK310 documents, cross-checked with traccar's
//! `Gt06ProtocolDecoder` and its test packets):
//!
//! | protocol | packet | content |
//! |---|---|---|
//! | `0x01` | login | terminal id (8 B BCD) [, type id (2 B) [, time zone / language (2 B)]] |
//! | `0x13` | status (heartbeat) | terminal info, voltage level, GSM signal, alarm/language (2 B) |
//! | `0x23` | heartbeat (GK310) | terminal info, voltage (2 B, 0.01 V), GSM signal, language (2 B) |
//! | `0x10` | location | GPS |
//! | `0x12`, `0x22` | location | GPS, LBS (MCC, MNC, LAC 2 B, cell 3 B) |
//! | `0xA0` | location (4G) | GPS, LBS (MCC, MNC, LAC 4 B, cell 8 B) |
//! | `0x16`, `0x26`, `0x27` | alarm | GPS, LBS length + LBS, status (as `0x13`) |
//! | `0x94` | information | sub-type, data |
//!
//! GPS is `YY MM DD hh mm ss | GPS info (length << 4 | satellites) | latitude u32 |
//! longitude u32 | speed u8 (km/h) | course/status u16`, coordinates in 1/1,800,000 degree
//! (minutes × 30,000). Bytes after a decoded layout (mileage, ACC, upload mode, model-specific
//! fields) are kept raw in `extra`. Any other protocol number, and a known one whose content
//! does not fit its layout (too short, an impossible date, a coordinate beyond ±90°/±180°:
//! GT06 clones reuse numbers for other layouts), is kept raw as [`Packet::Raw`]: never an
//! error. Only a malformed login is an error, because the session's identity depends on it.
//!
//! Every decoded packet re-encodes to exactly the content it came from (with the same
//! [`UtcOffset`]).

use bytes::Bytes;

use super::time::decode_time;
use super::{Frame, Gt06Error, UtcOffset};
use crate::Imei;

// === Types ===

/// A decoded GT06 packet. Non-exhaustive: more layouts will get their own variant (and leave
/// [`Packet::Raw`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Packet {
    /// `0x01`: the device's identity, the first packet of a session.
    Login(Login),
    /// `0x13` status or `0x23` heartbeat: the keep-alive, with the terminal's state.
    Heartbeat(Heartbeat),
    /// `0x10`, `0x12`, `0x22`, `0xA0`: a position.
    Location(Location),
    /// `0x16`, `0x26`, `0x27`: a position with the terminal's status and an alarm code.
    Alarm(Location),
    /// `0x94`: an information packet (external voltage, ICCID, status text, …).
    Info(Info),
    /// Any other packet, or a known number whose content is some other layout: kept raw.
    Raw(RawPacket),
}

/// `0x01` login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Login {
    /// The terminal id, which is the IMEI (BCD with a leading zero nibble).
    pub imei: Imei,
    /// Type identification code (model), sent by newer firmware.
    pub type_id: Option<u16>,
    /// Time-zone/language word (needs `type_id`): bits 15-4 the offset as `hhmm` in decimal,
    /// bit 3 set for west of UTC, bits 1-0 the language.
    pub time_zone_language: Option<u16>,
}

impl Login {
    /// The device's UTC offset from its time-zone word, when it sent one that is in range.
    pub fn utc_offset(&self) -> Option<UtcOffset> {
        let word = self.time_zone_language?;
        let hhmm = word >> 4;
        let (hours, minutes) = (hhmm / 100, hhmm % 100);
        if minutes >= 60 {
            return None;
        }
        let total = i16::try_from(hours * 60 + minutes).ok()?;
        UtcOffset::from_minutes(if word & 0x08 != 0 { -total } else { total })
    }
}

/// The terminal-state block of heartbeats and alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status {
    /// Bit 0 armed, bit 1 ACC (ignition) on, bit 2 charging, bits 3-5 alarm (1 shock,
    /// 2 power cut, 3 low battery, 4 SOS), bit 6 GPS tracking on, bit 7 fuel/power cut.
    pub terminal_info: u8,
    /// `0x13` and alarms: voltage level 0 (no power) … 6 (full), one byte on the wire.
    /// `0x23`: battery voltage in 0.01 V, two bytes.
    pub voltage: u16,
    /// GSM signal 0 (none) … 4 (strong).
    pub gsm_signal: u8,
    /// `0x13` and alarms: alarm code << 8 | language. `0x23`: the language word.
    pub alarm_language: u16,
}

impl Status {
    /// Ignition (ACC) on, terminal-info bit 1.
    pub fn is_acc_on(&self) -> bool {
        self.terminal_info & 0x02 != 0
    }

    /// The alarm code (`0x01` SOS, `0x02` power cut, `0x03` shock, `0x04` fence in, `0x05`
    /// fence out, `0x06` overspeed, …); `None` for `0x23`, which has none.
    pub fn alarm(&self, protocol: u8) -> Option<u8> {
        (protocol != 0x23).then_some((self.alarm_language >> 8) as u8)
    }
}

/// `0x13` / `0x23` heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Heartbeat {
    /// `0x13` or `0x23`: fixes the widths of [`Status`].
    pub protocol: u8,
    /// The terminal state.
    pub status: Status,
    /// Bytes after the standard layout, raw.
    pub extra: Bytes,
}

/// The GPS block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gps {
    /// Device time in ms since the epoch, UTC (the wire time less the [`UtcOffset`]).
    pub timestamp_ms: u64,
    /// High nibble: length of the GPS block as the device counts it (12); low: satellites.
    pub info: u8,
    /// Latitude magnitude in 1/1,800,000 degree; the hemisphere is in `course_status`.
    pub latitude: u32,
    /// Longitude magnitude in 1/1,800,000 degree.
    pub longitude: u32,
    /// km/h.
    pub speed: u8,
    /// Bits 9-0 course (degrees), bit 10 north, bit 11 west, bit 12 positioned (fix),
    /// bit 13 differential, bit 14 "bit 15 is ACC", bit 15 ACC.
    pub course_status: u16,
}

/// Wire units per degree of latitude and longitude.
pub const UNITS_PER_DEGREE: u32 = 1_800_000;

impl Gps {
    /// Satellites in use.
    pub fn satellites(&self) -> u8 {
        self.info & 0x0F
    }

    /// Heading, degrees from north.
    pub fn course(&self) -> u16 {
        self.course_status & 0x03FF
    }

    /// The position is a GPS fix (not the last known one).
    pub fn is_positioned(&self) -> bool {
        self.course_status & 0x1000 != 0
    }

    /// Signed latitude in degrees × 10^7, rounded to nearest (the wire unit is 5/9 of it).
    pub fn latitude_e7(&self) -> i32 {
        signed_e7(self.latitude, self.course_status & 0x0400 == 0)
    }

    /// Signed longitude in degrees × 10^7, rounded to nearest.
    pub fn longitude_e7(&self) -> i32 {
        signed_e7(self.longitude, self.course_status & 0x0800 != 0)
    }

    /// Ignition from the course word, where the device says it put it there (bit 14).
    pub fn acc(&self) -> Option<bool> {
        (self.course_status & 0x4000 != 0).then_some(self.course_status & 0x8000 != 0)
    }
}

/// `units` of 1/1,800,000° → degrees × 10^7, rounded half up: `units × 50 / 9`.
fn signed_e7(units: u32, negative: bool) -> i32 {
    // Decoded magnitudes are at most 180° (324,000,000 units), so this fits an i32.
    let e7 = (u64::from(units) * 50 + 4) / 9;
    let e7 = i32::try_from(e7).unwrap_or(i32::MAX);
    if negative { -e7 } else { e7 }
}

/// A cell tower (LBS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lbs {
    /// The LBS length byte of alarm packets (`0x16`, `0x26`, `0x27`); `None` elsewhere.
    pub length: Option<u8>,
    /// Mobile country code; bit 15 set means the MNC is two bytes.
    pub mcc: u16,
    /// Mobile network code.
    pub mnc: u16,
    /// Location area code (2 bytes on the wire, 4 in `0xA0`).
    pub lac: u32,
    /// Cell id (3 bytes on the wire, 8 in `0xA0`).
    pub cell_id: u64,
}

impl Lbs {
    /// The MCC without its width flag.
    pub fn country(&self) -> u16 {
        self.mcc & 0x7FFF
    }
}

/// A position report (`0x10`, `0x12`, `0x22`, `0xA0`) or an alarm (`0x16`, `0x26`, `0x27`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    /// The protocol number: fixes the layout (which blocks, which LBS widths).
    pub protocol: u8,
    /// Time and position.
    pub gps: Gps,
    /// The serving cell, in every type but `0x10`.
    pub lbs: Option<Lbs>,
    /// Terminal state and alarm code, in alarms only.
    pub status: Option<Status>,
    /// Bytes after the decoded layout, raw: for `0x22`/`0xA0` ACC, upload mode and
    /// re-upload flag (1 byte each), then on some models mileage (u32, m).
    pub extra: Bytes,
}

/// `0x94` information: a sub-type and its data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Info {
    /// `0x00` external voltage, `0x04` status sync (ASCII), `0x05` door status, `0x0A`
    /// IMEI/IMSI/ICCID, … (model-dependent beyond these).
    pub kind: u8,
    /// The data after the sub-type, raw.
    pub data: Bytes,
}

impl Info {
    /// Sub-type `0x00`: external (vehicle) voltage in 0.01 V.
    pub fn external_voltage(&self) -> Option<u16> {
        match (self.kind, &self.data[..]) {
            (0x00, &[hi, lo]) => Some(u16::from_be_bytes([hi, lo])),
            _ => None,
        }
    }

    /// Sub-type `0x0A`: the SIM's ICCID (the last 10 of IMEI 8, IMSI 8, ICCID 10 bytes, BCD
    /// with `f` padding removed).
    pub fn iccid(&self) -> Option<String> {
        match (self.kind, self.data.get(16..26)) {
            (0x0A, Some(b)) if self.data.len() == 26 => Some(
                b.iter()
                    .flat_map(|b| [b >> 4, b & 0x0F])
                    .filter(|&n| n != 0x0F)
                    .map(|n| char::from_digit(u32::from(n), 16).unwrap_or('?'))
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// A packet kept as it came.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawPacket {
    /// The protocol number.
    pub protocol: u8,
    /// The content, raw.
    pub content: Bytes,
}

// === Layouts ===

/// Which LBS block a location type carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum LbsForm {
    None,
    /// MCC 2, MNC 1|2, LAC 2, cell 3.
    Short,
    /// A length byte, then `Short`.
    WithLength,
    /// MCC 2, MNC 1|2, LAC 4, cell 8.
    Long,
}

pub(super) fn location_layout(protocol: u8) -> Option<(LbsForm, bool)> {
    Some(match protocol {
        0x10 => (LbsForm::None, false),
        0x12 | 0x22 => (LbsForm::Short, false),
        0xA0 => (LbsForm::Long, false),
        0x16 | 0x26 | 0x27 => (LbsForm::WithLength, true),
        _ => return None,
    })
}

/// Protocol numbers with a decoded layout.
pub(super) fn is_known(protocol: u8) -> bool {
    matches!(protocol, 0x01 | 0x13 | 0x23 | 0x94) || location_layout(protocol).is_some()
}

// === Decode ===

impl Packet {
    /// Interprets a frame's content; `offset` says how to read the device's clock.
    ///
    /// # Errors
    /// Only for a login (`0x01`) whose content is not 8, 10 or 12 bytes or whose terminal id
    /// is not a BCD IMEI; every other content decodes (to [`Packet::Raw`] when it does not
    /// fit a known layout).
    pub fn decode(frame: &Frame, offset: UtcOffset) -> Result<Packet, Gt06Error> {
        let content_at = if frame.extended { 5 } else { 4 };
        let content = &frame.content;
        let p = frame.protocol;
        if p == 0x01 {
            return decode_login(content, content_at).map(Packet::Login);
        }
        let decoded = match p {
            0x13 | 0x23 => decode_heartbeat(p, content).map(Packet::Heartbeat),
            0x94 => content.first().map(|&kind| {
                Packet::Info(Info {
                    kind,
                    data: content.slice(1..),
                })
            }),
            _ => location_layout(p).and_then(|(lbs, status)| {
                let loc = decode_location(p, lbs, status, content, offset)?;
                Some(if status {
                    Packet::Alarm(loc)
                } else {
                    Packet::Location(loc)
                })
            }),
        };
        Ok(decoded.unwrap_or_else(|| {
            Packet::Raw(RawPacket {
                protocol: p,
                content: content.clone(),
            })
        }))
    }

    /// The protocol number the packet travels under.
    pub fn protocol(&self) -> u8 {
        match self {
            Packet::Login(_) => 0x01,
            Packet::Heartbeat(h) => h.protocol,
            Packet::Location(l) | Packet::Alarm(l) => l.protocol,
            Packet::Info(_) => 0x94,
            Packet::Raw(r) => r.protocol,
        }
    }
}

/// A bounds-checked cursor whose reads say `None` past the end: a short content is another
/// layout, not an error.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.array().map(u8::from_be_bytes)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    fn used(&self, content: &[u8]) -> usize {
        content.len() - self.0.len()
    }
}

fn decode_login(content: &[u8], at: usize) -> Result<Login, Gt06Error> {
    let (id, rest) = content
        .split_first_chunk::<8>()
        .filter(|_| matches!(content.len(), 8 | 10 | 12))
        .ok_or(Gt06Error::LoginLength {
            len: content.len(),
            offset: at,
        })?;
    let imei = Imei::from_packed(id, at).map_err(|e| Gt06Error::Imei {
        offset: e.offset().unwrap_or(at),
    })?;
    let word = |i: usize| rest.get(i..i + 2).map(|w| u16::from_be_bytes([w[0], w[1]]));
    Ok(Login {
        imei,
        type_id: word(0),
        time_zone_language: word(2),
    })
}

fn decode_status(c: &mut Cursor<'_>, wide: bool) -> Option<Status> {
    let terminal_info = c.u8()?;
    let voltage = if wide { c.u16()? } else { u16::from(c.u8()?) };
    Some(Status {
        terminal_info,
        voltage,
        gsm_signal: c.u8()?,
        alarm_language: c.u16()?,
    })
}

fn decode_heartbeat(protocol: u8, content: &Bytes) -> Option<Heartbeat> {
    let mut c = Cursor(content);
    let status = decode_status(&mut c, protocol == 0x23)?;
    Some(Heartbeat {
        protocol,
        status,
        extra: content.slice(c.used(content)..),
    })
}

fn decode_gps(c: &mut Cursor<'_>, offset: UtcOffset) -> Option<Gps> {
    let timestamp_ms = decode_time(c.array()?, offset)?;
    let gps = Gps {
        timestamp_ms,
        info: c.u8()?,
        latitude: c.u32()?,
        longitude: c.u32()?,
        speed: c.u8()?,
        course_status: c.u16()?,
    };
    let in_range = gps.latitude <= 90 * UNITS_PER_DEGREE && gps.longitude <= 180 * UNITS_PER_DEGREE;
    in_range.then_some(gps)
}

fn decode_lbs(c: &mut Cursor<'_>, form: LbsForm) -> Option<Lbs> {
    let length = match form {
        LbsForm::None => return None,
        LbsForm::WithLength => Some(c.u8()?),
        LbsForm::Short | LbsForm::Long => None,
    };
    let mcc = c.u16()?;
    let mnc = if mcc & 0x8000 != 0 {
        c.u16()?
    } else {
        u16::from(c.u8()?)
    };
    let (lac, cell_id) = if form == LbsForm::Long {
        (c.u32()?, u64::from_be_bytes(c.array()?))
    } else {
        let lac = c.u16()?;
        let [a, b, d] = c.array()?;
        (u32::from(lac), u64::from(u32::from_be_bytes([0, a, b, d])))
    };
    Some(Lbs {
        length,
        mcc,
        mnc,
        lac,
        cell_id,
    })
}

fn decode_location(
    protocol: u8,
    form: LbsForm,
    has_status: bool,
    content: &Bytes,
    offset: UtcOffset,
) -> Option<Location> {
    let mut c = Cursor(content);
    let gps = decode_gps(&mut c, offset)?;
    let lbs = match form {
        LbsForm::None => None,
        _ => Some(decode_lbs(&mut c, form)?),
    };
    let status = match has_status {
        true => Some(decode_status(&mut c, false)?),
        false => None,
    };
    Some(Location {
        protocol,
        gps,
        lbs,
        status,
        extra: content.slice(c.used(content)..),
    })
}
