//! Decode throughput of trackgate-protocol against nom-teltonika on the same frames, in the
//! same run: the Teltonika wiki examples and a ~1 KB, 11-record Codec 8 frame.
//!
//! Both sides check the CRC. `trackgate` decodes to owned records (what the listener
//! publishes). nom-teltonika is measured twice: `nom_validate` checks the frame and returns
//! borrowed views (no record is materialised), `nom_evaluate` also copies it into owned
//! values, which is the like-for-like comparison. `nom016` is nom-teltonika 0.1.6, the last
//! release built on `nom` (owned values, CRC checked).
//!
//! Run: `cargo bench -p trackgate-protocol --bench decode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use trackgate_protocol::{
    AvlPacket, AvlRecord, Codec, Frame, FrameDecoder, IoElement, IoValue, Limits, encode_avl,
};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The wiki's TCP AVL examples, verbatim (see tests/vectors/teltonika_wiki_vectors.jsonl).
const WIKI: [(&str, &str); 5] = [
    (
        "wiki_codec8_1",
        "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF",
    ),
    (
        "wiki_codec8_2",
        "000000000000002808010000016B40D9AD80010000000000000000000000000000000103021503010101425E100000010000F22A",
    ),
    (
        "wiki_codec8_3",
        "000000000000004308020000016B40D57B480100000000000000000000000000000001010101000000000000016B40D5C198010000000000000000000000000000000101010101000000020000252C",
    ),
    (
        "wiki_codec8e",
        "000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100010011001D00010010015E2C880002000B000000003544C87A000E000000001DD7E06A00000100002994",
    ),
    (
        "wiki_codec16",
        "000000000000005F10020000016BDBC7833000000000000000000000000000000000000B05040200010000030002000B00270042563A00000000016BDBC7871800000000000000000000000000000000000B05040200010000030002000B00260042563A00000200005FB3",
    ),
];

/// 11 Codec 8 records with 15 IO elements each (5 × 1 B, 5 × 2 B, 3 × 4 B, 2 × 8 B): a
/// typical full packet from an FMB device, 983 bytes on the wire.
fn one_kib_frame() -> Vec<u8> {
    let records = (0..11u16)
        .map(|i| {
            let mut io = Vec::new();
            for k in 0..5u16 {
                io.push(IoElement {
                    id: 1 + k,
                    value: IoValue::U8(k as u8),
                });
            }
            for k in 0..5u16 {
                io.push(IoElement {
                    id: 66 + k,
                    value: IoValue::U16(12_000 + i * 7 + k),
                });
            }
            for k in 0..3u16 {
                io.push(IoElement {
                    id: 72 + k,
                    value: IoValue::U32(u32::from(i) * 1000 + u32::from(k)),
                });
            }
            for k in 0..2u16 {
                io.push(IoElement {
                    id: 16 + k,
                    value: IoValue::U64(1 << (30 + i + k)),
                });
            }
            AvlRecord {
                timestamp_ms: 1_700_000_000_000 + u64::from(i) * 30_000,
                priority: 0,
                longitude: 252_562_916 + i32::from(i),
                latitude: 546_676_016 - i32::from(i),
                altitude: 120,
                angle: 90 + i,
                satellites: 11,
                speed: 40 + i,
                event_id: 0,
                generation_type: None,
                io,
            }
        })
        .collect();
    let mut buf = BytesMut::new();
    encode_avl(
        &AvlPacket {
            codec: Codec::Codec8,
            records,
        },
        &mut buf,
    )
    .unwrap();
    buf.to_vec()
}

fn decode(c: &mut Criterion) {
    let mut frames: Vec<(String, Vec<u8>)> = WIKI
        .iter()
        .map(|(name, h)| ((*name).to_owned(), hex(h)))
        .collect();
    let big = one_kib_frame();
    frames.push((format!("codec8_11rec_{}B", big.len()), big));

    for (name, frame) in &frames {
        // Both decoders must accept the frame, or the comparison means nothing.
        let mut buf = BytesMut::from(&frame[..]);
        let ours = FrameDecoder::new(Limits::default())
            .decode(&mut buf)
            .unwrap();
        assert!(matches!(ours, Some(Frame::Avl(_))), "{name}");
        nom_teltonika::decoder::take_frame(&mut &frame[..]).unwrap();
        nom_teltonika_016::parser::tcp_frame(frame).unwrap();

        let mut group = c.benchmark_group(name.as_str());
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function("trackgate", |b| {
            // The listener's steady state: bytes are appended to a long-lived read buffer
            // and the decoder splits frames off it. The append (a copy nom-teltonika does
            // not make) is inside the timing, as is dropping the decoded records.
            let mut dec = FrameDecoder::new(Limits::default());
            let mut buf = BytesMut::with_capacity(4096);
            b.iter(|| {
                buf.extend_from_slice(black_box(frame));
                black_box(dec.decode(&mut buf).unwrap())
            });
        });
        group.bench_function("nom_validate", |b| {
            b.iter(|| {
                let mut input = black_box(&frame[..]);
                black_box(nom_teltonika::decoder::take_frame(&mut input).unwrap());
            });
        });
        group.bench_function("nom_evaluate", |b| {
            b.iter(|| {
                let mut input = black_box(&frame[..]);
                black_box(
                    nom_teltonika::decoder::take_frame(&mut input)
                        .unwrap()
                        .evaluate(),
                );
            });
        });
        group.bench_function("nom016", |b| {
            b.iter(|| black_box(nom_teltonika_016::parser::tcp_frame(black_box(frame)).unwrap()));
        });
        group.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
