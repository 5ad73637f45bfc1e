//! GT06 property tests: packet → frame → packet round trips for every decoded layout (at any
//! UTC offset), chunk-split invariance of the frame decoder, and arbitrary or corrupted input
//! never panicking nor buffering past the limit.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use trackgate_protocol::gt06::{
    FrameDecoder, Gps, Heartbeat, Info, Lbs, Location, Login, Packet, RawPacket, Status,
    UNITS_PER_DEGREE, UtcOffset, encode_frame, encode_packet, is_known_protocol,
};
use trackgate_protocol::{Imei, Limits};

// === Strategies ===

fn offset() -> impl Strategy<Value = UtcOffset> {
    (-UtcOffset::MAX_MINUTES..=UtcOffset::MAX_MINUTES)
        .prop_map(|m| UtcOffset::from_minutes(m).unwrap())
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn status(wide: bool) -> impl Strategy<Value = Status> {
    let voltage = if wide {
        any::<u16>().boxed()
    } else {
        any::<u8>().prop_map(u16::from).boxed()
    };
    (any::<u8>(), voltage, any::<u8>(), any::<u16>()).prop_map(|(t, v, g, a)| Status {
        terminal_info: t,
        voltage: v,
        gsm_signal: g,
        alarm_language: a,
    })
}

fn gps() -> impl Strategy<Value = Gps> {
    // Whole seconds from 2000-01-02 to 2255-12-30 (inside the date field at any offset).
    (
        946_771_200u64..9_000_000_000,
        any::<u8>(),
        0..=90 * UNITS_PER_DEGREE,
        0..=180 * UNITS_PER_DEGREE,
        any::<u8>(),
        any::<u16>(),
    )
        .prop_map(
            |(secs, info, latitude, longitude, speed, course_status)| Gps {
                timestamp_ms: secs * 1000,
                info,
                latitude,
                longitude,
                speed,
                course_status,
            },
        )
}

fn lbs(protocol: u8) -> impl Strategy<Value = Lbs> {
    let long = protocol == 0xA0;
    let with_length = matches!(protocol, 0x16 | 0x26 | 0x27);
    (
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<u8>(),
    )
        .prop_map(move |(mcc, mnc, lac, cell, len)| Lbs {
            length: with_length.then_some(len),
            mcc,
            mnc: if mcc & 0x8000 != 0 { mnc } else { mnc & 0xFF },
            lac: if long { lac } else { lac & 0xFFFF },
            cell_id: if long { cell } else { cell & 0x00FF_FFFF },
        })
}

fn location() -> impl Strategy<Value = Packet> {
    prop::sample::select(vec![0x10u8, 0x12, 0x22, 0xA0, 0x16, 0x26, 0x27]).prop_flat_map(|p| {
        let alarm = matches!(p, 0x16 | 0x26 | 0x27);
        (gps(), lbs(p), status(false), bytes(24)).prop_map(move |(gps, lbs, status, extra)| {
            let l = Location {
                protocol: p,
                gps,
                lbs: (p != 0x10).then_some(lbs),
                status: alarm.then_some(status),
                extra,
            };
            if alarm {
                Packet::Alarm(l)
            } else {
                Packet::Location(l)
            }
        })
    })
}

fn packet() -> impl Strategy<Value = Packet> {
    let login = (
        "[0-9]{15}",
        proptest::option::of((any::<u16>(), proptest::option::of(any::<u16>()))),
    )
        .prop_map(|(imei, ext)| {
            Packet::Login(Login {
                imei: Imei::parse(&imei).unwrap(),
                type_id: ext.map(|(t, _)| t),
                time_zone_language: ext.and_then(|(_, z)| z),
            })
        });
    let heartbeat = prop::sample::select(vec![0x13u8, 0x23]).prop_flat_map(|p| {
        (status(p == 0x23), bytes(16)).prop_map(move |(status, extra)| {
            Packet::Heartbeat(Heartbeat {
                protocol: p,
                status,
                extra,
            })
        })
    });
    let info = (any::<u8>(), bytes(300)).prop_map(|(kind, data)| Packet::Info(Info { kind, data }));
    let raw = (
        any::<u8>().prop_filter("no decoded layout", |p| !is_known_protocol(*p)),
        bytes(300),
    )
        .prop_map(|(protocol, content)| Packet::Raw(RawPacket { protocol, content }));
    prop_oneof![1 => login, 1 => heartbeat, 4 => location(), 1 => info, 1 => raw]
}

/// Decodes `chunks` fed one after another, then EOF.
fn decode_chunks(chunks: &[&[u8]], offset: UtcOffset) -> Vec<(u16, Packet)> {
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut push = |f: trackgate_protocol::gt06::Frame| {
        out.push((f.serial, Packet::decode(&f, offset).unwrap()));
    };
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            push(f);
        }
    }
    while let Some(f) = dec.decode_eof(&mut buf).unwrap() {
        push(f);
    }
    out
}

// === Properties ===

proptest! {
    #[test]
    fn packet_round_trip(p in packet(), serial: u16, offset in offset()) {
        let mut buf = BytesMut::new();
        encode_packet(&p, serial, offset, &mut buf).unwrap();
        let f = FrameDecoder::new(Limits::default()).decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(f.serial, serial);
        prop_assert_eq!(f.extended, f.content.len() > 250);
        prop_assert_eq!(Packet::decode(&f, offset).unwrap(), p);
        let mut again = BytesMut::new();
        encode_frame(&f, &mut again).unwrap();
        prop_assert_eq!(again.len(), f.wire_len());
    }

    /// Any split of a valid multi-frame stream yields the same packets.
    #[test]
    fn chunk_split_invariance(
        packets in proptest::collection::vec(packet(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        offset in offset(),
    ) {
        let mut stream = BytesMut::new();
        for (i, p) in packets.iter().enumerate() {
            encode_packet(p, i as u16, offset, &mut stream).unwrap();
        }
        let want: Vec<(u16, Packet)> =
            packets.into_iter().enumerate().map(|(i, p)| (i as u16, p)).collect();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.extend([0, stream.len()]);
        points.sort_unstable();
        points.dedup();
        let chunks: Vec<&[u8]> = points.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
        prop_assert_eq!(decode_chunks(&chunks, offset), want.clone());
        prop_assert_eq!(decode_chunks(&[&stream[..]], offset), want);
    }

    /// Arbitrary bytes in arbitrary chunks: no panic, and while the decoder waits it holds
    /// less than the limit.
    #[test]
    fn arbitrary_bytes_never_panic_nor_overbuffer(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..300,
        limit in 10usize..2048,
        start_bits in prop::sample::select(vec![None, Some(0x78u8), Some(0x79)]),
    ) {
        let mut data = data;
        if let (Some(b), true) = (start_bits, data.len() >= 4) {
            // Get past the start bits so the length, stop-bit and CRC paths run too.
            data[0] = b;
            data[1] = b;
        }
        let mut dec = FrameDecoder::new(Limits::new(limit));
        let mut buf = BytesMut::new();
        'feed: for c in data.chunks(chunk) {
            buf.extend_from_slice(c);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        prop_assert!(f.wire_len() <= limit);
                        let _ = Packet::decode(&f, UtcOffset::UTC);
                    }
                    Ok(None) => {
                        prop_assert!(buf.len() < limit.max(4));
                        prop_assert!(buf.capacity() <= 2 * (limit.max(4) + chunk));
                        break;
                    }
                    Err(e) => {
                        prop_assert!(!e.reason().is_empty());
                        break 'feed;
                    }
                }
            }
        }
    }

    /// Valid frames with bytes overwritten: rejected cleanly or (CRC collision, or a byte of
    /// the content that still decodes) decoded, never a panic; a decoded one is canonical.
    #[test]
    fn corrupted_frames_never_panic(
        p in packet(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut buf = BytesMut::new();
        encode_packet(&p, 1, UtcOffset::UTC, &mut buf).unwrap();
        for (i, b) in &flips {
            let at = i.index(buf.len());
            buf[at] = *b;
        }
        if let Ok(Some(f)) = FrameDecoder::new(Limits::default()).decode_eof(&mut buf)
            && let Ok(p) = Packet::decode(&f, UtcOffset::UTC)
        {
            let mut content = BytesMut::new();
            p.encode_content(UtcOffset::UTC, &mut content).unwrap();
            prop_assert_eq!(&content[..], &f.content[..]);
        }
    }
}
