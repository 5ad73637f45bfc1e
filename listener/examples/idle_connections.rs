//! Measures user-space memory per idle, logged-in device connection.
//!
//! `cargo run --release -p trackgate-listener --example idle_connections -- <redis-url> [n]`
//!
//! Starts a shared-mode listener on 127.0.0.1, opens `n` plain blocking client sockets (an fd
//! each, no runtime state), logs every one in, and reports the listener process's RSS growth
//! divided by `n`. The client side is a file descriptor in a `Vec`, so nearly all the growth is
//! the listener's: task, session state, read buffer, socket registration. With `RUST_LOG`
//! set, the log subscriber is installed as in production, and the session spans it keeps
//! (pool, shard, port, peer, imei) are counted too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use trackgate_api::ShardConfig;
use trackgate_listener::{Listener, ListenerOptions, ShardSource};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn imei(i: usize) -> String {
    format!("{:015}", 350_000_000_000_000u64 + i as u64)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("RUST_LOG").is_some() {
        trackgate_telemetry::init_logging(trackgate_telemetry::LogFormat::from_env());
    }
    let mut args = std::env::args().skip(1);
    let redis_url = args
        .next()
        .ok_or("usage: idle_connections <redis-url> [n]")?;
    let n: usize = args.next().map_or(Ok(5000), |s| s.parse())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let devices: Vec<String> = (0..n).map(imei).collect();
    let config = ShardConfig::from_json(&format!(
        r#"{{"pool":"mem","shard":0,"mode":"shared","ports":[{{"port":{port}}}],"devices":{},
           "limits":{{"maxConnections":{n},"acceptRatePerSecond":1000000}}}}"#,
        serde_json::to_string(&devices)?
    ))?;
    let options = ListenerOptions {
        redis_url,
        bind_ip: "127.0.0.1".parse()?,
        ..ListenerOptions::default()
    };
    let listener = Listener::start(
        options,
        vec![ShardSource::Config(config)],
        &prometheus::Registry::new(),
        trackgate_telemetry::Health::new(),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let clients = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<TcpStream>> {
        let mut clients = Vec::with_capacity(n);
        for device in &devices {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            let mut login = vec![0, 15];
            login.extend_from_slice(device.as_bytes());
            s.write_all(&login)?;
            let mut reply = [0u8; 1];
            s.read_exact(&mut reply)?;
            if reply != [1] {
                return Err(std::io::Error::other("login refused"));
            }
            clients.push(s);
        }
        Ok(clients)
    })
    .await??;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    println!(
        "{n} idle logged-in connections: RSS {before} KiB -> {after} KiB, {:.0} bytes per connection",
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
    drop(clients);
    listener.shutdown().await;
    Ok(())
}
