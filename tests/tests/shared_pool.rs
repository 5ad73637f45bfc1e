//! A shared pool at fleet scale: one listener admits a million IMEIs read from ConfigMap files
//! laid out as the kubelet mounts them (a projected volume: `..data` → a timestamped
//! directory, each visible name a symlink through `..data`), and follows the kubelet's atomic
//! update of those files.
//!
//! Figures (load time, RSS, login rate) are printed for `docs/benchmarks.md`, never asserted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trackgate_api::{ListenerLimits, ShardConfig};
use trackgate_listener::{Listener, ListenerOptions, ShardSource};
use trackgate_protocol::{Imei, encode_login};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisServer, free_ports};

const DEVICES: usize = 1_000_000;
/// What one 1 MiB ConfigMap holds with room to spare (16 bytes a line).
const PER_CONFIG_MAP: usize = 60_000;

/// Deterministic, well-spread IMEIs: `350000000000000 + (n * an odd stride) mod 10^14`.
fn imei(n: usize) -> String {
    let spread = (n as u64).wrapping_mul(2_654_435_761) % 100_000_000_000_000;
    format!("{:015}", 350_000_000_000_000 + spread)
}

/// A tiny xorshift: random draws without a dependency.
struct Draw(u64);

impl Draw {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

/// A projected volume as the kubelet writes it: the files in `..<version>/`, `..data` pointing
/// at the current version, and each top-level name a symlink through `..data`.
struct Mount {
    dir: PathBuf,
    version: u32,
}

impl Mount {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            version: 0,
        }
    }

    /// Writes a new version and swaps `..data` to it atomically, as the kubelet does.
    fn publish(&mut self, shard_json: &str, lists: &[String]) {
        use std::os::unix::fs::symlink;
        self.version += 1;
        let version = format!("..2026_12_01_{:02}", self.version);
        let target = self.dir.join(&version);
        std::fs::create_dir_all(target.join("devices")).unwrap();
        std::fs::write(target.join("shard.json"), shard_json).unwrap();
        std::fs::write(target.join("inline.imeis"), "").unwrap();
        for (i, list) in lists.iter().enumerate() {
            std::fs::write(target.join(format!("devices/{i}.imeis")), list).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for name in ["shard.json", "inline.imeis", "devices"] {
            let link = self.dir.join(name);
            if link.symlink_metadata().is_err() {
                symlink(format!("..data/{name}"), &link).unwrap();
            }
        }
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Logs in and returns the reply byte and the open connection.
async fn login(port: u16, imei: &str) -> (u8, TcpStream) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut frame = BytesMut::new();
    encode_login(&Imei::parse(imei).unwrap(), &mut frame);
    stream.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 1];
    stream.read_exact(&mut reply).await.unwrap();
    (reply[0], stream)
}

async fn wait_for_login(port: u16, imei: &str, want: u8) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (reply, _) = login(port, imei).await;
        if reply == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{imei} still gets {reply} after the reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 10's proof: a million IMEIs from 17 ConfigMap files, devices drawn at random from the
/// whole list log in on the pool's first port, a stranger is refused; after the kubelet swaps
/// in files without one device and with a new one, the removed device's live connection is
/// closed and it is refused, and the new one is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_imeis_from_config_map_files_are_admitted_and_follow_updates() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let ports = free_ports(3);
    let all: Vec<String> = (0..DEVICES).map(imei).collect();
    let mut lists: Vec<String> = all
        .chunks(PER_CONFIG_MAP)
        .map(|chunk| chunk.join("\n") + "\n")
        .collect();
    assert_eq!(lists.len(), 17);
    assert!(lists.iter().all(|l| l.len() < 1024 * 1024));

    let mut config = ShardConfig::shared(POOL, 0, ports.iter().copied(), []);
    config.device_files = std::iter::once("inline.imeis".to_owned())
        .chain((0..lists.len()).map(|i| format!("devices/{i}.imeis")))
        .collect();
    config.limits = ListenerLimits {
        accept_rate_per_second: 100_000,
        ..ListenerLimits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut mount = Mount::new(dir.path());
    mount.publish(&config.to_json(), &lists);

    let options = ListenerOptions {
        redis_url: redis.url(),
        bind_ip: "127.0.0.1".parse().unwrap(),
        reload_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(2),
        ..ListenerOptions::default()
    };
    let rss_before = rss_kib();
    let started = Instant::now();
    let listener = Listener::start(
        options,
        vec![ShardSource::File(dir.path().join("shard.json"))],
        &Registry::new(),
        Health::new(),
    )
    .await
    .unwrap();
    let load = started.elapsed();
    let rss_after = rss_kib();
    eprintln!(
        "FIGURE shared_pool: {DEVICES} IMEIs in {} files loaded in {load:?}; RSS +{} KiB ({:.1} B/IMEI)",
        lists.len(),
        rss_after.saturating_sub(rss_before),
        rss_after.saturating_sub(rss_before) as f64 * 1024.0 / DEVICES as f64,
    );

    // Devices drawn from the whole list log in on the first port.
    let mut draw = Draw(0x9E37_79B9_7F4A_7C15);
    let logins = 2_000;
    let t = Instant::now();
    for _ in 0..logins {
        let (reply, _) = login(ports[0], &all[draw.next(DEVICES)]).await;
        assert_eq!(reply, 1);
    }
    let elapsed = t.elapsed();
    eprintln!(
        "FIGURE shared_pool: {logins} sequential logins (connect, login, reply) at {DEVICES} IMEIs: {:.0}/s",
        f64::from(logins) / elapsed.as_secs_f64()
    );
    let (reply, _) = login(ports[0], "999999999999999").await;
    assert_eq!(reply, 0, "a stranger is refused");

    // The kubelet swaps in new files: one device removed, one added.
    let removed = all[DEVICES / 2].clone();
    let added = "351111111111111";
    let (reply, mut live) = login(ports[1], &removed).await;
    assert_eq!(reply, 1);
    let (reply, _) = login(ports[0], added).await;
    assert_eq!(reply, 0);
    let holder = DEVICES / 2 / PER_CONFIG_MAP;
    lists[holder] = lists[holder].replace(&format!("{removed}\n"), "");
    lists[0].push_str(&format!("# added by the fleet team\n{added}\n"));
    let t = Instant::now();
    mount.publish(&config.to_json(), &lists);

    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), live.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the removed device's live connection must be closed: {closed:?}"
    );
    eprintln!(
        "FIGURE shared_pool: removed device disconnected {:?} after the ..data swap",
        t.elapsed()
    );
    wait_for_login(ports[0], added, 1).await;
    let (reply, _) = login(ports[2], &removed).await;
    assert_eq!(reply, 0, "a removed device is refused at its next login");
    let (reply, _) = login(ports[2], &all[7]).await;
    assert_eq!(reply, 1, "the others stay admitted");
    listener.shutdown().await;
}

const POOL: &str = "fleet";
