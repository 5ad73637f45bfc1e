//! The [`Listener`]: accept loops per port, connection limits, reload, shutdown.
//!
//! ```text
//!  Listener ─┬─ Shard (pool/shard) ─┬─ port 5000: accept loop ─► session task ─┐
//!            │   view: watch<Arc<ShardView>> ◄── reload (poll the file)        ├─► Sink ─► publisher ─► Redis
//!            │                      └─ port 5001: accept loop, udp loop ───────┘
//!            └─ Shard …            (one Sink, one Metrics, one Health for the whole process)
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use prometheus::Registry;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use trackgate_api::imei_list::ImeiSet;
use trackgate_api::redis_layout as layout;
use trackgate_api::{IdentificationMode, ShardConfig};
use trackgate_telemetry::{Health, Heartbeat};

use crate::command::{CommandOptions, Commands};
use crate::config::{self, FileStamp, ShardView};
use crate::error::StartError;
use crate::metrics::Metrics;
use crate::redis_conn::RedisTlsFiles;
use crate::session::{self, ShardContext};
use crate::sink::{Sink, SinkOptions};
use crate::udp;

/// Readiness condition: every shard config loaded.
const CONFIG_READY: &str = "config";
/// Readiness condition: every configured port bound.
const PORTS_READY: &str = "ports";
/// Loops beat at least this often while idle.
pub(crate) const BEAT_EVERY: Duration = Duration::from_millis(500);

/// Process-wide settings that do not come from a shard config.
#[derive(Clone, Debug)]
pub struct ListenerOptions {
    /// Redis URL (`TRACKGATE_REDIS_URL`; default `redis://127.0.0.1:6379/`): `redis://`,
    /// `rediss://` (TLS), `redis+cluster://` or `rediss+cluster://` (Redis Cluster), with the
    /// ACL user and password in it.
    pub redis_url: String,
    /// CA and client certificate for `rediss://` (`TRACKGATE_REDIS_CA_FILE`,
    /// `TRACKGATE_REDIS_CLIENT_CERT_FILE`, `TRACKGATE_REDIS_CLIENT_KEY_FILE`).
    pub redis_tls: RedisTlsFiles,
    /// Address the device ports are bound on (`0.0.0.0`; tests use `127.0.0.1`).
    pub bind_ip: IpAddr,
    /// Name of this listener in the device-state hash (`POD_NAME`, else the host name).
    pub pod_name: String,
    /// How often config files are checked for changes. ConfigMap updates arrive as a symlink
    /// swap, which a content poll sees on every platform.
    pub reload_interval: Duration,
    /// How long shutdown waits for sessions to finish their in-flight frame.
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long `/readyz` fails while the ports still accept, before the drain
    /// (`TRACKGATE_DRAIN_DELAY_SECONDS`; 0 by default, the operator sets it for pods).
    pub drain_delay: Duration,
    /// How long one frame may keep failing to store before its connection is closed unacked.
    pub publish_retry_for: Duration,
    /// Redis connect and response timeout for one batch.
    pub redis_timeout: Duration,
    /// Global cap on bytes of received frames waiting for Redis (backpressure).
    pub max_inflight_bytes: usize,
    /// Dedup window: how many of each device's newest records are remembered. A device sends
    /// one frame and waits for its ack, so a stored-but-unacked record is always among its
    /// newest. Each costs Redis 8 bytes per device (1,368 B per device at 128, by `MEMORY USAGE`); at most 65,535.
    pub dedup_records: u32,
    /// A device's dedup window expires this long after its last stored record.
    pub dedup_ttl: Duration,
    /// `/livez` fails when an accept loop, the publisher or the runtime is silent this long.
    pub liveness_max_silence: Duration,
    /// How long a device has to answer a command before it is `failed: timeout` and the
    /// device's next command goes out. Teltonika devices answer within seconds; a minute
    /// leaves room for a slow link without holding a device's queue for long.
    pub command_response_timeout: Duration,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            redis_tls: RedisTlsFiles::default(),
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            pod_name: "trackgate-listener".to_owned(),
            reload_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(20),
            drain_delay: Duration::ZERO,
            publish_retry_for: Duration::from_secs(10),
            redis_timeout: Duration::from_secs(2),
            max_inflight_bytes: 64 * 1024 * 1024,
            dedup_records: 128,
            dedup_ttl: Duration::from_secs(7 * 24 * 3600),
            liveness_max_silence: Duration::from_secs(15),
            command_response_timeout: Duration::from_secs(60),
        }
    }
}

/// Overrides [`ListenerOptions::command_response_timeout`], in milliseconds.
pub const COMMAND_RESPONSE_TIMEOUT_ENV: &str = "TRACKGATE_COMMAND_RESPONSE_TIMEOUT_MS";

/// Redis URL used when `TRACKGATE_REDIS_URL` is unset.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

impl ListenerOptions {
    /// Defaults, with `redis_url` from `TRACKGATE_REDIS_URL`, `pod_name` from `POD_NAME`
    /// (or `HOSTNAME`) and the command response timeout from [`COMMAND_RESPONSE_TIMEOUT_ENV`]. Returns whether the Redis URL came from the environment.
    pub fn from_env() -> (Self, bool) {
        let mut options = Self::default();
        let from_env = match std::env::var(trackgate_api::shard_config::REDIS_URL_ENV) {
            Ok(url) if !url.is_empty() => {
                options.redis_url = url;
                true
            }
            _ => false,
        };
        let file = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        options.redis_tls = RedisTlsFiles {
            ca_file: file(trackgate_api::shard_config::REDIS_CA_FILE_ENV),
            client_cert_file: file(trackgate_api::shard_config::REDIS_CLIENT_CERT_FILE_ENV),
            client_key_file: file(trackgate_api::shard_config::REDIS_CLIENT_KEY_FILE_ENV),
        };
        if let Some(secs) = std::env::var(trackgate_api::shard_config::DRAIN_DELAY_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            options.drain_delay = Duration::from_secs(secs);
        }
        if let Some(pod) = ["POD_NAME", "HOSTNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        {
            options.pod_name = pod;
        }
        if let Some(ms) = std::env::var(COMMAND_RESPONSE_TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
        {
            options.command_response_timeout = Duration::from_millis(ms);
        }
        (options, from_env)
    }
}

/// Where a shard's config comes from.
#[derive(Clone, Debug)]
pub enum ShardSource {
    /// A `shard.json` file, watched for changes.
    File(PathBuf),
    /// A config in memory (never reloaded).
    Config(ShardConfig),
}

/// One bound device port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPort {
    /// Pool name.
    pub pool: String,
    /// Shard index.
    pub shard: u32,
    /// Configured port number.
    pub port: u16,
    /// Bound TCP address.
    pub tcp: SocketAddr,
    /// Bound UDP address, when the shard serves UDP.
    pub udp: Option<SocketAddr>,
}

/// A running listener: one or several shards sharing one Redis publisher, one metrics registry
/// and one [`Health`].
pub struct Listener {
    env: Arc<Env>,
    shards: Vec<Arc<Shard>>,
    session_stop: CancellationToken,
    publisher_stop: CancellationToken,
    publisher: Option<JoinHandle<()>>,
    shutdown_grace: Duration,
}

/// What accept loops and reloads need from the process.
struct Env {
    options: ListenerOptions,
    health: Health,
    metrics: Metrics,
    /// Cancelled at shutdown: accept loops, UDP loops and watchers stop.
    accept_stop: CancellationToken,
    /// Sessions and datagram tasks, awaited at shutdown.
    tracker: TaskTracker,
    freeze: watch::Sender<bool>,
}

impl Listener {
    /// Loads every shard config, binds every port and starts serving.
    ///
    /// # Errors
    /// A config that cannot be read or is invalid, a port that cannot be bound, a bad Redis
    /// URL, or metrics already registered on `registry`.
    pub async fn start(
        options: ListenerOptions,
        sources: Vec<ShardSource>,
        registry: &Registry,
        health: Health,
    ) -> Result<Self, StartError> {
        health.set_ready(CONFIG_READY, false);
        health.set_ready(PORTS_READY, false);
        let metrics = Metrics::register(registry)?;
        let mut configs = Vec::with_capacity(sources.len());
        for source in &sources {
            let (config, file) = match source {
                ShardSource::File(path) => {
                    let (config, text) = config::load(path)?;
                    (config, Some((path.clone(), text)))
                }
                ShardSource::Config(config) => {
                    config.validate().map_err(|source| StartError::Config {
                        origin: "inline".to_owned(),
                        source,
                    })?;
                    (config.clone(), None)
                }
            };
            let base = config::base_dir(file.as_ref().map(|(path, _)| path.as_path()));
            let loaded = Instant::now();
            let stamps = config::device_stamps(&config, &base);
            let devices = Arc::new(config::load_devices(&config, &base)?);
            if config.mode == IdentificationMode::Shared {
                info!(pool = %config.pool, devices = devices.len(), bytes = devices.heap_bytes(),
                    took = ?loaded.elapsed(), "admitted devices loaded");
            }
            configs.push((
                config,
                devices,
                file.map(|(path, text)| (path, text, stamps)),
            ));
        }
        for (i, (a, _, _)) in configs.iter().enumerate() {
            if configs[..i]
                .iter()
                .any(|(b, _, _)| a.pool == b.pool && a.shard == b.shard)
            {
                return Err(StartError::Conflict(format!("{}/{}", a.pool, a.shard)));
            }
        }
        health.set_ready(CONFIG_READY, true);

        let publisher_stop = CancellationToken::new();
        let (sink, publisher) = Sink::start(
            &SinkOptions {
                redis_url: options.redis_url.clone(),
                redis_tls: options.redis_tls.clone(),
                pod: options.pod_name.clone(),
                response_timeout: options.redis_timeout,
                max_inflight_bytes: options.max_inflight_bytes,
                dedup_records: options.dedup_records,
                dedup_ttl: options.dedup_ttl,
                heartbeat_max_silence: options.liveness_max_silence,
                durability: configs.iter().map(|(c, _, _)| c.redis.durability).collect(),
            },
            metrics.clone(),
            &health,
            publisher_stop.clone(),
        )?;
        let commands =
            match crate::redis_conn::single_client(&options.redis_url, &options.redis_tls)
                .map_err(StartError::RedisUrl)?
            {
                Some(client) => Some(
                    Commands::start(
                        client,
                        CommandOptions {
                            redis_timeout: options.redis_timeout,
                            owner: lease_owner(&options.pod_name),
                            response_timeout: options.command_response_timeout,
                        },
                        metrics.clone(),
                        publisher_stop.clone(),
                    )
                    .map_err(StartError::RedisUrl)?,
                ),
                None => {
                    warn!("commands to devices are not served on a Redis Cluster; data is");
                    None
                }
            };
        let env = Arc::new(Env {
            health: health.clone(),
            metrics: metrics.clone(),
            accept_stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            freeze: watch::Sender::new(false),
            options,
        });
        tokio::spawn(runtime_heartbeat(
            env.health
                .heartbeat("runtime", env.options.liveness_max_silence),
            env.accept_stop.clone(),
        ));
        let session_stop = CancellationToken::new();
        let mut listener = Listener {
            env: Arc::clone(&env),
            shards: Vec::new(),
            session_stop: session_stop.clone(),
            publisher_stop,
            publisher: Some(publisher),
            shutdown_grace: env.options.shutdown_grace,
        };
        for (config, devices, file) in configs {
            let shard = Shard::new(
                config.clone(),
                Arc::clone(&devices),
                sink.clone(),
                commands.clone(),
                &env,
                session_stop.clone(),
            );
            if let Err(err) = shard.apply(config, devices, &env).await {
                listener.abort();
                return Err(err);
            }
            if let Some((path, text, stamps)) = file {
                let seen = Seen { text, stamps };
                tokio::spawn(watch_file(path, seen, Arc::clone(&shard), Arc::clone(&env)));
            }
            listener.shards.push(shard);
        }
        health.set_ready(PORTS_READY, true);
        Ok(listener)
    }

    /// The shared health state (what `/livez` and `/readyz` report).
    pub fn health(&self) -> &Health {
        &self.env.health
    }

    /// Every port bound now, across shards, sorted by pool, shard and port.
    pub fn bound_ports(&self) -> Vec<BoundPort> {
        let mut out = Vec::new();
        for shard in &self.shards {
            for (port, handle) in lock(&shard.ports).iter() {
                out.push(BoundPort {
                    pool: shard.ctx.pool.clone(),
                    shard: shard.index,
                    port: *port,
                    tcp: handle.tcp,
                    udp: handle.udp.as_ref().map(|(addr, _)| *addr),
                });
            }
        }
        out
    }

    /// Test hook: stalls (or releases) every accept and UDP loop without stopping it, so a
    /// test can watch `/livez` fail the way a wedged loop would make it fail.
    #[doc(hidden)]
    pub fn freeze_accept_loops(&self, frozen: bool) {
        self.env.freeze.send_replace(frozen);
    }

    /// Graceful shutdown: stop accepting, let every session finish the frame it is storing
    /// (publish + ack) and close, then stop the publisher. Returns `true` when every session
    /// ended within the grace period.
    pub async fn shutdown(mut self) -> bool {
        self.env.accept_stop.cancel();
        self.session_stop.cancel();
        self.env.tracker.close();
        let clean = tokio::time::timeout(self.shutdown_grace, self.env.tracker.wait())
            .await
            .is_ok();
        if !clean {
            warn!(grace = ?self.shutdown_grace, "sessions still open after the grace period");
        }
        self.publisher_stop.cancel();
        if let Some(publisher) = self.publisher.take() {
            let _ = publisher.await;
        }
        info!(clean, "listener stopped");
        clean
    }

    fn abort(&self) {
        self.env.accept_stop.cancel();
        self.session_stop.cancel();
        self.publisher_stop.cancel();
    }
}

impl Drop for Listener {
    /// Dropped without [`Listener::shutdown`] (an error path, a failed test): ports are closed
    /// and sessions end at once rather than living on in the runtime.
    fn drop(&mut self) {
        self.abort();
    }
}

/// This process's name in device leases and as the command-stream consumer: the pod name and
/// the start time, so a restarted container (same pod name) is a new owner.
fn lease_owner(pod: &str) -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{pod}-{started:x}")
}

async fn runtime_heartbeat(heartbeat: Arc<Heartbeat>, stop: CancellationToken) {
    // A timer task on the shared runtime: it goes stale when no worker can run tasks.
    while tokio::time::timeout(BEAT_EVERY, stop.cancelled())
        .await
        .is_err()
    {
        heartbeat.beat();
    }
}

// === Shard ===

struct Shard {
    index: u32,
    ctx: Arc<ShardContext>,
    view: watch::Sender<Arc<ShardView>>,
    ports: Mutex<BTreeMap<u16, PortHandle>>,
    connections: Arc<Semaphore>,
    rate: Mutex<TokenBucket>,
    /// Whether the shard's devices were handed to the command side once (all of them then,
    /// the differences on reload).
    members_registered: std::sync::atomic::AtomicBool,
}

struct PortHandle {
    tcp: SocketAddr,
    stop: CancellationToken,
    udp: Option<(SocketAddr, CancellationToken)>,
}

impl Shard {
    fn new(
        config: ShardConfig,
        devices: Arc<ImeiSet>,
        sink: Sink,
        commands: Option<Commands>,
        env: &Env,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let limits = config.limits.clone();
        let index = config.shard;
        let (view, view_rx) = watch::channel(Arc::new(ShardView::new(config.clone(), devices)));
        Arc::new(Self {
            index,
            ctx: Arc::new(ShardContext {
                pool: config.pool.clone(),
                shard: index.to_string(),
                view: view_rx,
                sink,
                commands,
                metrics: env.metrics.clone(),
                stop,
                publish_retry_for: env.options.publish_retry_for,
            }),
            view,
            ports: Mutex::new(BTreeMap::new()),
            // NB: sized once at start; a reload that changes maxConnections applies on restart.
            connections: Arc::new(Semaphore::new(limits.max_connections as usize)),
            rate: Mutex::new(TokenBucket::new(limits.accept_rate_per_second)),
            members_registered: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes the bound ports match `config`: publish the new view (sessions re-check their
    /// device), close removed ports, bind new ones, start or stop UDP.
    async fn apply(
        self: &Arc<Self>,
        config: ShardConfig,
        devices: Arc<ImeiSet>,
        env: &Arc<Env>,
    ) -> Result<(), StartError> {
        if config.pool != self.ctx.pool || config.shard != self.index {
            warn!(pool = %config.pool, shard = config.shard, "a reload cannot rename the pool or shard; restart instead");
            return Ok(());
        }
        let view = Arc::new(ShardView::new(config, devices));
        let old = self.view.send_replace(Arc::clone(&view));
        if let Some(commands) = &self.ctx.commands {
            // The first apply registers every device; later ones the difference.
            let first = !self
                .members_registered
                .swap(true, std::sync::atomic::Ordering::Relaxed);
            let before = if first { Vec::new() } else { old.members() };
            let (mut added, mut removed) = member_changes(&before, &view.members());
            // Open admission: any IMEI is a member, written as one wildcard field.
            let was_open = !first && old.admits_any();
            match (was_open, view.admits_any()) {
                (false, true) => added.push(layout::ANY_MEMBER.to_owned()),
                (true, false) => removed.push(layout::ANY_MEMBER.to_owned()),
                _ => {}
            }
            commands.serve_shard(&view.keys.commands, self.index, added, removed);
        }
        let wanted: BTreeMap<u16, ()> = view.ports().map(|p| (p, ())).collect();
        let udp = view.config.udp;
        let mut to_bind = Vec::new();
        {
            let mut ports = lock(&self.ports);
            ports.retain(|port, handle| {
                let keep = wanted.contains_key(port);
                if !keep {
                    info!(port, "port removed from the config: closing");
                    handle.stop.cancel();
                    if let Some((_, stop)) = &handle.udp {
                        stop.cancel();
                    }
                }
                keep
            });
            for (port, handle) in ports.iter_mut() {
                if !udp && let Some((_, stop)) = handle.udp.take() {
                    stop.cancel();
                }
                if udp && handle.udp.is_none() {
                    to_bind.push((*port, false));
                }
            }
            for port in wanted.keys() {
                if !ports.contains_key(port) {
                    to_bind.push((*port, true));
                }
            }
        }
        // A port that cannot be bound (still in use) does not stop the others; the first error
        // is returned and the file watcher retries on its next tick.
        let mut first_error = None;
        for (port, tcp) in to_bind {
            let bound = match self.bind(port, tcp, udp, env).await {
                Ok(bound) => bound,
                Err(err) => {
                    warn!(%err, "binding a port of the shard config");
                    first_error.get_or_insert(err);
                    continue;
                }
            };
            let mut ports = lock(&self.ports);
            match (ports.get_mut(&port), bound) {
                (Some(handle), (None, udp)) => handle.udp = udp,
                (None, (Some((tcp, stop)), udp)) => {
                    ports.insert(port, PortHandle { tcp, stop, udp });
                }
                _ => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    #[allow(clippy::type_complexity)]
    async fn bind(
        self: &Arc<Self>,
        port: u16,
        tcp: bool,
        udp: bool,
        env: &Arc<Env>,
    ) -> Result<
        (
            Option<(SocketAddr, CancellationToken)>,
            Option<(SocketAddr, CancellationToken)>,
        ),
        StartError,
    > {
        let addr = SocketAddr::new(env.options.bind_ip, port);
        let mut tcp_bound = None;
        if tcp {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    proto: "tcp",
                    port,
                    source,
                })?;
            let local = listener.local_addr().unwrap_or(addr);
            let stop = env.accept_stop.child_token();
            let heartbeat = env.health.heartbeat(
                format!("accept:{}/{}:{port}", self.ctx.pool, self.index),
                env.options.liveness_max_silence,
            );
            tokio::spawn(accept_loop(
                listener,
                port,
                Arc::clone(self),
                Arc::clone(env),
                stop.clone(),
                heartbeat,
            ));
            info!(pool = %self.ctx.pool, shard = self.index, %local, "tcp port bound");
            tcp_bound = Some((local, stop));
        }
        let mut udp_bound = None;
        if udp {
            let socket = UdpSocket::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    proto: "udp",
                    port,
                    source,
                });
            let socket = match socket {
                Ok(socket) => socket,
                Err(err) => {
                    if let Some((_, stop)) = &tcp_bound {
                        stop.cancel();
                    }
                    return Err(err);
                }
            };
            let local = socket.local_addr().unwrap_or(addr);
            let stop = env.accept_stop.child_token();
            let heartbeat = env.health.heartbeat(
                format!("udp:{}/{}:{port}", self.ctx.pool, self.index),
                env.options.liveness_max_silence,
            );
            tokio::spawn(udp::serve(
                socket,
                port,
                Arc::clone(&self.ctx),
                stop.clone(),
                heartbeat,
                env.freeze.subscribe(),
                env.tracker.clone(),
            ));
            info!(pool = %self.ctx.pool, shard = self.index, %local, "udp port bound");
            udp_bound = Some((local, stop));
        }
        Ok((tcp_bound, udp_bound))
    }

    /// Applies the connection limits to an accepted socket and starts its session.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr, port: u16, env: &Env) {
        let labels = [self.ctx.pool.as_str(), self.ctx.shard.as_str()];
        let reject = |reason: &'static str| {
            env.metrics
                .connections_rejected
                .with_label_values(&[labels[0], labels[1], reason])
                .inc();
        };
        if !lock(&self.rate).try_take(Instant::now()) {
            reject("rate");
            return;
        }
        let Ok(permit) = Arc::clone(&self.connections).try_acquire_owned() else {
            reject("limit");
            return;
        };
        // Mobile links die without a FIN; keepalive finds the dead ones long before the idle
        // timeout would on a quiet device. Acks are 4 bytes and must leave at once.
        let keepalive = TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(15));
        let sock = SockRef::from(&stream);
        if let Err(err) = sock.set_tcp_keepalive(&keepalive) {
            warn!(%err, "setting TCP keepalive");
        }
        let _ = stream.set_nodelay(true);
        env.metrics
            .connections_accepted
            .with_label_values(&labels)
            .inc();
        let open = env.metrics.connections_open.with_label_values(&labels);
        open.inc();
        let ctx = Arc::clone(&self.ctx);
        env.tracker.spawn(async move {
            let _permit: OwnedSemaphorePermit = permit;
            session::run(stream, peer, port, ctx).await;
            open.dec();
        });
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: u16,
    shard: Arc<Shard>,
    env: Arc<Env>,
    stop: CancellationToken,
    heartbeat: Arc<Heartbeat>,
) {
    let mut freeze = env.freeze.subscribe();
    let mut tick = tokio::time::interval(BEAT_EVERY);
    loop {
        heartbeat.beat();
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
            Ok(()) = async { freeze.wait_for(|frozen| *frozen).await.map(|_| ()) } => {
                stall(&mut freeze, &stop).await;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => shard.admit(stream, peer, port, &env),
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning; the loop stays alive.
                    warn!(%err, port, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The test hook's stall: wait, without beating, until unfrozen or stopped.
pub(crate) async fn stall(freeze: &mut watch::Receiver<bool>, stop: &CancellationToken) {
    tokio::select! {
        _ = freeze.wait_for(|frozen| !*frozen) => {}
        () = stop.cancelled() => {}
    }
}

/// What the watcher last acted on: the config text and the stamps of its device files.
struct Seen {
    text: String,
    stamps: Vec<Option<FileStamp>>,
}

async fn watch_file(path: PathBuf, mut seen: Seen, shard: Arc<Shard>, env: Arc<Env>) {
    let base = config::base_dir(Some(&path));
    let mut tick = tokio::time::interval(env.options.reload_interval);
    loop {
        tokio::select! {
            () = env.accept_stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(err) => {
                warn!(path = %path.display(), %err, "shard config unreadable; keeping the current one");
                continue;
            }
        };
        let current = Arc::clone(&shard.view.borrow());
        if text == seen.text && config::device_stamps(&current.config, &base) == seen.stamps {
            continue;
        }
        let config = match ShardConfig::from_json(&text) {
            Ok(config) => config,
            Err(err) => {
                // Remembered, so a broken file is logged once, not every second.
                seen.text = text;
                warn!(path = %path.display(), %err, "invalid shard config; keeping the current one");
                continue;
            }
        };
        // Stamps first: a file that changes while it is read is read again on the next tick.
        let stamps = config::device_stamps(&config, &base);
        let same_devices = stamps == seen.stamps
            && config.mode == current.config.mode
            && config.devices == current.config.devices
            && config.device_files == current.config.device_files;
        let devices = if same_devices {
            Arc::clone(current.devices())
        } else {
            match load_devices_off_runtime(&config, &base).await {
                Ok(devices) => devices,
                Err(err) => {
                    seen = Seen { text, stamps };
                    warn!(%err, "device list unusable; keeping the current devices and config");
                    continue;
                }
            }
        };
        info!(path = %path.display(), ports = config.ports.len(), devices = devices.len(),
            "shard config or device list changed: reloading");
        let result = shard.apply(config, devices, &env).await;
        env.health.set_ready(PORTS_READY, result.is_ok());
        // A port that could not be bound is retried on the next tick.
        if result.is_ok() {
            seen = Seen { text, stamps };
        }
    }
}

/// A million-line device list takes a moment to parse: off the async workers, so sessions
/// keep being served meanwhile.
async fn load_devices_off_runtime(
    config: &ShardConfig,
    base: &std::path::Path,
) -> Result<Arc<ImeiSet>, StartError> {
    let (config, dir) = (config.clone(), base.to_owned());
    let started = Instant::now();
    let devices = tokio::task::spawn_blocking(move || config::load_devices(&config, &dir))
        .await
        // NB: only a panic in the parser (a bug) or runtime shutdown gets here.
        .map_err(|err| StartError::ReadDevices {
            path: base.to_owned(),
            source: std::io::Error::other(err.to_string()),
        })??;
    info!(devices = devices.len(), bytes = devices.heap_bytes(), took = ?started.elapsed(), "admitted devices loaded");
    Ok(Arc::new(devices))
}

// === Accept rate ===

/// Token bucket for `acceptRatePerSecond`, with a one-second burst.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    fn new(rate_per_second: u32) -> Self {
        let rate = f64::from(rate_per_second.max(1));
        Self {
            rate,
            tokens: rate,
            last: None,
        }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.rate);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Held for map updates only; a poisoned map is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What changed between two sorted member lists: (added, removed), as IMEI strings. A linear
/// merge: a shared pool's list can hold millions.
fn member_changes(before: &[u64], after: &[u64]) -> (Vec<String>, Vec<String>) {
    let name = |n: u64| trackgate_protocol::Imei::from_u64(n).map(|i| i.as_str().to_owned());
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (b.peek(), a.peek()) {
            (Some(&&x), Some(&&y)) if x == y => {
                b.next();
                a.next();
            }
            (Some(&&x), Some(&&y)) if x < y => {
                removed.extend(name(x));
                b.next();
            }
            (_, Some(&&y)) => {
                added.extend(name(y));
                a.next();
            }
            (Some(&&x), None) => {
                removed.extend(name(x));
                b.next();
            }
            (None, None) => break,
        }
    }
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2);
        let t0 = Instant::now();
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        assert!(bucket.try_take(t0 + Duration::from_millis(500)));
        assert!(!bucket.try_take(t0 + Duration::from_millis(500)));
    }
}
