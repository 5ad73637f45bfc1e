//! AVL data: Codec 8, 8 Extended and 16 records → [`AvlPacket`], and back.
//!
//! The three codecs share the record header (timestamp, priority, 15-byte GPS element) and
//! differ only in the widths of the event id, the IO counts and the IO ids, plus Codec 16's
//! generation type and 8E's variable-length NX group. [`Layout`] captures those differences so
//! that one parser and one encoder serve all three.

use bytes::{BufMut, Bytes, BytesMut};

use crate::reader::Reader;
use crate::{Codec, EncodeError, FrameError};

// === Types ===

/// One IO element's value, kept raw: the wire gives a width but no signedness or scale, which
/// depend on the device model (a −0.2 °C Dallas reading is `U32(4294967294)`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IoValue {
    /// A 1-byte value.
    U8(u8),
    /// A 2-byte value.
    U16(u16),
    /// A 4-byte value.
    U32(u32),
    /// An 8-byte value.
    U64(u64),
    /// A variable-length value (Codec 8E NX group), e.g. a VIN or a beacon list.
    Var(Bytes),
}

impl IoValue {
    /// Width on the wire in bytes (for `Var`, the length of the value).
    pub fn width(&self) -> usize {
        match self {
            IoValue::U8(_) => 1,
            IoValue::U16(_) => 2,
            IoValue::U32(_) => 4,
            IoValue::U64(_) => 8,
            IoValue::Var(b) => b.len(),
        }
    }

    /// The value as an unsigned integer; `None` for variable-length values.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            IoValue::U8(v) => Some(v.into()),
            IoValue::U16(v) => Some(v.into()),
            IoValue::U32(v) => Some(v.into()),
            IoValue::U64(v) => Some(v),
            IoValue::Var(_) => None,
        }
    }

    /// Index of the wire group that carries this value: 0..=3 fixed widths, 4 the NX group.
    fn group(&self) -> usize {
        match self {
            IoValue::U8(_) => 0,
            IoValue::U16(_) => 1,
            IoValue::U32(_) => 2,
            IoValue::U64(_) => 3,
            IoValue::Var(_) => 4,
        }
    }
}

/// One IO element: an id and its raw value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IoElement {
    /// The IO id (one byte on the wire in Codec 8, two in 8E and 16).
    pub id: u16,
    /// The value.
    pub value: IoValue,
}

/// One AVL record. Coordinates are degrees × 10^7, signed (south and west are negative).
///
/// Decoding yields `io` ordered by wire group (1-, 2-, 4-, 8-byte, then variable-length) and
/// by position within each group; encoding writes each group in the order of `io`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AvlRecord {
    /// Device time, milliseconds since 1970-01-01 UTC.
    pub timestamp_ms: u64,
    /// 0 low, 1 high, 2 panic.
    pub priority: u8,
    /// Longitude, degrees × 10^7.
    pub longitude: i32,
    /// Latitude, degrees × 10^7.
    pub latitude: i32,
    /// Altitude, metres.
    pub altitude: i16,
    /// Heading, degrees from north.
    pub angle: u16,
    /// Satellites in use; 0 means no fix (the position is the last valid one).
    pub satellites: u8,
    /// Speed, km/h.
    pub speed: u16,
    /// The IO id that triggered the record, 0 if none.
    pub event_id: u16,
    /// Codec 16 only: 0 on exit … 7 periodical. `None` for other codecs.
    pub generation_type: Option<u8>,
    /// IO elements, raw.
    pub io: Vec<IoElement>,
}

/// The records of one AVL frame or datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvlPacket {
    /// Codec 8, 8E or 16.
    pub codec: Codec,
    /// The records, in wire order (not necessarily chronological).
    pub records: Vec<AvlRecord>,
}

// === Layout ===

/// Field widths of one AVL codec.
#[derive(Clone, Copy)]
struct Layout {
    codec: Codec,
    /// Event id and IO ids are two bytes (8E, 16) rather than one (8).
    wide_ids: bool,
    /// IO counts are two bytes (8E) rather than one.
    wide_counts: bool,
}

impl Layout {
    const CODEC8: Layout = Layout {
        codec: Codec::Codec8,
        wide_ids: false,
        wide_counts: false,
    };
    const CODEC8_EXT: Layout = Layout {
        codec: Codec::Codec8Ext,
        wide_ids: true,
        wide_counts: true,
    };
    const CODEC16: Layout = Layout {
        codec: Codec::Codec16,
        wide_ids: true,
        wide_counts: false,
    };

    fn for_codec(codec: Codec) -> Option<Layout> {
        match codec {
            Codec::Codec8 => Some(Layout::CODEC8),
            Codec::Codec8Ext => Some(Layout::CODEC8_EXT),
            Codec::Codec16 => Some(Layout::CODEC16),
            _ => None,
        }
    }

    #[inline]
    fn id(self, r: &mut Reader<'_>) -> Result<u16, FrameError> {
        if self.wide_ids {
            r.u16()
        } else {
            r.u8().map(u16::from)
        }
    }

    #[inline]
    fn count(self, r: &mut Reader<'_>) -> Result<u16, FrameError> {
        if self.wide_counts {
            r.u16()
        } else {
            r.u8().map(u16::from)
        }
    }

    fn put_id(self, id: u16, dst: &mut BytesMut) -> Result<(), EncodeError> {
        if self.wide_ids {
            dst.put_u16(id);
        } else {
            let id = u8::try_from(id).map_err(|_| EncodeError::IdTooLarge {
                codec: self.codec,
                id,
            })?;
            dst.put_u8(id);
        }
        Ok(())
    }

    fn put_count(self, count: usize, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let too_many = EncodeError::TooManyIo {
            codec: self.codec,
            count,
        };
        if self.wide_counts {
            dst.put_u16(u16::try_from(count).map_err(|_| too_many)?);
        } else {
            dst.put_u8(u8::try_from(count).map_err(|_| too_many)?);
        }
        Ok(())
    }
}

// === Decode ===

/// Smallest record on the wire (Codec 8 with no IO): 8 + 1 + 15 + 1 + 1 + 4 × 1.
const MIN_RECORD_BYTES: usize = 30;

/// Decodes `codec id | N1 | records | N2` from `r` (which must end exactly after N2).
pub(crate) fn decode_packet(r: &mut Reader<'_>) -> Result<AvlPacket, FrameError> {
    let codec_at = r.pos();
    let id = r.u8()?;
    let codec = Codec::from_id(id).ok_or(FrameError::UnknownCodec {
        id,
        offset: codec_at,
    })?;
    // NB: one copy of the record loop per codec (`decode_records` is always inlined), so the
    // field widths are constants in it and the per-field width branches fold away.
    let records = match codec {
        Codec::Codec8 => decode_records(Layout::CODEC8, r)?,
        Codec::Codec8Ext => decode_records(Layout::CODEC8_EXT, r)?,
        Codec::Codec16 => decode_records(Layout::CODEC16, r)?,
        _ => {
            return Err(FrameError::UnexpectedCodec {
                codec,
                offset: codec_at,
            });
        }
    };
    Ok(AvlPacket { codec, records })
}

#[inline(always)]
fn decode_records(layout: Layout, r: &mut Reader<'_>) -> Result<Vec<AvlRecord>, FrameError> {
    let n1 = r.u8()?;
    // NB: capacity is bounded by what the remaining bytes can hold, never by the count alone.
    let mut records = Vec::with_capacity(usize::from(n1).min(r.remaining() / MIN_RECORD_BYTES));
    for _ in 0..n1 {
        records.push(decode_record(layout, r)?);
    }
    let n2_at = r.pos();
    let n2 = r.u8()?;
    if n1 != n2 {
        return Err(FrameError::CountMismatch {
            n1,
            n2,
            offset: n2_at,
        });
    }
    r.finish()?;
    Ok(records)
}

#[inline(always)]
fn decode_record(layout: Layout, r: &mut Reader<'_>) -> Result<AvlRecord, FrameError> {
    let record_at = r.pos();
    // NB: the fixed header and each IO group are bounds-checked once as a whole, then read
    // from the array/slice; per-field checks were most of the decoding time.
    let h: [u8; 24] = r.array()?;
    let be16 = |i: usize| [h[i], h[i + 1]];
    let be32 = |i: usize| [h[i], h[i + 1], h[i + 2], h[i + 3]];
    let timestamp_ms = u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    let event_id = layout.id(r)?;
    let generation_type = match layout.codec {
        Codec::Codec16 => Some(r.u8()?),
        _ => None,
    };
    let declared = layout.count(r)?;
    // Sized once from the declared total, so the groups never reallocate; each element takes
    // at least two bytes (1-byte id + 1-byte value), which bounds what a lying count reserves.
    let mut io = Vec::with_capacity(usize::from(declared).min(r.remaining() / 2));
    let mut found: u32 = 0;
    for group in 0..4 {
        let n = layout.count(r)?;
        found += u32::from(n);
        let (n, io) = (usize::from(n), &mut io);
        // The group loop is unrolled and `layout` is a constant: one arm survives per group.
        match (layout.wide_ids, group) {
            (false, 0) => read_group(r, n, io, |&[id, v]: &[u8; 2]| (id.into(), IoValue::U8(v))),
            (false, 1) => read_group(r, n, io, |&[id, v @ ..]: &[u8; 3]| {
                (id.into(), IoValue::U16(u16::from_be_bytes(v)))
            }),
            (false, 2) => read_group(r, n, io, |&[id, v @ ..]: &[u8; 5]| {
                (id.into(), IoValue::U32(u32::from_be_bytes(v)))
            }),
            (false, _) => read_group(r, n, io, |&[id, v @ ..]: &[u8; 9]| {
                (id.into(), IoValue::U64(u64::from_be_bytes(v)))
            }),
            (true, 0) => read_group(r, n, io, |&[a, b, v]: &[u8; 3]| {
                (u16::from_be_bytes([a, b]), IoValue::U8(v))
            }),
            (true, 1) => read_group(r, n, io, |&[a, b, v @ ..]: &[u8; 4]| {
                (
                    u16::from_be_bytes([a, b]),
                    IoValue::U16(u16::from_be_bytes(v)),
                )
            }),
            (true, 2) => read_group(r, n, io, |&[a, b, v @ ..]: &[u8; 6]| {
                (
                    u16::from_be_bytes([a, b]),
                    IoValue::U32(u32::from_be_bytes(v)),
                )
            }),
            (true, _) => read_group(r, n, io, |&[a, b, v @ ..]: &[u8; 10]| {
                (
                    u16::from_be_bytes([a, b]),
                    IoValue::U64(u64::from_be_bytes(v)),
                )
            }),
        }?;
    }
    if layout.codec == Codec::Codec8Ext {
        let n = r.u16()?;
        found += u32::from(n);
        for _ in 0..n {
            let id = r.u16()?;
            let len = r.u16()?;
            let value = IoValue::Var(r.bytes(usize::from(len))?);
            io.push(IoElement { id, value });
        }
    }
    if found != u32::from(declared) {
        return Err(FrameError::IoCount {
            declared,
            found,
            offset: record_at,
        });
    }
    Ok(AvlRecord {
        timestamp_ms,
        priority: h[8],
        longitude: i32::from_be_bytes(be32(9)),
        latitude: i32::from_be_bytes(be32(13)),
        altitude: i16::from_be_bytes(be16(17)),
        angle: u16::from_be_bytes(be16(19)),
        satellites: h[21],
        speed: u16::from_be_bytes(be16(22)),
        event_id,
        generation_type,
        io,
    })
}

/// Reads `n` elements of `N` bytes each (id then value), converted by `element`.
#[inline(always)]
fn read_group<const N: usize>(
    r: &mut Reader<'_>,
    n: usize,
    io: &mut Vec<IoElement>,
    element: impl Fn(&[u8; N]) -> (u16, IoValue),
) -> Result<(), FrameError> {
    let len = n
        .checked_mul(N)
        .ok_or(FrameError::Truncated { offset: r.pos() })?;
    // One bounds check for the group; `as_chunks` gives fixed-size arrays, so reading the
    // fields of an element needs no further checks, and `extend` over an exact-size
    // iterator checks the capacity once.
    let (elements, _) = r.slice(len)?.as_chunks::<N>();
    io.extend(elements.iter().map(|e| {
        let (id, value) = element(e);
        IoElement { id, value }
    }));
    Ok(())
}

// === Encode ===

/// Appends `codec id | N1 | records | N2` (the CRC-covered data field).
pub(crate) fn encode_packet(packet: &AvlPacket, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let layout = Layout::for_codec(packet.codec).ok_or(EncodeError::WrongCodec {
        codec: packet.codec,
    })?;
    let n = u8::try_from(packet.records.len()).map_err(|_| EncodeError::TooManyRecords {
        count: packet.records.len(),
    })?;
    dst.put_u8(packet.codec.id());
    dst.put_u8(n);
    for record in &packet.records {
        encode_record(layout, record, dst)?;
    }
    dst.put_u8(n);
    Ok(())
}

fn encode_record(layout: Layout, rec: &AvlRecord, dst: &mut BytesMut) -> Result<(), EncodeError> {
    dst.put_u64(rec.timestamp_ms);
    dst.put_u8(rec.priority);
    dst.put_i32(rec.longitude);
    dst.put_i32(rec.latitude);
    dst.put_i16(rec.altitude);
    dst.put_u16(rec.angle);
    dst.put_u8(rec.satellites);
    dst.put_u16(rec.speed);
    layout.put_id(rec.event_id, dst)?;
    match (layout.codec, rec.generation_type) {
        (Codec::Codec16, Some(g)) => dst.put_u8(g),
        (Codec::Codec16, None) | (_, Some(_)) => {
            return Err(EncodeError::GenerationType {
                codec: layout.codec,
            });
        }
        (_, None) => {}
    }
    let mut counts = [0usize; 5];
    for e in &rec.io {
        counts[e.value.group()] += 1;
    }
    if counts[4] > 0 && layout.codec != Codec::Codec8Ext {
        let id = rec
            .io
            .iter()
            .find(|e| e.value.group() == 4)
            .map_or(0, |e| e.id);
        return Err(EncodeError::VarNotAllowed {
            codec: layout.codec,
            id,
        });
    }
    layout.put_count(rec.io.len(), dst)?;
    for (group, &count) in counts.iter().enumerate().take(4) {
        layout.put_count(count, dst)?;
        for e in rec.io.iter().filter(|e| e.value.group() == group) {
            layout.put_id(e.id, dst)?;
            match &e.value {
                IoValue::U8(v) => dst.put_u8(*v),
                IoValue::U16(v) => dst.put_u16(*v),
                IoValue::U32(v) => dst.put_u32(*v),
                IoValue::U64(v) => dst.put_u64(*v),
                IoValue::Var(_) => {}
            }
        }
    }
    if layout.codec == Codec::Codec8Ext {
        layout.put_count(counts[4], dst)?;
        for e in &rec.io {
            if let IoValue::Var(v) = &e.value {
                let len = u16::try_from(v.len()).map_err(|_| EncodeError::VarTooLong {
                    id: e.id,
                    len: v.len(),
                })?;
                dst.put_u16(e.id);
                dst.put_u16(len);
                dst.put_slice(v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(codec: Codec) -> AvlRecord {
        AvlRecord {
            timestamp_ms: 1_560_161_086_000,
            priority: 1,
            longitude: -31_000_000,
            latitude: 546_872_345,
            altitude: -12,
            angle: 359,
            satellites: 9,
            speed: 88,
            event_id: 240,
            generation_type: (codec == Codec::Codec16).then_some(7),
            io: vec![
                IoElement {
                    id: 239,
                    value: IoValue::U8(1),
                },
                IoElement {
                    id: 66,
                    value: IoValue::U16(12_345),
                },
                IoElement {
                    id: 72,
                    value: IoValue::U32(u32::MAX - 1),
                },
                IoElement {
                    id: 16,
                    value: IoValue::U64(1 << 40),
                },
            ],
        }
    }

    fn round_trip(packet: &AvlPacket) -> AvlPacket {
        let mut buf = BytesMut::new();
        encode_packet(packet, &mut buf).unwrap();
        let bytes = buf.freeze();
        let mut r = Reader::new(&bytes, 0, bytes.len());
        decode_packet(&mut r).unwrap()
    }

    #[test]
    fn every_avl_codec_round_trips() {
        for codec in [Codec::Codec8, Codec::Codec8Ext, Codec::Codec16] {
            let packet = AvlPacket {
                codec,
                records: vec![record(codec), record(codec)],
            };
            assert_eq!(round_trip(&packet), packet, "codec {codec}");
        }
    }

    #[test]
    fn nx_group_round_trips_zero_copy() {
        let mut rec = record(Codec::Codec8Ext);
        rec.io.push(IoElement {
            id: 256,
            value: IoValue::Var(Bytes::from_static(b"WVWZZZ1JZXW000001")),
        });
        rec.event_id = 385;
        let packet = AvlPacket {
            codec: Codec::Codec8Ext,
            records: vec![rec],
        };
        assert_eq!(round_trip(&packet), packet);
    }

    #[test]
    fn encode_refuses_what_the_codec_cannot_carry() {
        let mut rec = record(Codec::Codec8);
        rec.event_id = 300;
        let p = AvlPacket {
            codec: Codec::Codec8,
            records: vec![rec],
        };
        let err = encode_packet(&p, &mut BytesMut::new()).unwrap_err();
        assert_eq!(err.reason(), "id_too_large");

        let mut rec = record(Codec::Codec16);
        rec.io.push(IoElement {
            id: 1,
            value: IoValue::Var(Bytes::new()),
        });
        let p = AvlPacket {
            codec: Codec::Codec16,
            records: vec![rec],
        };
        let err = encode_packet(&p, &mut BytesMut::new()).unwrap_err();
        assert_eq!(err.reason(), "var_not_allowed");

        let p = AvlPacket {
            codec: Codec::Codec8,
            records: vec![record(Codec::Codec16)],
        };
        let err = encode_packet(&p, &mut BytesMut::new()).unwrap_err();
        assert_eq!(err.reason(), "generation_type");
    }

    #[test]
    fn io_total_must_match_groups() {
        let p = AvlPacket {
            codec: Codec::Codec8,
            records: vec![record(Codec::Codec8)],
        };
        let mut buf = BytesMut::new();
        encode_packet(&p, &mut buf).unwrap();
        // codec, N1, 8+1+15 bytes of header, event id → the IO total is at byte 27.
        assert_eq!(buf[27], 4);
        buf[27] = 5;
        let bytes = buf.freeze();
        let err = decode_packet(&mut Reader::new(&bytes, 0, bytes.len())).unwrap_err();
        assert_eq!((err.reason(), err.offset()), ("io_count", Some(2)));
    }

    #[test]
    fn huge_counts_fail_without_allocating_for_them() {
        // Codec 8E record claiming 65535 IO elements in a tiny body.
        let mut buf = BytesMut::new();
        buf.put_slice(&[0x8E, 1]);
        buf.put_slice(&[0; 24]);
        buf.put_slice(&[0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        let bytes = buf.freeze();
        let err = decode_packet(&mut Reader::new(&bytes, 0, bytes.len())).unwrap_err();
        assert_eq!(err.reason(), "truncated");
    }
}
