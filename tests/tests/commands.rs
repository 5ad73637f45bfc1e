//! Commands to devices through Redis: a real `redis-server`, listeners in this process (and the
//! real `trackgate listen` binary for the SIGKILL case), and a tiny test device on a real TCP
//! socket written with the protocol crate's encoders, so each test decides exactly what the
//! device answers, and when.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use prometheus::Registry;
use redis::AsyncCommands;
use redis::streams::StreamRangeReply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use trackgate_api::ShardConfig;
use trackgate_api::redis_layout as layout;
use trackgate_listener::{COMMAND_RESPONSE_TIMEOUT_ENV, Listener, ListenerOptions, ShardSource};
use trackgate_protocol::{
    AvlPacket, AvlRecord, Codec, Command, Frame, FrameDecoder, Imei, Limits, encode_avl,
    encode_command, encode_login,
};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisServer, free_port, free_ports, trackgate_binary, wait_for_port};

const POOL: &str = "fleet";
const PREFIX: &str = "trackgate";
const IMEI: &str = "356307042441013";
const OTHER: &str = "352093081452251";
/// Short, so a timeout test takes a second.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1500);

// === Harness ===

fn options(redis: &RedisServer) -> ListenerOptions {
    ListenerOptions {
        redis_url: redis.url(),
        bind_ip: "127.0.0.1".parse().unwrap(),
        pod_name: "test-pod".into(),
        shutdown_grace: Duration::from_secs(2),
        publish_retry_for: Duration::from_millis(800),
        redis_timeout: Duration::from_millis(500),
        liveness_max_silence: Duration::from_secs(2),
        command_response_timeout: RESPONSE_TIMEOUT,
        ..ListenerOptions::default()
    }
}

/// A shared-mode shard of the pool on one port: every listener built from it admits both
/// devices, as the replicas of one shard do.
fn shared(port: u16) -> ShardConfig {
    ShardConfig::shared(POOL, 0, [port], [IMEI.to_owned(), OTHER.to_owned()])
}

async fn listener(redis: &RedisServer, config: ShardConfig) -> Listener {
    listener_with_metrics(redis, config, &Registry::new()).await
}

async fn listener_with_metrics(
    redis: &RedisServer,
    config: ShardConfig,
    registry: &Registry,
) -> Listener {
    Listener::start(
        options(redis),
        vec![ShardSource::Config(config)],
        registry,
        Health::new(),
    )
    .await
    .unwrap()
}

/// The value of one sample, labels matched as a subset.
fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        // Unset parts read 0, so the sum is whichever one is set.
        .map(|m| {
            m.get_counter().get_value()
                + m.get_gauge().get_value()
                + m.get_histogram().get_sample_count() as f64
        })
        .sum()
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Queues a command as a platform service would.
async fn send(conn: &mut redis::aio::MultiplexedConnection, fields: &[(&str, &str)]) {
    let _: String = conn
        .xadd(layout::commands_key(PREFIX, POOL), "*", fields)
        .await
        .unwrap();
}

/// Every entry of the responses stream for `id`, as (status, fields).
async fn responses(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
) -> Vec<HashMap<String, String>> {
    let reply: StreamRangeReply = conn
        .xrange_all(layout::command_responses_key(PREFIX, POOL))
        .await
        .unwrap();
    reply
        .ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value::<String>(v).unwrap()))
                .collect::<HashMap<_, _>>()
        })
        .filter(|e| e.get("id").map(String::as_str) == Some(id))
        .collect()
}

fn statuses(entries: &[HashMap<String, String>]) -> Vec<String> {
    entries.iter().map(|e| e["status"].clone()).collect()
}

/// Waits until `id` has a final status; returns its responses entries.
async fn final_status(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
    within: Duration,
) -> Vec<HashMap<String, String>> {
    let deadline = Instant::now() + within;
    loop {
        let entries = responses(conn, id).await;
        if entries.iter().any(|e| {
            layout::CommandStatus::parse(&e["status"]).is_some_and(layout::CommandStatus::is_final)
        }) {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no final status within {within:?}: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_hash(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
) -> HashMap<String, String> {
    conn.hgetall(layout::command_status_key(PREFIX, POOL, id))
        .await
        .unwrap()
}

// === Test device ===

/// A device on a real socket: logs in, reads what the server writes (acks and command
/// frames), answers as told.
struct Device {
    imei: Imei,
    stream: TcpStream,
    buf: BytesMut,
    frames: FrameDecoder,
}

enum FromServer {
    Ack(u32),
    Command(Command),
}

impl Device {
    async fn connect(addr: SocketAddr, imei: &str) -> Self {
        let imei = Imei::parse(imei).unwrap();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut login = BytesMut::new();
        encode_login(&imei, &mut login);
        stream.write_all(&login).await.unwrap();
        let mut reply = [0u8; 1];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [1], "login refused");
        Self {
            imei,
            stream,
            buf: BytesMut::new(),
            frames: FrameDecoder::new(Limits::default()),
        }
    }

    /// The next thing the server writes, or `None` when nothing comes within `within`.
    async fn next(&mut self, within: Duration) -> Option<FromServer> {
        let deadline = Instant::now() + within;
        loop {
            // A frame starts with four zero bytes; an ack is a non-zero record count.
            if self.buf.len() >= 4 && self.buf[..4] != [0, 0, 0, 0] {
                let ack = self.buf.split_to(4);
                return Some(FromServer::Ack(u32::from_be_bytes([
                    ack[0], ack[1], ack[2], ack[3],
                ])));
            }
            if let Some(frame) = self.frames.decode(&mut self.buf).unwrap() {
                match frame {
                    Frame::Command(c) => return Some(FromServer::Command(c)),
                    other => panic!("unexpected frame from the server: {other:?}"),
                }
            }
            let read = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.stream.read_buf(&mut self.buf),
            )
            .await;
            match read {
                Err(_) => return None,
                Ok(Ok(0)) => return None,
                Ok(Ok(_)) => {}
                Ok(Err(err)) => panic!("device read: {err}"),
            }
        }
    }

    async fn command(&mut self, within: Duration) -> Option<Command> {
        match self.next(within).await? {
            FromServer::Command(c) => Some(c),
            FromServer::Ack(n) => panic!("expected a command, got an ack of {n}"),
        }
    }

    async fn answer(&mut self, command: &Command, text: &str) {
        let answer = Command {
            kind: 0x06,
            payload: text.as_bytes().to_vec().into(),
            ..command.clone()
        };
        self.write_command(&answer).await;
    }

    async fn write_command(&mut self, command: &Command) {
        let mut buf = BytesMut::new();
        encode_command(command, &mut buf).unwrap();
        self.stream.write_all(&buf).await.unwrap();
    }

    async fn send_records(&mut self, n: usize, ts: u64) {
        let record = AvlRecord {
            timestamp_ms: ts,
            priority: 0,
            longitude: 250_000_000,
            latitude: 546_000_000,
            altitude: 100,
            angle: 0,
            satellites: 7,
            speed: 30,
            event_id: 0,
            generation_type: None,
            io: vec![],
        };
        let packet = AvlPacket {
            codec: Codec::Codec8,
            records: (0..n as u64)
                .map(|i| AvlRecord {
                    timestamp_ms: ts + i,
                    ..record.clone()
                })
                .collect(),
        };
        let mut buf = BytesMut::new();
        encode_avl(&packet, &mut buf).unwrap();
        self.stream.write_all(&buf).await.unwrap();
    }
}

fn text(command: &Command) -> String {
    String::from_utf8_lossy(&command.payload).into_owned()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

const WAIT: Duration = Duration::from_secs(5);

// === Tests ===

/// The round trip for Codec 12 and Codec 14, and the Codec 14 refusal: each command reaches
/// the device, one at a time, and its answer lands in the responses stream under its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_device_and_its_answer_lands_under_its_id() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let registry = Registry::new();
    let _listener = listener_with_metrics(&redis, shared(port), &registry).await;
    let mut conn = redis_conn(&redis).await;
    let mut device = Device::connect(addr(port), IMEI).await;

    send(
        &mut conn,
        &[("id", "c12"), ("imei", IMEI), ("command", "getinfo")],
    )
    .await;
    send(
        &mut conn,
        &[
            ("id", "c14"),
            ("imei", IMEI),
            ("command", "getver"),
            ("codec", "14"),
        ],
    )
    .await;
    send(
        &mut conn,
        &[
            ("id", "nack"),
            ("imei", IMEI),
            ("command", "getver"),
            ("codec", "14"),
        ],
    )
    .await;

    let first = device.command(WAIT).await.expect("first command");
    assert_eq!(
        (first.codec, first.kind, text(&first).as_str()),
        (Codec::Codec12, 0x05, "getinfo")
    );
    // One at a time: the next waits for this one's answer.
    assert!(
        device.command(Duration::from_millis(400)).await.is_none(),
        "second command before the first answer"
    );
    device
        .answer(
            &first,
            "RTC:2026/12/1 21:00 Init:2026/12/1 20:00 UpTime:3600s",
        )
        .await;

    let second = device.command(WAIT).await.expect("second command");
    assert_eq!(
        (second.codec, second.imei, text(&second).as_str()),
        (Codec::Codec14, Some(device.imei), "getver")
    );
    device
        .answer(&second, "Ver:03.28.07_00 GPS:AXN_5.10 Hw:FMB920")
        .await;

    let third = device.command(WAIT).await.expect("third command");
    let refusal = Command {
        kind: 0x11,
        payload: bytes::Bytes::new(),
        ..third.clone()
    };
    device.write_command(&refusal).await;

    let c12 = final_status(&mut conn, "c12", WAIT).await;
    assert_eq!(statuses(&c12), ["queued", "sent", "answered"]);
    assert!(c12[2]["answer"].starts_with("RTC:2026/12/1"), "{c12:?}");
    assert_eq!(c12[2]["imei"], IMEI);
    let c14 = final_status(&mut conn, "c14", WAIT).await;
    assert_eq!(statuses(&c14), ["queued", "sent", "answered"]);
    assert_eq!(c14[2]["answer"], "Ver:03.28.07_00 GPS:AXN_5.10 Hw:FMB920");
    let nack = final_status(&mut conn, "nack", WAIT).await;
    assert_eq!(statuses(&nack), ["queued", "sent", "failed"]);
    assert_eq!(nack[2]["reason"], "refused");

    let hash = status_hash(&mut conn, "c14").await;
    assert_eq!(
        (hash["status"].as_str(), hash["codec"].as_str()),
        ("answered", "14")
    );
    let ttl: i64 = conn
        .ttl(layout::command_status_key(PREFIX, POOL, "c14"))
        .await
        .unwrap();
    assert!(ttl > 0, "the status hash expires");

    let count = |status| {
        metric(
            &registry,
            "trackgate_listener_commands_total",
            &[("status", status)],
        )
    };
    assert_eq!(
        (
            count("queued"),
            count("sent"),
            count("answered"),
            count("failed")
        ),
        (3.0, 3.0, 2.0, 1.0)
    );
    let refused = metric(
        &registry,
        "trackgate_listener_command_failures_total",
        &[("reason", "refused")],
    );
    assert_eq!(refused, 1.0);
    assert_eq!(
        metric(
            &registry,
            "trackgate_listener_command_response_seconds",
            &[("pool", POOL)]
        ),
        3.0
    );
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("trackgate_listener_command_queue_depth{pool=\"fleet\"}"),
        "{text}"
    );
    assert!(!text.contains(IMEI), "an IMEI leaked into a label");
}

/// Queued while the device is offline: delivered when it logs in. A command whose TTL passes
/// first ends `expired` and never reaches the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_gets_its_queue_at_login_and_expired_commands_never() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let _listener = listener(&redis, shared(port)).await;
    let mut conn = redis_conn(&redis).await;

    send(
        &mut conn,
        &[
            ("id", "short"),
            ("imei", IMEI),
            ("command", "cpureset"),
            ("ttl", "1"),
        ],
    )
    .await;
    send(
        &mut conn,
        &[
            ("id", "long"),
            ("imei", IMEI),
            ("command", "getgps"),
            ("ttl", "60"),
        ],
    )
    .await;
    let expired = final_status(&mut conn, "short", WAIT).await;
    assert_eq!(statuses(&expired), ["queued", "expired"]);
    assert_eq!(expired[1]["reason"], "ttl");
    assert_eq!(statuses(&responses(&mut conn, "long").await), ["queued"]);

    let mut device = Device::connect(addr(port), IMEI).await;
    let command = device
        .command(WAIT)
        .await
        .expect("the queued command at login");
    assert_eq!(text(&command), "getgps");
    device
        .answer(&command, "GPS:1 Sat:7 Lat:54.6 Long:25.2")
        .await;
    assert_eq!(
        statuses(&final_status(&mut conn, "long", WAIT).await),
        ["queued", "sent", "answered"]
    );
    assert!(
        device.command(Duration::from_millis(500)).await.is_none(),
        "the expired command was sent"
    );
}

/// The device drops its connection after receiving a command and reconnects to another
/// listener of the same shard, where it answers: the command went out once, and its answer
/// is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_to_another_listener_is_served_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ports = free_ports(2);
    let _a = listener(&redis, shared(ports[0])).await;
    let _b = listener(&redis, shared(ports[1])).await;
    let mut conn = redis_conn(&redis).await;

    let mut device = Device::connect(addr(ports[0]), IMEI).await;
    send(
        &mut conn,
        &[("id", "moving"), ("imei", IMEI), ("command", "getinfo")],
    )
    .await;
    send(
        &mut conn,
        &[("id", "next"), ("imei", IMEI), ("command", "getver")],
    )
    .await;
    let command = device
        .command(WAIT)
        .await
        .expect("command on the first listener");
    drop(device);

    let mut device = Device::connect(addr(ports[1]), IMEI).await;
    assert!(
        device.command(Duration::from_millis(500)).await.is_none(),
        "sent again while its answer was still awaited"
    );
    device.answer(&command, "INI:2026/12/1").await;
    let moved = final_status(&mut conn, "moving", WAIT).await;
    assert_eq!(
        statuses(&moved),
        ["queued", "sent", "answered"],
        "{moved:?}"
    );

    let next = device
        .command(WAIT)
        .await
        .expect("the next command after the answer");
    assert_eq!(text(&next), "getver");
    device.answer(&next, "Ver:1").await;
    assert_eq!(
        statuses(&final_status(&mut conn, "next", WAIT).await),
        ["queued", "sent", "answered"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        responses(&mut conn, "moving").await.len(),
        3,
        "recorded once"
    );
}

/// Data frames are acked while a command is outstanding; a device that never answers gets
/// `failed: timeout` and its next command goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_acked_while_a_command_waits_and_silence_times_out() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let _listener = listener(&redis, shared(port)).await;
    let mut conn = redis_conn(&redis).await;
    let mut device = Device::connect(addr(port), IMEI).await;

    // NB: the timeout runs from the listener's take, just before the device reads the command.
    let queued_at = Instant::now();
    send(
        &mut conn,
        &[("id", "ignored"), ("imei", IMEI), ("command", "getinfo")],
    )
    .await;
    send(
        &mut conn,
        &[("id", "after"), ("imei", IMEI), ("command", "getver")],
    )
    .await;
    let ignored = device.command(WAIT).await.expect("first command");
    assert_eq!(text(&ignored), "getinfo");
    for i in 0..3 {
        device.send_records(2, 1_764_000_000_000 + i * 10).await;
        match device.next(WAIT).await {
            Some(FromServer::Ack(n)) => assert_eq!(n, 2),
            _ => panic!("no ack while a command is outstanding"),
        }
    }
    let next = device
        .command(WAIT)
        .await
        .expect("the next command after the timeout");
    assert!(
        queued_at.elapsed() >= RESPONSE_TIMEOUT,
        "next command before the response timeout"
    );
    assert_eq!(text(&next), "getver");
    let timed_out = final_status(&mut conn, "ignored", WAIT).await;
    assert_eq!(statuses(&timed_out), ["queued", "sent", "failed"]);
    assert_eq!(timed_out[2]["reason"], "timeout");
    let readings: i64 = conn
        .xlen(trackgate_api::redis_layout::readings_key(
            PREFIX,
            POOL,
            trackgate_api::redis_layout::partition_of(&device.imei, shared(port).redis.partitions),
        ))
        .await
        .unwrap();
    assert_eq!(readings, 6);
}

/// Bad input gets a clear status and touches nothing else: an unknown IMEI and an oversized
/// command fail at once; a malformed answer fails its command and closes only that
/// connection; the other device's command goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_status_and_nothing_else_is_affected() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let _listener = listener(&redis, shared(port)).await;
    let mut conn = redis_conn(&redis).await;
    let mut device = Device::connect(addr(port), IMEI).await;
    let mut other = Device::connect(addr(port), OTHER).await;

    send(
        &mut conn,
        &[
            ("id", "stranger"),
            ("imei", "111111111111111"),
            ("command", "getinfo"),
        ],
    )
    .await;
    let big = "x".repeat(layout::MAX_COMMAND_BYTES + 1);
    send(
        &mut conn,
        &[("id", "big"), ("imei", IMEI), ("command", &big)],
    )
    .await;
    send(
        &mut conn,
        &[
            ("id", "nonsense"),
            ("imei", IMEI),
            ("command", "a"),
            ("codec", "99"),
        ],
    )
    .await;
    for (id, reason) in [
        ("stranger", "unknown_imei"),
        ("big", "too_large"),
        ("nonsense", "malformed"),
    ] {
        let entries = final_status(&mut conn, id, WAIT).await;
        assert_eq!(statuses(&entries), ["failed"], "{id}");
        assert_eq!(entries[0]["reason"], reason, "{id}");
    }

    send(
        &mut conn,
        &[("id", "garbled"), ("imei", IMEI), ("command", "getinfo")],
    )
    .await;
    send(
        &mut conn,
        &[("id", "fine"), ("imei", OTHER), ("command", "getinfo")],
    )
    .await;
    let _garbled = device.command(WAIT).await.expect("command");
    // An answer frame with a broken CRC.
    let mut frame = BytesMut::new();
    encode_command(
        &Command {
            kind: 0x06,
            ..Command::codec12("INI:")
        },
        &mut frame,
    )
    .unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0xFF;
    device.stream.write_all(&frame).await.unwrap();
    let garbled = final_status(&mut conn, "garbled", WAIT).await;
    assert_eq!(statuses(&garbled), ["queued", "sent", "failed"]);
    assert_eq!(garbled[2]["reason"], "malformed");
    assert!(
        device.next(WAIT).await.is_none(),
        "the connection is closed"
    );

    let fine = other
        .command(WAIT)
        .await
        .expect("the other device's command");
    other.answer(&fine, "ok").await;
    assert_eq!(
        statuses(&final_status(&mut conn, "fine", WAIT).await),
        ["queued", "sent", "answered"]
    );
}

// === SIGKILL ===

fn spawn_listener(config: &Path, redis_url: &str) -> Child {
    Process::new(trackgate_binary())
        .arg("listen")
        .arg("--config")
        .arg(config)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--bind", "127.0.0.1"])
        .env("TRACKGATE_REDIS_URL", redis_url)
        .env(
            COMMAND_RESPONSE_TIMEOUT_ENV,
            RESPONSE_TIMEOUT.as_millis().to_string(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn trackgate listen")
}

/// The listener SIGKILLed with one command outstanding and two queued: after the restart none
/// is lost, and none goes out twice — the outstanding one is not resent before its response
/// timeout has passed; it ends `failed: timeout`, the other two are delivered and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_killed_with_commands_queued_loses_and_repeats_none() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("shard.json");
    std::fs::write(&config_path, shared(port).to_json()).unwrap();
    let mut child = spawn_listener(&config_path, &redis.url());
    wait_for_port(addr(port), Duration::from_secs(15)).unwrap();
    let mut conn = redis_conn(&redis).await;

    let mut device = Device::connect(addr(port), IMEI).await;
    // NB: k1's lease starts when the listener takes it, a moment before the device reads it,
    // so the timeout is measured from before the commands were queued, not from the read.
    let queued_at = Instant::now();
    for id in ["k1", "k2", "k3"] {
        send(&mut conn, &[("id", id), ("imei", IMEI), ("command", id)]).await;
    }
    let first = device.command(WAIT).await.expect("first command");
    assert_eq!(text(&first), "k1");
    let sent_at = Instant::now();
    // Killed once k1 is recorded as sent: outstanding, k2 and k3 queued behind it.
    while statuses(&responses(&mut conn, "k1").await) != ["queued", "sent"] {
        assert!(sent_at.elapsed() < WAIT, "k1 never recorded as sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(device);

    let mut child = spawn_listener(&config_path, &redis.url());
    wait_for_port(addr(port), Duration::from_secs(15)).unwrap();
    let mut device = Device::connect(addr(port), IMEI).await;
    let mut received = Vec::new();
    while received.len() < 2 {
        let command = device
            .command(WAIT)
            .await
            .expect("the queued commands after the restart");
        if received.is_empty() {
            assert!(
                queued_at.elapsed() >= RESPONSE_TIMEOUT,
                "a command went out before the outstanding one timed out"
            );
        }
        received.push(text(&command));
        device.answer(&command, "ok").await;
    }
    assert_eq!(
        received,
        ["k2", "k3"],
        "k1 was sent twice or a command was lost"
    );
    let k1 = final_status(&mut conn, "k1", WAIT).await;
    assert_eq!(statuses(&k1), ["queued", "sent", "failed"]);
    assert_eq!(k1[2]["reason"], "timeout");
    for id in ["k2", "k3"] {
        assert_eq!(
            statuses(&final_status(&mut conn, id, WAIT).await),
            ["queued", "sent", "answered"]
        );
    }
    assert!(device.command(Duration::from_millis(300)).await.is_none());
    let _ = child.kill();
    let _ = child.wait();
}

/// `trackgate command` sends through Redis and prints the device's answer (exit 0); a command
/// that fails exits 1 with its status and reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_the_answer_or_fails_with_the_status() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let _listener = listener(&redis, shared(port)).await;
    let mut device = Device::connect(addr(port), IMEI).await;
    let cli = |imei: &str| {
        let mut cmd = tokio::process::Command::new(trackgate_binary());
        cmd.args([
            "command",
            "--redis-url",
            &redis.url(),
            "--pool",
            POOL,
            "--imei",
            imei,
        ])
        .args(["--codec", "14", "--wait-seconds", "10", "getver"])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped());
        cmd.output()
    };
    let answered = tokio::spawn(cli(IMEI));
    let command = device.command(WAIT).await.expect("the CLI's command");
    assert_eq!(
        (command.codec, text(&command).as_str()),
        (Codec::Codec14, "getver")
    );
    device.answer(&command, "Ver:03.28.07_00").await;
    let out = answered.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Ver:03.28.07_00"
    );

    let out = cli("111111111111111").await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed: unknown_imei"), "{stderr}");
}

/// A simulated device answers commands the way a real one does while it keeps sending data:
/// `getver` (Codec 12) and `setdigout` (Codec 14) come back answered, records keep being acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_device_answers_between_its_data_frames() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = free_port();
    let _listener = listener(&redis, shared(port)).await;
    let mut conn = redis_conn(&redis).await;
    let settings = std::sync::Arc::new(trackgate_simulator::DeviceSettings {
        frame_interval: Some(Duration::from_millis(50)),
        ..trackgate_simulator::DeviceSettings::default()
    });
    let mut device = trackgate_simulator::Device::new(
        Imei::parse(IMEI).unwrap(),
        0,
        1,
        1_764_000_000_000,
        u64::MAX,
        settings,
        Instant::now(),
    );
    let stats = std::sync::Arc::new(trackgate_simulator::Stats::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let session = {
        let (stats, stop) = (stats.clone(), stop.clone());
        tokio::spawn(async move {
            let stream = TcpStream::connect(addr(port)).await.unwrap();
            device.run_session(stream, &stats, &stop).await
        })
    };
    send(
        &mut conn,
        &[("id", "ver"), ("imei", IMEI), ("command", "getver")],
    )
    .await;
    send(
        &mut conn,
        &[
            ("id", "dout"),
            ("imei", IMEI),
            ("command", "setdigout 1"),
            ("codec", "14"),
        ],
    )
    .await;
    let ver = final_status(&mut conn, "ver", WAIT).await;
    assert_eq!(statuses(&ver), ["queued", "sent", "answered"]);
    assert!(
        ver[2]["answer"].contains(&format!("IMEI:{IMEI}")),
        "{ver:?}"
    );
    let dout = final_status(&mut conn, "dout", WAIT).await;
    assert_eq!(dout[2]["answer"], "DOUT1:1 Timeout:INFINITY");
    let acked = stats.records_acked();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stats.records_acked() > acked, "records stopped being acked");
    stop.cancel();
    session.await.unwrap().unwrap();
    assert_eq!(stats.report_counts().wrong_acks, 0);
}
