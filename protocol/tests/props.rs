//! Property tests: encode → decode round trips for every codec (TCP and UDP), chunk-split
//! invariance of the stream decoder, and arbitrary input never panicking or buffering past
//! the limit.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use trackgate_protocol::{
    AvlPacket, AvlRecord, Codec, Command, Frame, FrameDecoder, Imei, IoElement, IoValue, Limits,
    LoginDecoder, UdpDatagram, decode_udp, encode_avl, encode_command, encode_udp,
};

// === Strategies ===

fn group(v: &IoValue) -> u8 {
    match v {
        IoValue::U8(_) => 0,
        IoValue::U16(_) => 1,
        IoValue::U32(_) => 2,
        IoValue::U64(_) => 3,
        IoValue::Var(_) => 4,
    }
}

fn io_value(codec: Codec) -> BoxedStrategy<IoValue> {
    let fixed = prop_oneof![
        any::<u8>().prop_map(IoValue::U8),
        any::<u16>().prop_map(IoValue::U16),
        any::<u32>().prop_map(IoValue::U32),
        any::<u64>().prop_map(IoValue::U64),
    ];
    if codec == Codec::Codec8Ext {
        prop_oneof![
            4 => fixed,
            1 => proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|v| IoValue::Var(Bytes::from(v))),
        ]
        .boxed()
    } else {
        fixed.boxed()
    }
}

fn record(codec: Codec) -> impl Strategy<Value = AvlRecord> {
    let max_id: u16 = if codec == Codec::Codec8 {
        255
    } else {
        u16::MAX
    };
    let io = proptest::collection::vec(
        (0..=max_id, io_value(codec)).prop_map(|(id, value)| IoElement { id, value }),
        0..12,
    );
    let gen_type = if codec == Codec::Codec16 {
        (0u8..8).prop_map(Some).boxed()
    } else {
        Just(None).boxed()
    };
    (
        (
            any::<u64>(),
            0u8..3,
            any::<i32>(),
            any::<i32>(),
            any::<i16>(),
        ),
        (any::<u16>(), any::<u8>(), any::<u16>(), 0..=max_id),
        gen_type,
        io,
    )
        .prop_map(
            |(
                (timestamp_ms, priority, longitude, latitude, altitude),
                (angle, satellites, speed, event_id),
                generation_type,
                mut io,
            )| {
                // The wire groups IO by width, so decoding returns them grouped (stable order).
                io.sort_by_key(|e| group(&e.value));
                AvlRecord {
                    timestamp_ms,
                    priority,
                    longitude,
                    latitude,
                    altitude,
                    angle,
                    satellites,
                    speed,
                    event_id,
                    generation_type,
                    io,
                }
            },
        )
}

fn packet() -> impl Strategy<Value = AvlPacket> {
    prop_oneof![
        Just(Codec::Codec8),
        Just(Codec::Codec8Ext),
        Just(Codec::Codec16)
    ]
    .prop_flat_map(|codec| {
        proptest::collection::vec(record(codec), 0..6)
            .prop_map(move |records| AvlPacket { codec, records })
    })
}

fn imei() -> impl Strategy<Value = Imei> {
    "[0-9]{15}".prop_map(|s| Imei::parse(&s).unwrap())
}

fn command() -> impl Strategy<Value = Command> {
    (
        prop_oneof![
            Just(Codec::Codec12),
            Just(Codec::Codec13),
            Just(Codec::Codec14),
            Just(Codec::Codec15)
        ],
        any::<u8>(),
        imei(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(codec, kind, imei, ts, payload)| Command {
            codec,
            kind,
            imei: matches!(codec, Codec::Codec14 | Codec::Codec15).then_some(imei),
            timestamp: matches!(codec, Codec::Codec13 | Codec::Codec15).then_some(ts),
            payload: Bytes::from(payload),
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        1 => Just(Frame::KeepAlive),
        3 => packet().prop_map(Frame::Avl),
        1 => command().prop_map(Frame::Command),
    ]
}

fn encode_frame(f: &Frame, dst: &mut BytesMut) {
    match f {
        Frame::KeepAlive => dst.extend_from_slice(&[0xFF]),
        Frame::Avl(p) => encode_avl(p, dst).unwrap(),
        Frame::Command(c) => encode_command(c, dst).unwrap(),
    }
}

/// Decodes `chunks` fed one after another, then EOF.
fn decode_chunks(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut dec = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            out.push(f);
        }
    }
    while let Some(f) = dec.decode_eof(&mut buf).unwrap() {
        out.push(f);
    }
    out
}

// === Properties ===

proptest! {
    #[test]
    fn tcp_avl_round_trip(p in packet()) {
        let mut buf = BytesMut::new();
        encode_avl(&p, &mut buf).unwrap();
        let got = FrameDecoder::new(Limits::default()).decode(&mut buf).unwrap();
        prop_assert_eq!(got, Some(Frame::Avl(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn tcp_command_round_trip(c in command()) {
        let mut buf = BytesMut::new();
        encode_command(&c, &mut buf).unwrap();
        let got = FrameDecoder::new(Limits::default()).decode(&mut buf).unwrap();
        prop_assert_eq!(got, Some(Frame::Command(c)));
    }

    #[test]
    fn udp_round_trip(p in packet(), imei in imei(), packet_id: u16, avl_packet_id: u8) {
        let d = UdpDatagram { packet_id, avl_packet_id, imei, packet: p };
        let mut buf = BytesMut::new();
        encode_udp(&d, &mut buf).unwrap();
        prop_assert_eq!(decode_udp(&buf, &Limits::default()).unwrap(), d);
    }

    /// Any split of a valid multi-frame stream yields the same frames.
    #[test]
    fn chunk_split_invariance(
        frames in proptest::collection::vec(frame(), 1..6),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut stream = BytesMut::new();
        for f in &frames {
            encode_frame(f, &mut stream);
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        points.dedup();
        let chunks: Vec<&[u8]> = points.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
        prop_assert_eq!(decode_chunks(&chunks), frames.clone());
        prop_assert_eq!(decode_chunks(&[&stream[..]]), frames);
    }

    /// Arbitrary bytes in arbitrary chunks: no panic, and while the decoder waits, it never
    /// holds more than the limit.
    #[test]
    fn arbitrary_bytes_never_panic_nor_overbuffer(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        chunk in 1usize..300,
        limit in 12usize..2048,
        zero_preamble: bool,
        len_hint: u32,
    ) {
        let mut data = data;
        if zero_preamble && data.len() >= 8 {
            // Get past the preamble check, with a length near the limit, so that the
            // waiting-for-body and body-parsing paths are exercised too.
            data[..4].fill(0);
            data[4..8].copy_from_slice(&(len_hint % limit as u32).to_be_bytes());
        }
        let mut dec = FrameDecoder::new(Limits::new(limit));
        let mut buf = BytesMut::new();
        'feed: for c in data.chunks(chunk) {
            buf.extend_from_slice(c);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        prop_assert!(buf.len() < limit.max(8));
                        // The decoder reserves at most the rest of one frame; the buffer's own
                        // growth policy may at most double that.
                        prop_assert!(buf.capacity() <= 2 * (limit.max(8) + chunk));
                        break;
                    }
                    Err(e) => {
                        prop_assert!(!e.reason().is_empty());
                        break 'feed;
                    }
                }
            }
        }
        let mut login = LoginDecoder::new(Limits::new(limit));
        let mut lbuf = BytesMut::from(&data[..]);
        if let Ok(None) = login.decode(&mut lbuf) {
            prop_assert!(lbuf.len() < 17);
        }
        let _ = decode_udp(&data, &Limits::new(limit));
    }

    /// Valid frames with random bytes overwritten: rejected cleanly (or, on a CRC collision,
    /// decoded), never a panic.
    #[test]
    fn corrupted_frames_never_panic(
        p in packet(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut buf = BytesMut::new();
        encode_avl(&p, &mut buf).unwrap();
        let mut udp = BytesMut::new();
        let imei = Imei::parse("123456789012345").unwrap();
        encode_udp(&UdpDatagram { packet_id: 1, avl_packet_id: 2, imei, packet: p }, &mut udp).unwrap();
        for (i, b) in &flips {
            let at = i.index(buf.len());
            buf[at] = *b;
            let at = i.index(udp.len());
            udp[at] = *b;
        }
        let mut dec = FrameDecoder::new(Limits::default());
        let _ = dec.decode_eof(&mut buf);
        let _ = decode_udp(&udp, &Limits::default());
    }
}
