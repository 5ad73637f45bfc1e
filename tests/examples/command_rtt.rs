//! Benchmark: command round trip through Redis with many connected devices.
//!
//! A `redis-server`, the real `trackgate listen` binary (`TRACKGATE_BIN`, else the one of this
//! build's profile) serving a shared pool, and `DEVICES` idle simulated devices that answer commands as
//! FMB devices do. Commands are `XADD`ed at `RATE` per second to random devices; the round trip
//! is the command entry's id (Redis time of the `XADD`) to the `answered` entry's `ts` (Redis
//! time of the RESOLVE), so both ends read one clock.
//!
//! ```sh
//! cargo build --release -p trackgate
//! TRACKGATE_BIN=target/release/trackgate DEVICES=1000 COMMANDS=3000 RATE=300 \
//!   cargo run -p trackgate-tests --example command_rtt
//! ```

use std::collections::HashMap;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trackgate_api::ShardConfig;
use trackgate_api::redis_layout as layout;
use trackgate_protocol::Imei;
use trackgate_simulator::{Device, DeviceSettings, Stats};
use trackgate_tests::{RedisServer, free_port, trackgate_binary, wait_for_port};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let devices = env("DEVICES", 1000);
    let commands = env("COMMANDS", 3000);
    let rate = env("RATE", 300) as f64;
    let redis = RedisServer::start().ok_or_else(|| anyhow::anyhow!("no redis-server"))?;
    let port = free_port();
    let imeis: Vec<String> = (0..devices)
        .map(|i| (356_307_042_441_013u64 + i).to_string())
        .collect();
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("shard.json");
    std::fs::write(
        &config_path,
        ShardConfig::shared("bench", 0, [port], imeis.clone()).to_json(),
    )?;
    let mut listener = Process::new(trackgate_binary())
        .args(["listen", "--config"])
        .arg(&config_path)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--bind", "127.0.0.1"])
        .env("TRACKGATE_REDIS_URL", redis.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(addr, Duration::from_secs(15))?;

    let settings = Arc::new(DeviceSettings {
        idle: true,
        keepalive_interval: Duration::from_secs(120),
        ..DeviceSettings::default()
    });
    let stats = Arc::new(Stats::new());
    let stop = CancellationToken::new();
    for (i, imei) in imeis.iter().enumerate() {
        let mut device = Device::new(
            Imei::parse(imei)?,
            i as u64,
            1,
            1_764_000_000_000,
            u64::MAX,
            settings.clone(),
            Instant::now(),
        );
        let (stats, stop) = (stats.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(stream) = TcpStream::connect(addr).await {
                    let _ = device.run_session(stream, &stats, &stop).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        if i % 500 == 499 {
            // Under the listener's accept rate (1,000/s).
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let members = layout::pool_members_key("trackgate", "bench");
    while stats.connected() < devices || conn.hlen::<_, u64>(&members).await? < devices {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{devices} devices connected; sending {commands} commands at {rate}/s");

    let stream = layout::commands_key("trackgate", "bench");
    let mut sent_ms: HashMap<String, u64> = HashMap::new();
    let started = Instant::now();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for n in 0..commands {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let imei = &imeis[(seed % devices) as usize];
        let id = format!("b{n}");
        let entry: String = conn
            .xadd(
                &stream,
                "*",
                &[("id", id.as_str()), ("imei", imei), ("command", "getver")],
            )
            .await?;
        let ms = entry
            .split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        sent_ms.insert(id, ms);
        let due = started + Duration::from_secs_f64((n + 1) as f64 / rate);
        tokio::time::sleep_until(due).await;
    }

    let responses = layout::command_responses_key("trackgate", "bench");
    let mut last = "0-0".to_owned();
    let mut rtt = Vec::with_capacity(commands as usize);
    let mut other = HashMap::<String, u64>::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let opts = StreamReadOptions::default().count(1000).block(500);
    while (rtt.len() as u64 + other.values().sum::<u64>()) < commands && Instant::now() < deadline {
        let reply: Option<StreamReadReply> =
            conn.xread_options(&[&responses], &[&last], &opts).await?;
        for e in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last.clone_from(&e.id);
            let status: String = e.get("status").unwrap_or_default();
            let id: String = e.get("id").unwrap_or_default();
            match status.as_str() {
                "answered" => {
                    let ts: u64 = e
                        .get::<String>("ts")
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0);
                    if let Some(at) = sent_ms.get(&id) {
                        rtt.push(ts.saturating_sub(*at));
                    }
                }
                "failed" | "expired" => *other.entry(status).or_default() += 1,
                _ => {}
            }
        }
    }
    stop.cancel();
    let _ = listener.kill();
    let _ = listener.wait();
    rtt.sort_unstable();
    let q = |p: f64| {
        rtt.get(((rtt.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "devices {devices}  commands {commands} at {rate}/s  answered {}  other {other:?}\n\
         round trip XADD -> answered (ms, Redis clock): p50 {}  p90 {}  p99 {}  max {}",
        rtt.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        rtt.last().copied().unwrap_or(0)
    );
    Ok(())
}
