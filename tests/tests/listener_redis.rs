//! The listener against a real `redis-server`, over real sockets on 127.0.0.1.
//!
//! The device side is written with the protocol crate's encoders directly (a tiny test device),
//! so these tests do not depend on the simulator. Every test starts its own Redis and its own
//! in-process listener with its own metrics registry, so they run in parallel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prometheus::Registry;
use redis::streams::StreamRangeReply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use trackgate_api::ShardConfig;
use trackgate_api::redis_layout as keys;
use trackgate_listener::{Listener, ListenerOptions, METRIC_NAMES, ShardSource};
use trackgate_protocol::{
    AvlPacket, AvlRecord, Codec, Command, Imei, IoElement, IoValue, UdpDatagram, crc16_ibm,
    encode_avl, encode_command, encode_login, encode_udp, udp_ack,
};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisServer, free_port, free_ports, require_tool};

const POOL: &str = "fleet";
const IMEIS: [&str; 4] = [
    "356307042441013",
    "352093086403655",
    "350424063817894",
    "863719061221440",
];

// === Harness ===

struct Harness {
    redis: RedisServer,
    listener: Option<Listener>,
    registry: Registry,
    health: Health,
    admin: SocketAddr,
    admin_stop: Option<oneshot::Sender<()>>,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn options(redis: &RedisServer) -> ListenerOptions {
    ListenerOptions {
        redis_url: redis.url(),
        bind_ip: "127.0.0.1".parse().unwrap(),
        pod_name: "test-pod".into(),
        reload_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(3),
        publish_retry_for: Duration::from_millis(800),
        redis_timeout: Duration::from_millis(500),
        liveness_max_silence: Duration::from_secs(1),
        ..ListenerOptions::default()
    }
}

/// A dedicated-mode config: one port per IMEI.
fn dedicated(ports: &[u16], imeis: &[&str]) -> ShardConfig {
    let owners = ports
        .iter()
        .zip(imeis)
        .map(|(&port, imei)| (port, (*imei).to_owned()));
    ShardConfig::dedicated(POOL, 0, owners)
}

impl Harness {
    async fn start(config: ShardConfig) -> Option<Self> {
        Self::start_with(config, |_| {}).await
    }

    async fn start_with(
        config: ShardConfig,
        tweak: impl FnOnce(&mut ListenerOptions),
    ) -> Option<Self> {
        let redis = RedisServer::start()?;
        let mut options = options(&redis);
        tweak(&mut options);
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("shard.json");
        std::fs::write(&config_path, config.to_json()).unwrap();
        let registry = Registry::new();
        let health = Health::new();
        let listener = Listener::start(
            options,
            vec![ShardSource::File(config_path.clone())],
            &registry,
            health.clone(),
        )
        .await
        .unwrap();
        let admin_listener = tokio::net::TcpListener::bind(("127.0.0.1", free_port()))
            .await
            .unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (admin_stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(trackgate_telemetry::serve(
            admin_listener,
            registry.clone(),
            health.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        let harness = Self {
            redis,
            listener: Some(listener),
            registry,
            health,
            admin,
            admin_stop: Some(admin_stop),
            config_path,
            _dir: dir,
        };
        harness
            .eventually("redis ready", || harness.health.readiness().is_ok())
            .await;
        Some(harness)
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// The value of one metric sample, e.g. `trackgate_listener_logins_total{pool="fleet",result="accepted"}`.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().iter())
            .filter(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            // An unset counter or gauge reads 0, so the sum is whichever is set.
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
            .sum()
    }

    async fn eventually(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Every readings entry of a device, oldest first, as field maps.
    async fn readings(&self, imei: &str) -> Vec<HashMap<String, String>> {
        let imei = Imei::parse(imei).unwrap();
        let key = keys::readings_key("trackgate", POOL, keys::partition_of(&imei, 4));
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis().await)
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .map(|entry| {
                entry
                    .map
                    .iter()
                    .map(|(k, v)| (k.clone(), redis::from_redis_value_ref::<String>(v).unwrap()))
                    .collect::<HashMap<_, _>>()
            })
            .filter(|fields| fields["imei"] == imei.as_str())
            .collect()
    }

    async fn shutdown(mut self) -> bool {
        let clean = self.listener.take().unwrap().shutdown().await;
        if let Some(stop) = self.admin_stop.take() {
            let _ = stop.send(());
        }
        clean
    }
}

// === Test device ===

struct Device {
    stream: TcpStream,
}

impl Device {
    async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
        }
    }

    /// Connects, sends the login and returns the device with the one-byte reply (`None` when
    /// the listener closed without replying).
    async fn login(addr: SocketAddr, imei: &str) -> (Self, Option<u8>) {
        let mut device = Self::connect(addr).await;
        let mut login = BytesMut::new();
        encode_login(&Imei::parse(imei).unwrap(), &mut login);
        device.stream.write_all(&login).await.unwrap();
        let mut reply = [0u8; 1];
        let got = tokio::time::timeout(Duration::from_secs(3), device.stream.read(&mut reply))
            .await
            .unwrap();
        let reply = match got {
            Ok(1) => Some(reply[0]),
            _ => None,
        };
        (device, reply)
    }

    async fn logged_in(addr: SocketAddr, imei: &str) -> Self {
        let (device, reply) = Self::login(addr, imei).await;
        assert_eq!(reply, Some(1), "login of {imei} on {addr} refused");
        device
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send_packet(&mut self, packet: &AvlPacket) {
        self.send(&frame(packet)).await;
    }

    /// The next ack, or `None` when the connection closed or nothing came within 3 s.
    async fn ack(&mut self) -> Option<u32> {
        let mut ack = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(3), self.stream.read_exact(&mut ack)).await {
            Ok(Ok(_)) => Some(u32::from_be_bytes(ack)),
            _ => None,
        }
    }

    /// True when the listener closes the connection (EOF or reset) within 3 s without sending
    /// anything more.
    async fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(3), self.stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn frame(packet: &AvlPacket) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_avl(packet, &mut buf).unwrap();
    buf.to_vec()
}

/// A record with every field set; `i` makes it unique. Negative latitude, to check signs.
fn record(i: u32, codec: Codec) -> AvlRecord {
    let mut io = vec![
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
            value: IoValue::U32(4_294_967_294),
        },
        IoElement {
            id: 16,
            value: IoValue::U64(9_876_543_210),
        },
    ];
    if codec == Codec::Codec8Ext {
        io.push(IoElement {
            id: 281,
            value: IoValue::Var(Bytes::from_static(&[0x57, 0x0a, 0xff])),
        });
    }
    AvlRecord {
        timestamp_ms: 1_700_000_000_000 + u64::from(i) * 1000,
        priority: 1,
        longitude: 251_234_567 + i as i32,
        latitude: -541_234_567 - i as i32,
        altitude: 120,
        angle: 270,
        satellites: 9,
        speed: 55 + i as u16,
        event_id: 239,
        generation_type: (codec == Codec::Codec16).then_some(3),
        io,
    }
}

fn packet(codec: Codec, range: std::ops::Range<u32>) -> AvlPacket {
    AvlPacket {
        codec,
        records: range.map(|i| record(i, codec)).collect(),
    }
}

/// Degrees × 10^7 → the exact decimal text DESIGN.md requires (independent of the protocol
/// crate's formatter).
fn degrees(v: i32) -> String {
    let sign = if v < 0 { "-" } else { "" };
    let a = i64::from(v).abs();
    format!("{sign}{}.{:07}", a / 10_000_000, a % 10_000_000)
}

fn assert_entry(
    entry: &HashMap<String, String>,
    imei: &str,
    r: &AvlRecord,
    codec: &str,
    port: u16,
) {
    assert_eq!(entry["imei"], imei);
    assert_eq!(entry["ts"], r.timestamp_ms.to_string());
    assert_eq!(entry["lat"], degrees(r.latitude));
    assert_eq!(entry["lon"], degrees(r.longitude));
    assert_eq!(entry["alt"], r.altitude.to_string());
    assert_eq!(entry["angle"], r.angle.to_string());
    assert_eq!(entry["sats"], r.satellites.to_string());
    assert_eq!(entry["speed"], r.speed.to_string());
    assert_eq!(entry["priority"], r.priority.to_string());
    assert_eq!(entry["event"], r.event_id.to_string());
    assert_eq!(entry["codec"], codec);
    assert_eq!(entry["port"], port.to_string());
    let io: serde_json::Value = serde_json::from_str(&entry["io"]).unwrap();
    assert_eq!(io["239"], 1);
    assert_eq!(io["66"], 12_345);
    assert_eq!(io["72"], 4_294_967_294u64);
    assert_eq!(io["16"], 9_876_543_210u64);
    if codec == "8e" {
        assert_eq!(io["281"], "570aff");
    }
    let recv: u64 = entry["recv"].parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        recv <= now && recv + 60_000 > now,
        "recv {recv} is not the server time"
    );
}

// === Happy paths ===

/// Each AVL codec end to end: every field in Redis equals what the device sent, lat/lon exact
/// to 10^-7, and the ack counts the records.
#[tokio::test]
async fn each_codec_is_stored_field_for_field_then_acked() {
    let ports = free_ports(3);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..3])).await else {
        return;
    };
    let codecs = [
        (Codec::Codec8, "8"),
        (Codec::Codec8Ext, "8e"),
        (Codec::Codec16, "16"),
    ];
    let mut connected = Vec::new();
    for (i, (codec, label)) in codecs.into_iter().enumerate() {
        let mut device = Device::logged_in(h.addr(ports[i]), IMEIS[i]).await;
        device.send(&[0xFF]).await; // keep-alive: absorbed, no reply
        let sent = packet(codec, 0..3);
        device.send_packet(&sent).await;
        assert_eq!(device.ack().await, Some(3), "codec {label}");
        let stored = h.readings(IMEIS[i]).await;
        assert_eq!(stored.len(), 3, "codec {label}");
        for (entry, record) in stored.iter().zip(&sent.records) {
            assert_entry(entry, IMEIS[i], record, label, ports[i]);
        }
        assert_eq!(
            h.metric(
                "trackgate_listener_records_total",
                &[("pool", POOL), ("codec", label)]
            ),
            3.0
        );
        connected.push(device);
    }
    let state: String = redis::cmd("HGET")
        .arg(keys::devices_key("trackgate", POOL))
        .arg(IMEIS[0])
        .query_async(&mut h.redis().await)
        .await
        .unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["connected"], true);
    assert_eq!(state["pod"], "test-pod");
    assert!(h.shutdown().await);
}

/// UDP on the same port: the 7-byte ack comes only after the records are in Redis.
#[tokio::test]
async fn udp_datagram_is_stored_then_acked() {
    let ports = free_ports(1);
    let mut config = dedicated(&ports, &IMEIS[..1]);
    config.udp = true;
    let Some(h) = Harness::start(config).await else {
        return;
    };
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let datagram = UdpDatagram {
        packet_id: 0xCAFE,
        avl_packet_id: 7,
        imei: Imei::parse(IMEIS[0]).unwrap(),
        packet: packet(Codec::Codec8, 0..2),
    };
    let mut buf = BytesMut::new();
    encode_udp(&datagram, &mut buf).unwrap();
    socket.send_to(&buf, h.addr(ports[0])).await.unwrap();
    let mut ack = [0u8; 16];
    let (n, _) = tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut ack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&ack[..n], &udp_ack(0xCAFE, 7, 2));
    let stored = h.readings(IMEIS[0]).await;
    assert_eq!(stored.len(), 2);
    assert_entry(
        &stored[1],
        IMEIS[0],
        &datagram.packet.records[1],
        "8",
        ports[0],
    );

    // A datagram from a device that does not own the port gets no ack and stores nothing.
    let stranger = UdpDatagram {
        imei: Imei::parse(IMEIS[3]).unwrap(),
        ..datagram
    };
    let mut buf = BytesMut::new();
    encode_udp(&stranger, &mut buf).unwrap();
    socket.send_to(&buf, h.addr(ports[0])).await.unwrap();
    let silent = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut ack)).await;
    assert!(silent.is_err(), "a refused datagram was acked");
    assert!(h.readings(IMEIS[3]).await.is_empty());

    // A malformed datagram is counted and gets no reply either.
    socket
        .send_to(&[0x00, 0x05, 1, 2, 3], h.addr(ports[0]))
        .await
        .unwrap();
    let silent = tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut ack)).await;
    assert!(silent.is_err(), "a malformed datagram got a reply");
    h.eventually("udp decode error counted", || {
        h.metric("trackgate_listener_decode_errors_total", &[("pool", POOL)]) == 1.0
    })
    .await;
    assert!(h.shutdown().await);
}

/// Shared mode: any port of the shard admits any device of the pool, and only those.
#[tokio::test]
async fn shared_mode_admits_pool_devices_on_any_port() {
    let ports = free_ports(2);
    let devices = IMEIS[..3].iter().map(|s| (*s).to_owned());
    let config = ShardConfig::shared(POOL, 0, ports.iter().copied(), devices);
    let Some(h) = Harness::start(config).await else {
        return;
    };
    let mut a = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    let mut b = Device::logged_in(h.addr(ports[0]), IMEIS[1]).await;
    let mut c = Device::logged_in(h.addr(ports[1]), IMEIS[2]).await;
    for (device, imei, port) in [
        (&mut a, IMEIS[0], ports[0]),
        (&mut b, IMEIS[1], ports[0]),
        (&mut c, IMEIS[2], ports[1]),
    ] {
        let sent = packet(Codec::Codec8, 0..1);
        device.send_packet(&sent).await;
        assert_eq!(device.ack().await, Some(1));
        assert_entry(
            &h.readings(imei).await[0],
            imei,
            &sent.records[0],
            "8",
            port,
        );
    }
    let (mut stranger, reply) = Device::login(h.addr(ports[1]), IMEIS[3]).await;
    assert_eq!(reply, Some(0));
    assert!(stranger.is_closed().await);
    assert!(h.shutdown().await);
}

/// A Codec 12 response from the device is never acked; it lands in the events stream, and the
/// session carries on with AVL frames.
#[tokio::test]
async fn command_responses_go_to_the_events_stream_unacked() {
    let ports = free_ports(1);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..1])).await else {
        return;
    };
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    let response = Command {
        kind: 0x06,
        ..Command::codec12("RTC:2026/11/21 06:00")
    };
    let mut buf = BytesMut::new();
    encode_command(&response, &mut buf).unwrap();
    device.send(&buf).await;
    device.send_packet(&packet(Codec::Codec8, 0..2)).await;
    // The first bytes back are the AVL ack: nothing was sent for the response.
    assert_eq!(device.ack().await, Some(2));

    let events = keys::events_key("trackgate", POOL);
    let mut redis = h.redis().await;
    let mut found = None;
    for _ in 0..100 {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&events)
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .unwrap();
        found = reply
            .ids
            .into_iter()
            .find(|e| e.get::<String>("kind").as_deref() == Some("command_response"));
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = found.expect("no command_response event");
    assert_eq!(event.get::<String>("imei").unwrap(), IMEIS[0]);
    assert_eq!(event.get::<String>("codec").unwrap(), "12");
    assert_eq!(
        event.get::<String>("payload").unwrap(),
        "5254433a323032362f31312f32312030363a3030" // "RTC:2026/11/21 06:00"
    );
    assert!(h.shutdown().await);
}

// === Refusals ===

#[tokio::test]
async fn logins_are_refused_for_strangers_wrong_ports_silence_and_garbage() {
    let ports = free_ports(2);
    let mut config = dedicated(&ports, &IMEIS[..2]);
    config.limits.login_timeout_seconds = 1;
    let Some(h) = Harness::start(config).await else {
        return;
    };
    // Unknown IMEI: 0x00, then closed.
    let (mut device, reply) = Device::login(h.addr(ports[0]), IMEIS[3]).await;
    assert_eq!(reply, Some(0));
    assert!(device.is_closed().await);
    // Another device's port: 0x00, then closed.
    let (mut device, reply) = Device::login(h.addr(ports[0]), IMEIS[1]).await;
    assert_eq!(reply, Some(0));
    assert!(device.is_closed().await);
    // Silence: closed after the login timeout, no reply.
    let started = Instant::now();
    let mut device = Device::connect(h.addr(ports[0])).await;
    assert!(device.is_closed().await);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Garbage before login: closed, no reply.
    let mut device = Device::connect(h.addr(ports[1])).await;
    device.send(b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(device.is_closed().await);

    let logins = |result| {
        h.metric(
            "trackgate_listener_logins_total",
            &[("pool", POOL), ("result", result)],
        )
    };
    assert_eq!(logins("unknown_imei"), 1.0);
    assert_eq!(logins("port_mismatch"), 1.0);
    assert_eq!(logins("timeout"), 1.0);
    assert_eq!(logins("malformed"), 1.0);
    assert_eq!(logins("accepted"), 0.0);
    // The rightful owner still gets in.
    Device::logged_in(h.addr(ports[1]), IMEIS[1]).await;
    assert!(h.shutdown().await);
}

// === Malformed frames ===

/// Bad CRC, N1 ≠ N2 and an oversized length: no ack, connection closed, counted by reason —
/// and a device on another port, mid-session, is not disturbed.
#[tokio::test]
async fn malformed_frames_close_only_their_own_connection() {
    let ports = free_ports(2);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..2])).await else {
        return;
    };
    let mut bystander = Device::logged_in(h.addr(ports[1]), IMEIS[1]).await;

    let good = frame(&packet(Codec::Codec8, 0..2));
    let mut bad_crc = good.clone();
    *bad_crc.last_mut().unwrap() ^= 0xFF;

    let mut count_mismatch = good.clone();
    let n2 = count_mismatch.len() - 5;
    count_mismatch[n2] = 3;
    let crc = crc16_ibm(&count_mismatch[8..count_mismatch.len() - 4]);
    let len = count_mismatch.len();
    count_mismatch[len - 4..].copy_from_slice(&u32::from(crc).to_be_bytes());

    let mut oversized = vec![0, 0, 0, 0];
    oversized.extend_from_slice(&(1u32 << 20).to_be_bytes());

    for (bytes, reason) in [
        (bad_crc, "crc"),
        (count_mismatch, "count_mismatch"),
        (oversized, "too_large"),
    ] {
        let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
        device.send(&bytes).await;
        assert!(device.is_closed().await, "{reason}: not closed");
        assert_eq!(
            h.metric(
                "trackgate_listener_decode_errors_total",
                &[("pool", POOL), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    assert!(
        h.readings(IMEIS[0]).await.is_empty(),
        "a malformed frame was stored"
    );
    assert_eq!(
        h.metric(
            "trackgate_listener_sessions_closed_total",
            &[("pool", POOL), ("reason", "malformed")]
        ),
        3.0
    );

    bystander.send_packet(&packet(Codec::Codec8, 0..1)).await;
    assert_eq!(bystander.ack().await, Some(1));
    assert!(h.shutdown().await);
}

// === Duplicates ===

/// A frame resent after a lost ack, and records re-packed into a different frame (another
/// codec, other neighbours), are stored once; the device still gets the full count acked.
#[tokio::test]
async fn resent_and_repacked_records_are_stored_once() {
    let ports = free_ports(1);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..1])).await else {
        return;
    };
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    let first = packet(Codec::Codec8Ext, 0..3);
    device.send_packet(&first).await;
    assert_eq!(device.ack().await, Some(3));
    // Lost ack: the device reconnects and sends the same frame again.
    drop(device);
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    device.send_packet(&first).await;
    assert_eq!(device.ack().await, Some(3));
    // Re-packed: records 1 and 2 again, with a new record 3, in one frame.
    let mut repacked = packet(Codec::Codec8Ext, 1..4);
    repacked.records.swap(0, 2);
    device.send_packet(&repacked).await;
    assert_eq!(device.ack().await, Some(3));

    let stored = h.readings(IMEIS[0]).await;
    let mut ts: Vec<&str> = stored.iter().map(|e| e["ts"].as_str()).collect();
    ts.sort_unstable();
    let expected: Vec<String> = (0..4u64)
        .map(|i| (1_700_000_000_000 + i * 1000).to_string())
        .collect();
    assert_eq!(ts, expected);
    assert_eq!(
        h.metric(
            "trackgate_listener_duplicate_records_total",
            &[("pool", POOL)]
        ),
        5.0
    );
    assert!(h.shutdown().await);
}

/// The dedup window holds at most the window of newest fingerprints (a 16-byte header and
/// 8 bytes per record, whatever the traffic), a resend of the newest frame is still recognised
/// after the ring wrapped, and the window expires.
#[tokio::test]
async fn dedup_window_is_bounded() {
    let ports = free_ports(1);
    let Some(h) = Harness::start_with(dedicated(&ports, &IMEIS[..1]), |o| {
        o.dedup_records = 4;
    })
    .await
    else {
        return;
    };
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    for start in [0, 3, 6] {
        device
            .send_packet(&packet(Codec::Codec8, start..start + 3))
            .await;
        assert_eq!(device.ack().await, Some(3));
    }
    device.send_packet(&packet(Codec::Codec8, 6..9)).await;
    assert_eq!(device.ack().await, Some(3));
    assert_eq!(h.readings(IMEIS[0]).await.len(), 9);
    let imei = Imei::parse(IMEIS[0]).unwrap();
    let partition = keys::partition_of(&imei, 4);
    let dedup = keys::dedup_key("trackgate", POOL, partition, IMEIS[0]);
    let mut redis = h.redis().await;
    let len: u32 = redis::cmd("STRLEN")
        .arg(&dedup)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(len, 16 + 4 * 8);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&dedup)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 0, "the dedup window has no expiry");
    // A fresh install writes no 0.1.0 set.
    let legacy: bool = redis::cmd("EXISTS")
        .arg(keys::seen_key("trackgate", POOL, partition, IMEIS[0]))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!legacy);
    assert!(h.shutdown().await);
}

// === Many frames in one store call ===

/// Frames that wait for Redis together go in one store call per partition. One device among
/// them whose dedup window Redis refuses (its key overwritten by hand with a list) fails alone:
/// every other frame of the call is stored once and acked with its own count, the refused
/// one is not acked and not stored.
#[tokio::test]
async fn a_frame_redis_refuses_fails_alone_in_a_call_of_many() {
    const DEVICES: u64 = 12;
    // Four apart: every device in partition 1 of 4, so all frames can share a call.
    let imeis: Vec<String> = (0..DEVICES)
        .map(|d| (356_307_042_441_013 + 4 * d).to_string())
        .collect();
    let ports = free_ports(1);
    let config = ShardConfig::shared(POOL, 0, ports.iter().copied(), imeis.iter().cloned());
    let Some(h) = Harness::start(config).await else {
        return;
    };
    let mut devices = Vec::new();
    for imei in &imeis {
        devices.push(Device::logged_in(h.addr(ports[0]), imei).await);
    }
    let poison = imeis.last().unwrap();
    let poison_key = &keys::store_keys("trackgate", POOL, &Imei::parse(poison).unwrap(), 4)[1];
    let mut redis = h.redis().await;
    for (name, value) in [
        ("slowlog-log-slower-than", "0"),
        ("slowlog-max-len", "10000"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("RPUSH")
        .arg(poison_key)
        .arg("not a window")
        .query_async(&mut redis)
        .await
        .unwrap();
    // Hold Redis for 300 ms (a busy script) so the frames queue up behind it and go out
    // together.
    let mut busy = redis::cmd("EVAL");
    busy.arg(
        "local t = redis.call('TIME') local t0 = t[1] * 1e6 + t[2]
         repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > 300000 return 0",
    )
    .arg(0);
    let mut blocker = h.redis().await;
    let held = tokio::spawn(async move { busy.query_async::<i64>(&mut blocker).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The refused device's frame goes last, so frames before it in the call are stored
    // before it fails.
    for (i, device) in devices.iter_mut().enumerate() {
        device
            .send_packet(&packet(Codec::Codec8, 0..i as u32 + 1))
            .await;
    }
    let (refused, good) = devices.split_last_mut().unwrap();
    for (i, device) in good.iter_mut().enumerate() {
        assert_eq!(device.ack().await, Some(i as u32 + 1), "device {i}");
    }
    assert!(held.await.unwrap().is_ok());
    assert!(refused.is_closed().await, "a refused frame is never acked");
    for (i, imei) in imeis[..imeis.len() - 1].iter().enumerate() {
        assert_eq!(h.readings(imei).await.len(), i + 1, "device {i}");
    }
    assert!(h.readings(poison).await.is_empty());
    assert_eq!(
        h.metric("trackgate_listener_duplicate_records_total", &[]),
        0.0,
        "each stored frame counted once as new"
    );
    // The refused frame went out in one call with others: the slow log (every command, from
    // before the frames were sent) holds a store call with several frames and its key.
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(10_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let store = redis::Script::new(keys::STORE_READINGS_LUA);
    let shared_call = log.iter().any(|entry| {
        let redis::Value::Array(fields) = entry else {
            return false;
        };
        let Some(redis::Value::Array(args)) = fields.get(3) else {
            return false;
        };
        let args: Vec<String> = args
            .iter()
            .filter_map(|a| redis::from_redis_value_ref::<String>(a).ok())
            .collect();
        args.len() > 3
            && args[0] == "EVALSHA"
            && args[1] == store.get_hash()
            && args[2].parse::<usize>().is_ok_and(|keys| keys >= 5)
            && args.contains(poison_key)
    });
    assert!(
        shared_call,
        "no store call carried the refused frame with others"
    );
    assert!(h.shutdown().await);
}

// === Redis down ===

/// Redis killed: the frame is not acked and the connection is closed after the retry bound;
/// `/readyz` fails. Redis back (empty, script cache gone): the resend is acked and stored once.
#[tokio::test]
async fn redis_down_means_no_ack_and_the_resend_is_stored_once() {
    let ports = free_ports(1);
    let Some(mut h) = Harness::start(dedicated(&ports, &IMEIS[..1])).await else {
        return;
    };
    let sent = packet(Codec::Codec16, 0..4);
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    h.redis.kill();
    device.send_packet(&sent).await;
    assert_eq!(device.ack().await, None, "acked while Redis was down");
    assert!(device.is_closed().await);
    assert!(h.metric("trackgate_listener_publish_errors_total", &[("pool", POOL)]) >= 1.0);
    let (status, body) = h.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis"), "{body}");

    h.redis.restart().unwrap();
    h.eventually("redis ready again", || h.health.readiness().is_ok())
        .await;
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    device.send_packet(&sent).await;
    assert_eq!(device.ack().await, Some(4));
    device.send_packet(&sent).await;
    assert_eq!(device.ack().await, Some(4));
    assert_eq!(h.readings(IMEIS[0]).await.len(), 4);
    assert!(h.shutdown().await);
}

// === Reload ===

/// Rewriting shard.json binds a new port and closes a removed one; the device whose port
/// stayed keeps its connection and is still acked.
#[tokio::test]
async fn reload_adds_and_removes_ports_without_dropping_the_others() {
    let ports = free_ports(3);
    let Some(h) = Harness::start(dedicated(&ports[..2], &IMEIS[..2])).await else {
        return;
    };
    let mut stays = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    let mut removed = Device::logged_in(h.addr(ports[1]), IMEIS[1]).await;
    assert!(TcpStream::connect(h.addr(ports[2])).await.is_err());

    let next = dedicated(&[ports[0], ports[2]], &[IMEIS[0], IMEIS[2]]);
    std::fs::write(&h.config_path, next.to_json()).unwrap();

    assert!(
        removed.is_closed().await,
        "the removed device kept its session"
    );
    let listener = h.listener.as_ref().unwrap();
    h.eventually("new port bound", || {
        let mut bound: Vec<u16> = listener.bound_ports().iter().map(|b| b.port).collect();
        let mut wanted = vec![ports[0], ports[2]];
        bound.sort_unstable();
        wanted.sort_unstable();
        bound == wanted
    })
    .await;
    assert!(TcpStream::connect(h.addr(ports[1])).await.is_err());
    Device::logged_in(h.addr(ports[2]), IMEIS[2]).await;

    stays.send_packet(&packet(Codec::Codec8, 0..2)).await;
    assert_eq!(stays.ack().await, Some(2));
    assert_eq!(
        h.metric(
            "trackgate_listener_sessions_closed_total",
            &[("pool", POOL), ("reason", "config_removed")]
        ),
        1.0
    );
    assert!(h.shutdown().await);
}

// === Health and metrics ===

/// A frozen accept loop makes `/livez` fail, and thawing it makes it pass again.
#[tokio::test]
async fn livez_fails_while_an_accept_loop_is_frozen() {
    let ports = free_ports(1);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..1])).await else {
        return;
    };
    assert_eq!(h.get("/livez").await.0, 200);
    assert_eq!(h.get("/readyz").await.0, 200);
    let listener = h.listener.as_ref().unwrap();
    listener.freeze_accept_loops(true);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (status, body) = h.get("/livez").await;
    assert_eq!(status, 503);
    assert!(body.contains("accept:fleet/0"), "{body}");
    listener.freeze_accept_loops(false);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(h.get("/livez").await.0, 200);
    assert!(h.shutdown().await);
}

/// `/metrics` after real traffic has every starter-set name and passes `promtool check metrics`.
#[tokio::test]
async fn metrics_pass_promtool_and_carry_the_starter_set() {
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let ports = free_ports(1);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..1])).await else {
        return;
    };
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    device.send_packet(&packet(Codec::Codec8, 0..2)).await;
    assert_eq!(device.ack().await, Some(2));
    let (mut stranger, _) = Device::login(h.addr(ports[0]), IMEIS[1]).await;
    assert!(stranger.is_closed().await);
    h.eventually("session closed metric", || {
        h.metric("trackgate_listener_sessions_closed_total", &[]) >= 1.0
    })
    .await;
    trackgate_telemetry::register_build_info(&h.registry, "test").unwrap();

    let (status, text) = h.get("/metrics").await;
    assert_eq!(status, 200);
    for name in METRIC_NAMES
        .iter()
        .filter(|n| !n.ends_with("publish_errors_total") && !n.ends_with("decode_errors_total"))
        .filter(|n| !n.ends_with("rejected_total") && !n.ends_with("events_dropped_total"))
        // Command metrics need command traffic: tests/tests/commands.rs checks them.
        .filter(|n| !n.contains("_command"))
    {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert!(!text.contains(IMEIS[0]), "an IMEI leaked into a label");

    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(h.shutdown().await);
}

// === Limits and shutdown ===

/// Over `maxConnections` a connection is closed at once and counted as `limit`.
#[tokio::test]
async fn connections_over_the_limit_are_rejected_and_counted() {
    assert_second_connection_rejected(|limits| limits.max_connections = 1, "limit").await;
}

/// Over `acceptRatePerSecond` a connection is closed at once and counted as `rate`.
#[tokio::test]
async fn connections_over_the_accept_rate_are_rejected_and_counted() {
    assert_second_connection_rejected(|limits| limits.accept_rate_per_second = 1, "rate").await;
}

/// With `limit` applied, a first device logs in and a second connection on the same port is
/// closed at once and counted under `reason`.
async fn assert_second_connection_rejected(
    limit: impl FnOnce(&mut trackgate_api::ListenerLimits),
    reason: &str,
) {
    let ports = free_ports(1);
    let mut config = dedicated(&ports, &IMEIS[..1]);
    limit(&mut config.limits);
    let Some(h) = Harness::start(config).await else {
        return;
    };
    let _first = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    let mut second = Device::connect(h.addr(ports[0])).await;
    assert!(second.is_closed().await);
    assert_eq!(
        h.metric(
            "trackgate_listener_connections_rejected_total",
            &[("pool", POOL), ("reason", reason)]
        ),
        1.0
    );
    assert!(h.shutdown().await);
}

/// Shutdown stores and acks a frame already received, then closes the connection.
#[tokio::test]
async fn shutdown_finishes_the_frame_in_flight_then_closes() {
    let ports = free_ports(1);
    let Some(h) = Harness::start(dedicated(&ports, &IMEIS[..1])).await else {
        return;
    };
    let mut device = Device::logged_in(h.addr(ports[0]), IMEIS[0]).await;
    // Redis paused for a moment: the frame is in flight when shutdown begins.
    let _ = h.redis.command("CLIENT PAUSE 300 WRITE");
    device.send_packet(&packet(Codec::Codec8, 0..2)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopped = tokio::spawn(h.shutdown());
    assert_eq!(device.ack().await, Some(2));
    assert!(device.is_closed().await);
    assert!(stopped.await.unwrap());
}
