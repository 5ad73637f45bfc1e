//! Resilience: the no-loss and exactly-once promises hold when Redis or the listener dies under
//! load. A real `redis-server`, the real `trackgate listen` binary as a child process, and the
//! simulator's devices on loopback; the simulator's verifier is the judge.
//!
//! The binary is found by `trackgate_tests::trackgate_binary` (`make test` builds it first).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use trackgate_api::{RedisSink, ShardConfig};
use trackgate_simulator::{
    DeviceSettings, LoadConfig, LoadOutcome, Stats, StreamLayout, Verification, run_with_stats,
    targets_from_shard, verify,
};
use trackgate_tests::{RedisServer, free_port, free_ports, trackgate_binary, wait_for_port};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const POOL: &str = "resilience";
const DEVICES: usize = 8;

// === Harness ===

/// A dedicated-mode shard of `DEVICES` devices on free loopback ports.
fn shard_config() -> ShardConfig {
    let owners = free_ports(DEVICES)
        .into_iter()
        .zip(356_307_042_441_013u64..)
        .map(|(port, imei)| (port, imei.to_string()));
    ShardConfig {
        redis: RedisSink {
            partitions: 4,
            ..RedisSink::default()
        },
        ..ShardConfig::dedicated(POOL, 0, owners)
    }
}

/// `trackgate listen` as a child process, SIGKILLed on drop.
struct ListenerProcess {
    child: Child,
    config_path: PathBuf,
    admin: u16,
    redis_url: String,
    first_port: SocketAddr,
}

impl ListenerProcess {
    fn start(dir: &Path, config: &ShardConfig, redis_url: &str) -> Self {
        let config_path = dir.join("shard.json");
        std::fs::write(&config_path, config.to_json()).expect("write shard.json");
        let mut listener = Self {
            child: spawn_listener(&config_path, free_port(), redis_url),
            config_path,
            admin: 0,
            redis_url: redis_url.to_owned(),
            first_port: SocketAddr::new(LOCAL, config.ports[0].port),
        };
        listener.wait_ready();
        listener
    }

    fn wait_ready(&mut self) {
        if let Err(err) = wait_for_port(self.first_port, Duration::from_secs(15)) {
            let status = self.child.try_wait();
            panic!("listener not accepting: {err} (process: {status:?})");
        }
    }

    /// SIGKILL, as the OOM killer or a node failure would.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same config, Redis and ports.
    fn restart(&mut self) {
        self.kill();
        self.admin = free_port();
        self.child = spawn_listener(&self.config_path, self.admin, &self.redis_url);
        self.wait_ready();
    }
}

impl Drop for ListenerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_listener(config: &Path, admin: u16, redis_url: &str) -> Child {
    Command::new(trackgate_binary())
        .arg("listen")
        .arg("--config")
        .arg(config)
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{admin}"))
        .args(["--bind", "127.0.0.1"])
        .env("TRACKGATE_REDIS_URL", redis_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn trackgate listen")
}

/// Devices that fail fast and come back fast, so an outage of a few seconds shows up as
/// timeouts, reconnects and resends within the test's time budget.
fn load_config(config: &ShardConfig, duration: Duration) -> LoadConfig {
    let mut load = LoadConfig::new(targets_from_shard(config, LOCAL).expect("targets"));
    load.device = DeviceSettings {
        records_per_frame: 4,
        response_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_secs(5),
        keep_acked: true,
        ..DeviceSettings::default()
    };
    load.rate = Some(400.0);
    load.duration = Some(duration);
    load.drain_timeout = Duration::from_secs(12);
    load.backoff_min = Duration::from_millis(50);
    load.backoff_max = Duration::from_millis(500);
    load.seed = 7;
    load
}

fn layout(config: &ShardConfig, redis: &RedisServer) -> StreamLayout {
    StreamLayout {
        url: redis.url(),
        pool: config.pool.clone(),
        prefix: config.redis.stream_prefix.clone(),
        partitions: config.redis.partitions,
    }
}

fn assert_exactly_once(v: &Verification, outcome: &LoadOutcome) {
    assert!(v.is_ok(), "{v}\n{}", outcome.report);
    assert_eq!(v.found, v.acked, "{v}");
    assert_eq!(
        outcome.report.records_unacked_at_end, 0,
        "every device got its last frame acked after the outage\n{}",
        outcome.report
    );
}

// === Tests ===

/// Redis SIGKILLed under load and restarted empty (cache mode, as `RedisServer` runs it):
/// nothing is acked while Redis is down, and every record acked after it is back is in the
/// new dataset exactly once. Records acked before the crash died with the old dataset, which
/// is Redis's persistence setting, not the listener's doing, so they are not looked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_loses_and_duplicates_nothing_acked() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = shard_config();
    let _listener = ListenerProcess::start(dir.path(), &config, &redis.url());

    let stats = Arc::new(Stats::new());
    let load = tokio::spawn(run_with_stats(
        load_config(&config, Duration::from_secs(10)),
        stats.clone(),
    ));

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        stats.records_acked() > 0,
        "no record acked before the crash"
    );
    let killed_at = stats.since_start();
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restart_at = stats.since_start();
    redis.restart().expect("restart redis");

    let outcome = load.await.expect("load task").expect("load runs");
    // Acks that were already on the wire when Redis died may land a moment later.
    let grace = Duration::from_millis(500);
    let acked_while_down = outcome
        .acked
        .count_acked_between(killed_at + grace, restart_at);
    assert_eq!(
        acked_while_down, 0,
        "records acked while Redis was down\n{}",
        outcome.report
    );
    let after = outcome.acked.acked_since(restart_at);
    assert!(
        !after.is_empty(),
        "nothing acked after Redis came back\n{}",
        outcome.report
    );

    let devices = device_imeis(&config);
    let v = verify(&layout(&config, &redis), &after, &devices)
        .await
        .expect("read redis");
    eprintln!("{}{v}", outcome.report);
    assert_exactly_once(&v, &outcome);
}

/// The listener SIGKILLed under load and restarted on the same ports: devices time out or see
/// the close, reconnect with backoff and resend their unacked frames; Redis (up throughout)
/// ends with every acked record exactly once, including frames stored just before the kill
/// whose ack never left, which the dedup script must absorb on resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_killed_mid_load_devices_resend_and_redis_has_each_record_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = shard_config();
    let mut listener = ListenerProcess::start(dir.path(), &config, &redis.url());

    // As fast as acked: every device has a frame in flight when the kill lands, so some are
    // stored without their ack ever leaving, and every device must resend.
    let mut load = load_config(&config, Duration::from_secs(6));
    load.rate = None;
    let stats = Arc::new(Stats::new());
    let load = tokio::spawn(run_with_stats(load, stats.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = stats.records_acked();
    assert!(before > 0, "no record acked before the kill");
    listener.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Waiting for the ports is blocking; keep it off the runtime the devices run on.
    let _listener = tokio::task::spawn_blocking(move || {
        listener.restart();
        listener
    })
    .await
    .expect("restart listener");

    let outcome = load.await.expect("load task").expect("load runs");
    assert!(
        outcome.report.counts.records_acked > before,
        "no progress after the restart\n{}",
        outcome.report
    );
    assert!(
        outcome.report.counts.resends > 0,
        "no device resent its unacked frame\n{}",
        outcome.report
    );

    let devices = device_imeis(&config);
    let v = verify(&layout(&config, &redis), &outcome.acked, &devices)
        .await
        .expect("read redis");
    eprintln!("{}{v}", outcome.report);
    assert_exactly_once(&v, &outcome);
    // Every device finished with its last frame acked, so anything stored was acked too.
    assert_eq!(v.stored_unacked, 0, "{v}");
}

fn device_imeis(config: &ShardConfig) -> Vec<trackgate_protocol::Imei> {
    targets_from_shard(config, LOCAL)
        .expect("targets")
        .into_iter()
        .map(|t| t.imei)
        .collect()
}

/// A rollout without a reconnect storm: after SIGTERM the listener fails `/readyz` while its
/// ports still accept for the drain delay, then drains and exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_first_and_keeps_accepting_for_the_drain_delay() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = shard_config();
    let path = dir.path().join("shard.json");
    std::fs::write(&path, config.to_json()).expect("write shard.json");
    let admin = free_port();
    let mut child = Command::new(trackgate_binary())
        .args(["listen", "--config"])
        .arg(&path)
        .args([
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--bind",
            "127.0.0.1",
        ])
        .env("TRACKGATE_REDIS_URL", redis.url())
        .env(trackgate_api::shard_config::DRAIN_DELAY_ENV, "3")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn trackgate listen");
    let device = SocketAddr::new(LOCAL, config.ports[0].port);
    wait_for_port(device, Duration::from_secs(15)).expect("listener accepting");
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    let status = || async {
        reqwest::get(&readyz)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    for _ in 0..50 {
        if status().await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status().await, 200, "ready before SIGTERM");

    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(sent.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status().await, 503, "/readyz fails first");
    let conn = tokio::net::TcpStream::connect(device).await;
    assert!(conn.is_ok(), "still accepting during the drain delay");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    drop(conn);

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit after the drain"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "{exit:?}");
}
