//! GT06 devices through the in-process listener and a real `redis-server`, next to a
//! Teltonika shard in the same process: logins admitted as Teltonika's are, every location
//! stored once with its exact fields, the echo written only after the store, a bad CRC never
//! answered, a wrong IMEI on a dedicated port refused.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::BytesMut;
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trackgate_api::redis_layout as keys;
use trackgate_api::{Protocol, ShardConfig};
use trackgate_listener::{Listener, ListenerOptions, ShardSource};
use trackgate_protocol::gt06::{self, FrameDecoder, Packet, UtcOffset};
use trackgate_protocol::{AvlPacket, AvlRecord, Codec, Imei, encode_avl, encode_login};
use trackgate_telemetry::Health;
use trackgate_tests::gt06::{IMEI as GT06_IMEI, LOCATION, LOGIN, heartbeat, hex};
use trackgate_tests::{RedisServer, free_ports, stream_entries};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// traccar vector 119: an alarm `0x16`, which the device wants echoed.
const ALARM: &str =
    "787825161a011c141001cf00bc62e0043533a231113808028005006800124b470603300204baa49a0d0a";
const OTHER_IMEI: &str = "356307042441099";
const TELTONIKA_IMEI: &str = "356307042441013";

/// Vector 97 moved `i` seconds on, re-encoded with serial `10 + i`.
fn location(i: u64) -> Vec<u8> {
    let frame = FrameDecoder::default()
        .decode(&mut BytesMut::from(&hex(LOCATION)[..]))
        .unwrap()
        .unwrap();
    let Ok(Packet::Location(mut loc)) = Packet::decode(&frame, UtcOffset::UTC) else {
        panic!("vector 97 is a location");
    };
    loc.gps.timestamp_ms += i * 1000;
    let mut out = BytesMut::new();
    gt06::encode_packet(
        &Packet::Location(loc),
        10 + i as u16,
        UtcOffset::UTC,
        &mut out,
    )
    .unwrap();
    out.to_vec()
}

async fn readings(redis: &RedisServer, pool: &str, imei: &str) -> Vec<HashMap<String, String>> {
    let partition = keys::partition_of(&Imei::parse(imei).unwrap(), 4);
    let key = keys::readings_key("trackgate", pool, partition);
    let mut entries = stream_entries(&redis.url(), &key).await;
    entries.retain(|f| f["imei"] == imei);
    entries
}

async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut buf))
        .await
        .expect("reply in time")
        .expect("reply");
    buf
}

/// The connection ends with nothing more written to it.
async fn closed_unanswered(stream: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let got = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(got, Ok(0) | Err(_)), "unexpected reply {got:?}");
}

async fn wait_for(redis: &RedisServer, pool: &str, imei: &str, n: usize) {
    for _ in 0..150 {
        if readings(redis, pool, imei).await.len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{n} entries not stored in time");
}

#[tokio::test]
async fn gt06_and_teltonika_shards_in_one_process() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ports = free_ports(3);
    let (gt06_port, other_port, teltonika_port) = (ports[0], ports[1], ports[2]);
    let mut gt06_shard = ShardConfig::dedicated(
        "gt",
        0,
        [
            (gt06_port, GT06_IMEI.to_owned()),
            (other_port, OTHER_IMEI.to_owned()),
        ],
    );
    gt06_shard.protocol = Protocol::Gt06;
    gt06_shard.redis.partitions = 4;
    let mut teltonika_shard =
        ShardConfig::dedicated("tel", 0, [(teltonika_port, TELTONIKA_IMEI.to_owned())]);
    teltonika_shard.redis.partitions = 4;
    let options = ListenerOptions {
        redis_url: redis.url(),
        bind_ip: LOCAL,
        ..ListenerOptions::default()
    };
    let listener = Listener::start(
        options,
        vec![
            ShardSource::Config(gt06_shard),
            ShardSource::Config(teltonika_shard),
        ],
        &Registry::new(),
        Health::new(),
    )
    .await
    .expect("listener starts");

    // Login answered with its echo (PROTOCOL.md §4's worked reply), heartbeat too.
    let mut device = TcpStream::connect((LOCAL, gt06_port)).await.unwrap();
    device.write_all(&hex(LOGIN)).await.unwrap();
    assert_eq!(read_exact(&mut device, 10).await, gt06::reply(0x01, 9));
    device.write_all(&heartbeat(3)).await.unwrap();
    assert_eq!(read_exact(&mut device, 10).await, gt06::reply(0x13, 3));

    // Three locations and a resend of the first: three entries.
    for i in [0, 1, 2, 0] {
        device.write_all(&location(i)).await.unwrap();
    }
    // The alarm's echo comes only after its entry is in Redis.
    device.write_all(&hex(ALARM)).await.unwrap();
    let echo = read_exact(&mut device, 10).await;
    assert_eq!(echo[3], 0x16);
    let entries = readings(&redis, "gt", GT06_IMEI).await;
    assert_eq!(entries.len(), 4, "{entries:?}");
    let first = &entries[0];
    for (field, value) in [
        ("protocol", "gt06"),
        ("ts", "1440700195000"),
        ("lat", "16.6347089"),
        ("lon", "80.9670756"),
        ("angle", "258"),
        ("sats", "11"),
        ("speed", "32"),
        ("port", &gt06_port.to_string()),
        (
            "io",
            r#"{"type":18,"fix":1,"acc":1,"mcc":404,"mnc":7,"lac":470,"cell":41241,"extra":"0041ee10"}"#,
        ),
    ] {
        assert_eq!(first.get(field).map(String::as_str), Some(value), "{field}");
    }
    for absent in ["codec", "alt", "priority", "event"] {
        assert!(!first.contains_key(absent), "{absent} in {first:?}");
    }
    let ts: Vec<_> = entries[..3].iter().map(|e| e["ts"].as_str()).collect();
    assert_eq!(ts, ["1440700195000", "1440700196000", "1440700197000"]);

    // A bad CRC: no echo, the connection closed, nothing stored.
    let mut bad = hex(ALARM);
    let crc = bad.len() - 4;
    bad[crc] ^= 0xFF;
    device.write_all(&bad).await.unwrap();
    closed_unanswered(&mut device).await;
    assert_eq!(readings(&redis, "gt", GT06_IMEI).await.len(), 4);

    // The same device on another device's dedicated port: refused, no reply.
    let mut wrong = TcpStream::connect((LOCAL, other_port)).await.unwrap();
    wrong.write_all(&hex(LOGIN)).await.unwrap();
    closed_unanswered(&mut wrong).await;

    // Teltonika on its shard of the same process: login, AVL, ack, `protocol=teltonika`.
    let mut tel = TcpStream::connect((LOCAL, teltonika_port)).await.unwrap();
    let mut buf = BytesMut::new();
    encode_login(&Imei::parse(TELTONIKA_IMEI).unwrap(), &mut buf);
    tel.write_all(&buf).await.unwrap();
    assert_eq!(read_exact(&mut tel, 1).await, [1]);
    let record = AvlRecord {
        timestamp_ms: 1_700_000_000_000,
        priority: 1,
        longitude: 251_234_567,
        latitude: 546_872_345,
        altitude: 120,
        angle: 90,
        satellites: 7,
        speed: 42,
        event_id: 0,
        generation_type: None,
        io: Vec::new(),
    };
    let mut avl = BytesMut::new();
    encode_avl(
        &AvlPacket {
            codec: Codec::Codec8,
            records: vec![record],
        },
        &mut avl,
    )
    .unwrap();
    tel.write_all(&avl).await.unwrap();
    assert_eq!(read_exact(&mut tel, 4).await, [0, 0, 0, 1]);
    wait_for(&redis, "tel", TELTONIKA_IMEI, 1).await;
    let tel_entries = readings(&redis, "tel", TELTONIKA_IMEI).await;
    assert_eq!(tel_entries[0]["codec"], "8");
    assert_eq!(tel_entries[0]["lat"], "54.6872345");
    assert_eq!(tel_entries[0]["protocol"], "teltonika");

    assert!(listener.shutdown().await, "clean shutdown");
}
