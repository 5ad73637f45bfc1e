//! The frames and the decode calls shared by the criterion bench (`benches/decode.rs`) and the
//! instruction-count program (`examples/decode_ir.rs`), so both measure exactly the same work.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use trackgate_protocol::gt06::{self, Gps, Lbs, Location, Packet, UtcOffset};
use trackgate_protocol::{
    AvlPacket, AvlRecord, Codec, Frame, FrameDecoder, IoElement, IoValue, Limits, encode_avl,
};

/// The frames every contender decodes: the wiki examples, then the ~1 KB frame (last).
pub fn frames() -> Vec<(String, Vec<u8>)> {
    let mut frames: Vec<(String, Vec<u8>)> = WIKI
        .iter()
        .map(|(name, h)| ((*name).to_owned(), hex(h)))
        .collect();
    let big = one_kib_frame();
    frames.push((format!("codec8_11rec_{}B", big.len()), big));
    frames
}

/// trackgate in the listener's steady state: bytes are appended to a long-lived read buffer
/// and the decoder splits one frame off it, checks the CRC, and decodes every record to owned
/// values (`Frame::Avl(AvlPacket)`, what the listener publishes). The append is a copy the
/// nom-teltonika contenders do not make; it is counted against us.
pub struct Trackgate {
    decoder: FrameDecoder,
    buf: BytesMut,
}

impl Trackgate {
    pub fn new() -> Self {
        Trackgate {
            decoder: FrameDecoder::new(Limits::default()),
            buf: BytesMut::with_capacity(4096),
        }
    }

    pub fn decode(&mut self, frame: &[u8]) -> Frame {
        self.buf.extend_from_slice(frame);
        match self.decoder.decode(&mut self.buf) {
            Ok(Some(frame)) => frame,
            other => panic!("trackgate rejected a bench frame: {other:?}"),
        }
    }
}

/// nom-teltonika 0.3.0, like for like: `take_frame` checks the preamble, length, CRC and
/// every record, then `evaluate` copies each record and every IO value into owned values.
pub fn nom_evaluate(frame: &[u8]) -> nom_teltonika::protocol::Frame {
    let mut input = frame;
    nom_teltonika::decoder::take_frame(&mut input)
        .expect("nom-teltonika accepts the bench frames")
        .evaluate()
}

/// nom-teltonika 0.3.0 `take_frame` alone: checks the frame (CRC included) and returns a
/// borrowed view; no record is materialised, so it is a floor, not a like-for-like figure.
pub fn nom_validate(frame: &[u8]) -> nom_teltonika::protocol::FrameView<'_> {
    let mut input = frame;
    nom_teltonika::decoder::take_frame(&mut input).expect("nom-teltonika accepts the bench frames")
}

/// nom-teltonika 0.1.6, the last release built on `nom`: owned values, CRC checked.
pub fn nom016(frame: &[u8]) -> nom_teltonika_016::TeltonikaFrame {
    nom_teltonika_016::parser::tcp_frame(frame)
        .expect("nom-teltonika 0.1.6 accepts the bench frames")
        .1
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The wiki's TCP AVL examples, verbatim (see tests/vectors/teltonika_wiki_vectors.jsonl).
pub const WIKI: [(&str, &str); 5] = [
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
pub fn one_kib_frame() -> Vec<u8> {
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

// === GT06 ===

/// The GT06 decoder in the same steady state as [`Trackgate`]: bytes appended to a long-lived
/// buffer, each frame split off (stop bits and CRC-ITU checked) and its packet decoded to
/// owned values. Returns the number of packets (each is dropped inside the timing).
pub struct Gt06 {
    decoder: gt06::FrameDecoder,
    buf: BytesMut,
}

impl Gt06 {
    pub fn new() -> Self {
        Gt06 {
            decoder: gt06::FrameDecoder::new(Limits::default()),
            buf: BytesMut::with_capacity(4096),
        }
    }

    pub fn decode(&mut self, bytes: &[u8]) -> usize {
        self.buf.extend_from_slice(bytes);
        let mut n = 0;
        while let Some(frame) = self.decoder.decode(&mut self.buf).expect("a bench frame") {
            let packet = Packet::decode(&frame, UtcOffset::UTC).expect("a bench packet");
            black_box(packet);
            n += 1;
        }
        n
    }
}

/// GT06 bytes against the Teltonika frame of about the same size: (name, GT06, Teltonika).
pub fn gt06_pairs() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    // traccar vector 97: a 0x12 location with its 4-byte mileage, 41 bytes.
    let one =
        hex("787823120f081b121d37cb01c8e2cc08afd3c020d50201940701d600a1190041ee100576d1470d0a");
    let mut stream = BytesMut::new();
    for i in 0..24u32 {
        let loc = Location {
            protocol: 0x12,
            gps: Gps {
                timestamp_ms: 1_700_000_000_000 + u64::from(i) * 30_000,
                info: 0xCB,
                latitude: 98_400_000 + i,
                longitude: 45_460_000 + i,
                speed: 40,
                course_status: 0x1400 | (90 + i as u16),
            },
            lbs: Some(Lbs {
                length: None,
                mcc: 460,
                mnc: 0,
                lac: 0x287D,
                cell_id: 0x1F71,
            }),
            status: None,
            extra: Bytes::from_static(&[0x00, 0x41, 0xEE, 0x10]),
        };
        gt06::encode_packet(
            &Packet::Location(loc),
            i as u16,
            UtcOffset::UTC,
            &mut stream,
        )
        .expect("a valid location");
    }
    let wiki_codec8_2 = hex(WIKI[1].1);
    vec![
        ("one_location", one, wiki_codec8_2),
        ("about_1kb", stream.to_vec(), one_kib_frame()),
    ]
}
