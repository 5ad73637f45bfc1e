//! Two `trackgate listen` processes serving one shared pool, as two replicas of its Deployment
//! behind one Service. The Service is played by a small TCP forwarder that sends each new
//! connection to the next backend that accepts it (what kube-proxy or an NLB does once a dead
//! pod stops answering). One replica is SIGKILLed under load: its devices reconnect through
//! the same address to the other, and the simulator's verifier finds every acked record
//! exactly once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use trackgate_api::{ListenerLimits, RedisSink, ShardConfig};
use trackgate_simulator::{
    DeviceSettings, LoadConfig, Stats, StreamLayout, Target, run_with_stats, verify,
};
use trackgate_tests::{RedisServer, free_port, free_ports, trackgate_binary, wait_for_port};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const POOL: &str = "shared-replicas";

/// One replica: its own port (its own address), the pool's device list file.
struct Replica {
    child: Child,
    addr: SocketAddr,
    admin: u16,
}

impl Replica {
    fn start(dir: &Path, name: &str, config: &ShardConfig, redis_url: &str) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(dir.join("../devices.imeis"), dir.join("devices.imeis")).unwrap();
        let path = dir.join("shard.json");
        std::fs::write(&path, config.to_json()).unwrap();
        let admin = free_port();
        let child = Command::new(trackgate_binary())
            .args(["listen", "--config"])
            .arg(&path)
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin}"))
            .args(["--bind", "127.0.0.1"])
            .env("TRACKGATE_REDIS_URL", redis_url)
            .env("POD_NAME", name)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn trackgate listen");
        let addr = SocketAddr::new(LOCAL, config.ports[0].port);
        wait_for_port(addr, Duration::from_secs(15)).expect("replica accepting");
        Self { child, addr, admin }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Service: each accepted connection goes to the next backend that accepts it, bytes
/// copied both ways until either side closes.
async fn service(front: TcpListener, backends: Vec<SocketAddr>) {
    let next = Arc::new(AtomicUsize::new(0));
    while let Ok((mut inbound, _)) = front.accept().await {
        let (backends, next) = (backends.clone(), Arc::clone(&next));
        tokio::spawn(async move {
            let first = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..backends.len() {
                let backend = backends[(first + i) % backends.len()];
                if let Ok(mut outbound) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

fn shared_config(port: u16) -> ShardConfig {
    shared_config_at_rate(port, 200)
}

fn shared_config_at_rate(port: u16, accept_rate_per_second: u32) -> ShardConfig {
    ShardConfig {
        device_files: vec!["devices.imeis".into()],
        redis: RedisSink {
            partitions: 4,
            ..RedisSink::default()
        },
        limits: ListenerLimits {
            accept_rate_per_second,
            ..ListenerLimits::default()
        },
        ..ShardConfig::shared(POOL, 0, [port], [])
    }
}

/// Which replica (pod) each device is logged in on, from the device-state hash.
fn pods(redis: &RedisServer, devices: &[Target]) -> Vec<String> {
    let key = trackgate_api::redis_layout::devices_key("trackgate", POOL);
    devices
        .iter()
        .map(|d| redis.command(&format!("HGET {key} {}", d.imei)).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_sends_its_devices_to_the_other_and_nothing_acked_is_lost() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    // The pool's list: the simulated devices among a few thousand others.
    let devices: Vec<Target> = (0..24u64)
        .map(|n| Target {
            addr: SocketAddr::new(LOCAL, ports[2]),
            imei: trackgate_protocol::Imei::from_u64(356_307_042_000_000 + n * 37).unwrap(),
        })
        .collect();
    let mut list: String = (0..5_000u64)
        .map(|n| format!("{}\n", 864_186_040_000_000 + n))
        .collect();
    for d in &devices {
        list.push_str(&format!("{}\n", d.imei));
    }
    std::fs::write(dir.path().join("devices.imeis"), list).unwrap();

    let mut a = Replica::start(
        dir.path(),
        "replica-a",
        &shared_config(ports[0]),
        &redis.url(),
    );
    let b = Replica::start(
        dir.path(),
        "replica-b",
        &shared_config(ports[1]),
        &redis.url(),
    );
    let front = TcpListener::bind((LOCAL, ports[2])).await.unwrap();
    tokio::spawn(service(front, vec![a.addr, b.addr]));

    let mut load = LoadConfig::new(devices.clone());
    load.device = DeviceSettings {
        records_per_frame: 4,
        response_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_secs(5),
        keep_acked: true,
        ..DeviceSettings::default()
    };
    load.rate = None;
    load.duration = Some(Duration::from_secs(6));
    load.drain_timeout = Duration::from_secs(12);
    load.backoff_min = Duration::from_millis(50);
    load.backoff_max = Duration::from_millis(500);
    load.seed = 11;
    let stats = Arc::new(Stats::new());
    let run = tokio::spawn(run_with_stats(load, stats.clone()));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = pods(&redis, &devices);
    let on_a = before.iter().filter(|p| p.contains("replica-a")).count();
    let on_b = before.iter().filter(|p| p.contains("replica-b")).count();
    assert!(
        on_a > 0 && on_b > 0,
        "devices log in on either replica: {before:?}"
    );
    let acked_before = stats.records_acked();
    a.kill();
    let killed = Instant::now();

    let outcome = run.await.expect("load task").expect("load runs");
    assert!(
        outcome.report.counts.records_acked > acked_before,
        "no progress after the kill\n{}",
        outcome.report
    );
    let after = pods(&redis, &devices);
    assert!(
        after.iter().all(|p| p.contains("replica-b")),
        "every device ends on the surviving replica: {after:?}"
    );
    let layout = StreamLayout {
        url: redis.url(),
        pool: POOL.to_owned(),
        prefix: "trackgate".to_owned(),
        partitions: 4,
    };
    let imeis: Vec<_> = devices.iter().map(|d| d.imei).collect();
    let v = verify(&layout, &outcome.acked, &imeis)
        .await
        .expect("read redis");
    eprintln!(
        "{}{v}\n{on_a} devices moved from the killed replica; load ended {:?} after the kill",
        outcome.report,
        killed.elapsed()
    );
    assert!(v.is_ok(), "{v}\n{}", outcome.report);
    assert_eq!(v.found, v.acked, "{v}");
    assert_eq!(
        outcome.report.records_unacked_at_end, 0,
        "{}",
        outcome.report
    );
    drop(b);
}

/// The reconnect storm: a replica holding half of 1,200 idle devices dies and they all come
/// through the one address to the survivor at once. Its accept-rate limit (200/s here) turns
/// the excess away, the devices back off with jitter and retry, and the survivor stays live
/// and ready throughout. The figures (time to re-login, rejected accepts) are printed for
/// docs/benchmarks.md; the test asserts health and the full re-login only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_keeps_the_surviving_replica_healthy() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let devices: Vec<Target> = (0..1_200u64)
        .map(|n| Target {
            addr: SocketAddr::new(LOCAL, ports[2]),
            imei: trackgate_protocol::Imei::from_u64(356_307_043_000_000 + n).unwrap(),
        })
        .collect();
    let list: String = devices.iter().map(|d| format!("{}\n", d.imei)).collect();
    std::fs::write(dir.path().join("devices.imeis"), list).unwrap();
    let config = |port| shared_config_at_rate(port, 200);
    let mut a = Replica::start(dir.path(), "replica-a", &config(ports[0]), &redis.url());
    let b = Replica::start(dir.path(), "replica-b", &config(ports[1]), &redis.url());
    let front = TcpListener::bind((LOCAL, ports[2])).await.unwrap();
    tokio::spawn(service(front, vec![a.addr, b.addr]));

    let mut load = LoadConfig::new(devices.clone());
    load.device = DeviceSettings {
        idle: true,
        keepalive_interval: Duration::from_secs(5),
        ..DeviceSettings::default()
    };
    load.duration = Some(Duration::from_secs(25));
    load.drain_timeout = Duration::from_secs(1);
    load.backoff_min = Duration::from_millis(200);
    load.backoff_max = Duration::from_secs(5);
    load.seed = 5;
    let stats = Arc::new(Stats::new());
    let run = tokio::spawn(run_with_stats(load, stats.clone()));
    let all = devices.len() as u64;
    let wait_all = |within: Duration| {
        let stats = stats.clone();
        async move {
            let deadline = Instant::now() + within;
            while stats.connected() < all && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stats.connected()
        }
    };
    assert_eq!(
        wait_all(Duration::from_secs(15)).await,
        all,
        "fleet logged in"
    );

    let http = reqwest::Client::new();
    let admin = format!("http://127.0.0.1:{}", b.admin);
    let rejected = |text: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("trackgate_listener_connections_rejected_total")
                    && l.contains("reason=\"rate\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let metrics = |http: reqwest::Client, url: String| async move {
        http.get(url).send().await.unwrap().text().await.unwrap()
    };
    let rejected_before = rejected(&metrics(http.clone(), format!("{admin}/metrics")).await);
    a.kill();
    let killed = Instant::now();
    let (mut probes, mut unhealthy) = (0u32, 0u32);
    while stats.connected() < all && killed.elapsed() < Duration::from_secs(20) {
        for path in ["livez", "readyz"] {
            let ok = http
                .get(format!("{admin}/{path}"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            probes += 1;
            unhealthy += u32::from(!ok);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let relogin = killed.elapsed();
    let connected = stats.connected();
    let rejected_during =
        rejected(&metrics(http.clone(), format!("{admin}/metrics")).await) - rejected_before;
    eprintln!(
        "FIGURE storm: {all} idle devices on 2 replicas, one SIGKILLed: {connected}/{all} \
         logged in again {relogin:?} after the kill through one address; survivor refused \
         {rejected_during} accepts by rate (200/s), {unhealthy}/{probes} failed health probes"
    );
    assert_eq!(connected, all, "every device back on the survivor");
    assert_eq!(
        unhealthy, 0,
        "the survivor failed /livez or /readyz during the storm"
    );
    run.abort();
    drop(b);
}
