//! `rediss://` with the pool's CA (and a client certificate), and the listener's
//! least-privilege ACL user, against a real `redis-server --tls-port` with a CA made here
//! with the `openssl` CLI. A wrong CA or password fails `/readyz` with the reason and acks
//! nothing.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use prometheus::Registry;
use trackgate_api::ShardConfig;
use trackgate_api::redis_layout::{devices_key, events_key, listener_acl};
use trackgate_listener::{Listener, ListenerOptions, RedisTlsFiles, ShardSource};
use trackgate_simulator::{
    DeviceSettings, LoadConfig, StreamLayout, run, targets_from_shard, verify,
};
use trackgate_telemetry::Health;
use trackgate_tests::{RedisServer, free_port, free_ports, require_tool};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const PASSWORD: &str = "listener-secret";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and an
/// unrelated CA (P-256 keys: fast to make).
fn make_certs(dir: &Path) {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let mut args = vec!["req", "-x509"];
        args.extend(key);
        let (keyout, out, subj) = (
            format!("{ca}.key"),
            format!("{ca}.crt"),
            format!("/CN={ca}"),
        );
        args.extend([
            "-keyout", &keyout, "-out", &out, "-days", "1", "-subj", &subj,
        ]);
        openssl(dir, &args);
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        let (keyout, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let mut args = vec!["req"];
        args.extend(key);
        args.extend(["-keyout", &keyout, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
        openssl(dir, &args);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "1",
                "-extfile",
                ext,
            ],
        );
    }
}

struct TlsRedis {
    server: RedisServer,
    tls_port: u16,
    certs: PathBuf,
}

impl TlsRedis {
    /// `clients`: `no` (server-authenticated TLS) or `yes` (mutual TLS).
    fn start(certs: &Path, clients: &str) -> Option<Self> {
        let tls_port = free_port();
        let path = |f: &str| certs.join(f).to_string_lossy().into_owned();
        let (cert, key, ca, port) = (
            path("server.crt"),
            path("server.key"),
            path("ca.crt"),
            tls_port.to_string(),
        );
        let server = RedisServer::start_with(
            "redis-server",
            &[
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-port",
                &port,
                "--tls-cert-file",
                &cert,
                "--tls-key-file",
                &key,
                "--tls-ca-cert-file",
                &ca,
                "--tls-auth-clients",
                clients,
            ],
        )?;
        // The listener's user, with exactly the documented rules.
        let reply = server
            .command(&format!(
                "ACL SETUSER listener on >{PASSWORD} {}",
                listener_acl("trackgate")
            ))
            .unwrap();
        assert_eq!(reply, "+OK", "ACL SETUSER");
        Some(Self {
            server,
            tls_port,
            certs: certs.to_owned(),
        })
    }

    fn url(&self, password: &str) -> String {
        format!("rediss://listener:{password}@127.0.0.1:{}/", self.tls_port)
    }

    fn files(&self, ca: &str, client: bool) -> RedisTlsFiles {
        RedisTlsFiles {
            ca_file: Some(self.certs.join(ca)),
            client_cert_file: client.then(|| self.certs.join("client.crt")),
            client_key_file: client.then(|| self.certs.join("client.key")),
        }
    }
}

fn config() -> ShardConfig {
    let imeis = (0..4).map(|i| (356_307_042_441_013u64 + i).to_string());
    ShardConfig::shared("secure", 0, free_ports(1), imeis)
}

/// Starts a listener, waits up to `within` for readiness, runs load (24 records when ready,
/// 1.5 s of sending when not) and returns the readiness and the load's outcome.
async fn attempt(
    url: String,
    tls: RedisTlsFiles,
    config: &ShardConfig,
    within: Duration,
) -> (Result<(), String>, trackgate_simulator::LoadOutcome) {
    let health = Health::new();
    let options = ListenerOptions {
        redis_url: url,
        redis_tls: tls,
        bind_ip: LOCAL,
        publish_retry_for: Duration::from_secs(1),
        // Long enough for a TLS handshake on a loaded CI machine: a PING that times out first
        // would hide the reason these tests look for (a certificate, a password).
        redis_timeout: Duration::from_secs(3),
        shutdown_grace: Duration::from_millis(500),
        ..ListenerOptions::default()
    };
    let listener = Listener::start(
        options,
        vec![ShardSource::Config(config.clone())],
        &Registry::new(),
        health.clone(),
    )
    .await
    .expect("listener starts");
    let deadline = Instant::now() + within;
    let readiness = loop {
        let state = health.readiness();
        // Wait for a verdict on Redis itself, not only for the first PING to be sent.
        let decided = match &state {
            Ok(()) => true,
            Err(why) => why.contains("redis ("),
        };
        if decided || Instant::now() > deadline {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut load = LoadConfig::new(targets_from_shard(config, LOCAL).expect("targets"));
    load.device = DeviceSettings {
        records_per_frame: 3,
        response_timeout: Duration::from_secs(2),
        keep_acked: true,
        ..DeviceSettings::default()
    };
    if readiness.is_ok() {
        load.duration = None;
        load.records = Some(24);
    } else {
        // Nothing will be acked: send for a while, then stop.
        load.duration = Some(Duration::from_millis(1500));
    }
    load.drain_timeout = Duration::from_millis(300);
    let outcome = tokio::time::timeout(Duration::from_secs(6), run(load))
        .await
        .map(|r| r.expect("load runs"));
    let _ = listener.shutdown().await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(_) => panic!("load did not end"),
    };
    (readiness, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_pool_ca_and_the_least_privilege_acl_user_stores_everything() {
    require_tool("openssl");
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let Some(redis) = TlsRedis::start(dir.path(), "no") else {
        return;
    };
    let config = config();
    let (ready, outcome) = attempt(
        redis.url(PASSWORD),
        redis.files("ca.crt", false),
        &config,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ready, Ok(()));
    assert_eq!(
        outcome.report.counts.records_acked, 24,
        "{}",
        outcome.report
    );
    let layout = StreamLayout {
        url: redis.server.url(),
        pool: config.pool.clone(),
        prefix: config.redis.stream_prefix.clone(),
        partitions: config.redis.partitions,
    };
    let devices: Vec<_> = targets_from_shard(&config, LOCAL)
        .unwrap()
        .iter()
        .map(|t| t.imei)
        .collect();
    let v = verify(&layout, &outcome.acked, &devices)
        .await
        .expect("read redis");
    assert!(v.is_ok() && v.found == 24, "{v}");
    // The side writes went through under the same ACL.
    let events = redis
        .server
        .command(&format!("XLEN {}", events_key("trackgate", "secure")))
        .unwrap();
    assert_ne!(events, ":0", "events written");
    let devices = redis
        .server
        .command(&format!("HLEN {}", devices_key("trackgate", "secure")))
        .unwrap();
    assert_eq!(devices, ":4", "device state written");
    // Nothing was refused for lack of a permission.
    let denied = redis.server.command("ACL LOG").unwrap();
    if !denied.starts_with("*0") {
        let log = std::process::Command::new("redis-cli")
            .args(["-p", &redis.server.port().to_string(), "ACL", "LOG"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!("refused for lack of a permission (ACL LOG):\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_password_fails_readyz_with_the_reason_and_acks_nothing() {
    require_tool("openssl");
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let Some(redis) = TlsRedis::start(dir.path(), "no") else {
        return;
    };
    let cases = [
        (redis.url(PASSWORD), "other-ca.crt", "certificate"),
        (redis.url("wrong"), "ca.crt", "authentication failed"),
    ];
    for (url, ca, why) in cases {
        let (ready, outcome) = attempt(
            url,
            redis.files(ca, false),
            &config(),
            Duration::from_secs(5),
        )
        .await;
        let reason = ready.expect_err("not ready");
        eprintln!("{reason}");
        assert!(
            reason.contains("redis (") && reason.contains(why),
            "{why}: {reason}"
        );
        assert_eq!(
            outcome.report.counts.records_acked, 0,
            "{why}: acked\n{}",
            outcome.report
        );
    }
}

/// Mutual TLS: a server that requires client certificates accepts the listener with the
/// pool's client certificate and refuses it without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    require_tool("openssl");
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let Some(redis) = TlsRedis::start(dir.path(), "yes") else {
        return;
    };
    let (ready, outcome) = attempt(
        redis.url(PASSWORD),
        redis.files("ca.crt", true),
        &config(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(ready, Ok(()));
    assert_eq!(
        outcome.report.counts.records_acked, 24,
        "{}",
        outcome.report
    );
    // a new port: the first listener's port may not be released yet
    let (ready, outcome) = attempt(
        redis.url(PASSWORD),
        redis.files("ca.crt", false),
        &config(),
        Duration::from_secs(5),
    )
    .await;
    assert!(ready.is_err(), "ready without a client certificate");
    assert_eq!(outcome.report.counts.records_acked, 0, "{}", outcome.report);
}
