//! The load runner: many devices at once, each reconnecting with backoff, paced to a total
//! record rate, for a duration or a number of records.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use trackgate_api::{IdentificationMode, ShardConfig};
use trackgate_protocol::{Codec, FrameError, Imei, UdpDatagram, encode_udp, udp_ack};

use crate::device::{Device, DeviceSettings, SessionError};
use crate::report::{AckedLog, LoadReport};
use crate::stats::Stats;
use crate::track::SplitMix64;

// === Configuration ===

/// One device to simulate: where it connects and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The listener port it talks to.
    pub addr: SocketAddr,
    /// Its IMEI.
    pub imei: Imei,
}

/// TCP sessions (the normal case) or UDP datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Login, then frames acked with a 4-byte count.
    #[default]
    Tcp,
    /// One datagram per packet, acked with the 7-byte UDP ack.
    Udp,
}

impl Transport {
    /// `"tcp"` or `"udp"`.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The devices.
    pub targets: Vec<Target>,
    /// TCP or UDP.
    pub transport: Transport,
    /// How each device behaves. `frame_interval` is derived from `rate` by [`run`].
    pub device: DeviceSettings,
    /// Records per second over all devices; `None` = each device sends its next frame as soon
    /// as the previous one is acked.
    pub rate: Option<f64>,
    /// Stop generating new records after this long (pending packets are still finished).
    pub duration: Option<Duration>,
    /// Total records to send over all devices (split evenly).
    pub records: Option<u64>,
    /// How long devices may keep trying to get their last packet acked after the stop.
    pub drain_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// First reconnect delay; it doubles per failed attempt up to `backoff_max`, with full
    /// jitter so that a whole fleet does not reconnect in lockstep after an outage.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Seed of every track and jitter.
    pub seed: u64,
    /// Device time of the first record (ms since the epoch); defaults to now, so that two runs
    /// into the same Redis never produce the same records.
    pub start_ms: Option<u64>,
}

impl LoadConfig {
    /// Defaults for these targets: TCP, Codec 8E, one record per frame, one frame per device
    /// per second, ten seconds.
    pub fn new(targets: Vec<Target>) -> Self {
        Self {
            targets,
            transport: Transport::Tcp,
            device: DeviceSettings::default(),
            rate: None,
            duration: Some(Duration::from_secs(10)),
            records: None,
            drain_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            seed: 1,
            start_ms: None,
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No devices to simulate.
    #[error("no devices to simulate")]
    NoDevices,
    /// Neither a duration nor a record count bounds the run.
    #[error("give a duration or a number of records")]
    Unbounded,
    /// A device IMEI is not 15 digits.
    #[error("invalid IMEI {imei:?}: {source}")]
    Imei {
        /// The text.
        imei: String,
        /// Why.
        source: FrameError,
    },
    /// The shard config has no address to connect to for a device.
    #[error("shard config lists no port")]
    NoPorts,
    /// `records_per_frame` must be 1..=255.
    #[error("records per frame must be between 1 and 255")]
    RecordsPerFrame,
    /// Only AVL codecs carry records.
    #[error("codec {0} does not carry AVL records")]
    NotAvl(Codec),
}

impl LoadError {
    /// A short, bounded name.
    pub fn reason(&self) -> &'static str {
        match self {
            LoadError::NoDevices => "no_devices",
            LoadError::Unbounded => "unbounded",
            LoadError::Imei { .. } => "imei",
            LoadError::NoPorts => "no_ports",
            LoadError::RecordsPerFrame => "records_per_frame",
            LoadError::NotAvl(_) => "not_avl",
        }
    }
}

/// The devices of a shard config on `host`: in dedicated mode each port's owner on its port;
/// in shared mode every admitted IMEI, spread round-robin over the ports.
///
/// # Errors
/// [`LoadError::Imei`] for a malformed IMEI, [`LoadError::NoPorts`] for a config without ports.
pub fn targets_from_shard(
    config: &ShardConfig,
    host: std::net::IpAddr,
) -> Result<Vec<Target>, LoadError> {
    let parse = |imei: &str| {
        Imei::parse(imei).map_err(|source| LoadError::Imei {
            imei: imei.to_owned(),
            source,
        })
    };
    match config.mode {
        IdentificationMode::Dedicated => config
            .ports
            .iter()
            .filter_map(|b| b.imei.as_deref().map(|imei| (b.port, imei)))
            .map(|(port, imei)| {
                Ok(Target {
                    addr: SocketAddr::new(host, port),
                    imei: parse(imei)?,
                })
            })
            .collect(),
        IdentificationMode::Shared => {
            if config.ports.is_empty() {
                return Err(LoadError::NoPorts);
            }
            config
                .devices
                .iter()
                .zip(config.ports.iter().cycle())
                .map(|(imei, binding)| {
                    Ok(Target {
                        addr: SocketAddr::new(host, binding.port),
                        imei: parse(imei)?,
                    })
                })
                .collect()
        }
    }
}

/// `count` devices with consecutive IMEIs from `first_imei`: on consecutive ports from
/// `first_port` (dedicated), or all on `first_port` (`shared_port`).
///
/// # Errors
/// [`LoadError::Imei`] when an IMEI would not be 15 digits.
pub fn targets_from_range(
    host: std::net::IpAddr,
    first_port: u16,
    first_imei: u64,
    count: u32,
    shared_port: bool,
) -> Result<Vec<Target>, LoadError> {
    (0..count)
        .map(|i| {
            let port = if shared_port {
                first_port
            } else {
                first_port.wrapping_add(i as u16)
            };
            let text = format!("{:015}", first_imei + u64::from(i));
            let imei =
                Imei::parse(&text).map_err(|source| LoadError::Imei { imei: text, source })?;
            Ok(Target {
                addr: SocketAddr::new(host, port),
                imei,
            })
        })
        .collect()
}

// === Run ===

/// What a run produced.
#[derive(Debug)]
pub struct LoadOutcome {
    /// The summary.
    pub report: LoadReport,
    /// Every acked record (empty unless `device.keep_acked`).
    pub acked: AckedLog,
    /// When the run started (ack times in [`AckedLog`] count from here).
    pub started: Instant,
}

/// Runs the load until its duration or record budget is used up and every device has
/// finished (or given up on) its last packet.
///
/// # Errors
/// [`LoadError`] when the configuration cannot run; network trouble is counted, not returned.
pub async fn run(config: LoadConfig) -> Result<LoadOutcome, LoadError> {
    run_with_stats(config, Arc::new(Stats::new())).await
}

/// [`run`] with counters the caller can watch while it runs (e.g. [`Stats::connected`]).
///
/// # Errors
/// As [`run`].
pub async fn run_with_stats(
    mut config: LoadConfig,
    stats: Arc<Stats>,
) -> Result<LoadOutcome, LoadError> {
    let n = config.targets.len();
    if n == 0 {
        return Err(LoadError::NoDevices);
    }
    if config.duration.is_none() && config.records.is_none() {
        return Err(LoadError::Unbounded);
    }
    if config.device.records_per_frame == 0 {
        return Err(LoadError::RecordsPerFrame);
    }
    if !config.device.codec.is_avl() {
        return Err(LoadError::NotAvl(config.device.codec));
    }
    let per_frame = f64::from(config.device.records_per_frame);
    config.device.frame_interval = match config.rate {
        Some(rate) if rate > 0.0 => Some(Duration::from_secs_f64(n as f64 * per_frame / rate)),
        _ => None,
    };
    let started_unix_ms = now_ms();
    let start_ms = config.start_ms.unwrap_or(started_unix_ms);
    let settings = Arc::new(config.device.clone());
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let config = Arc::new(config);
    let started = stats.started();

    let mut jitter = SplitMix64::new(config.seed);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, target) in config.targets.iter().enumerate() {
        let records = match config.records {
            Some(total) => total / n as u64 + u64::from((i as u64) < total % n as u64),
            None => u64::MAX,
        };
        // Spread first frames over one interval so devices do not send in lockstep.
        let offset = settings
            .frame_interval
            .map(|iv| iv.mul_f64(jitter.next_f64()))
            .unwrap_or_default();
        let device = Device::new(
            target.imei,
            i as u64,
            config.seed,
            start_ms,
            records,
            settings.clone(),
            Instant::now() + offset,
        );
        let ctx = DeviceCtx {
            addr: target.addr,
            config: config.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            abort: abort.clone(),
            rng: SplitMix64::new(config.seed ^ (i as u64).wrapping_mul(0x9E37_79B9)),
        };
        match config.transport {
            Transport::Tcp => tasks.spawn(run_tcp_device(device, ctx)),
            Transport::Udp => tasks.spawn(run_udp_device(device, ctx)),
        };
    }

    let all_connected = tokio::spawn(watch_all_connected(stats.clone(), n as u64, abort.clone()));
    let deadline = config.duration.map(|d| started + d);
    let drain_timeout = config.drain_timeout;
    let timer = {
        let (stop, abort) = (stop.clone(), abort.clone());
        tokio::spawn(async move {
            if let Some(deadline) = deadline {
                sleep_until(deadline).await;
                stop.cancel();
                sleep(drain_timeout).await;
                abort.cancel();
            }
        })
    };

    let mut acked = Vec::new();
    let mut abandoned = 0;
    while let Some(joined) = tasks.join_next().await {
        let Ok(mut device) = joined else {
            continue;
        };
        abandoned += device
            .pending
            .as_ref()
            .map_or(0, |p| p.packet.records.len() as u64);
        acked.append(&mut device.acked);
    }
    let elapsed = started.elapsed();
    timer.abort();
    abort.cancel();
    let all_connected_at = all_connected.await.unwrap_or_default();

    let report = LoadReport::new(
        &config,
        stats.report_counts(),
        elapsed,
        abandoned,
        all_connected_at,
    );
    Ok(LoadOutcome {
        report,
        acked: AckedLog::new(acked, started_unix_ms),
        started,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Samples the connected gauge and notes every moment it reaches `n` again (first login of
/// the fleet, and each full re-login after the listener restarts).
async fn watch_all_connected(stats: Arc<Stats>, n: u64, abort: CancellationToken) -> Vec<Duration> {
    let mut moments = Vec::new();
    let mut all = false;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = abort.cancelled() => return moments,
            _ = tick.tick() => {}
        }
        let now_all = stats.connected() >= n;
        if now_all && !all {
            let at = stats.since_start();
            tracing::info!(
                devices = n,
                at_seconds = at.as_secs_f64(),
                "all devices logged in"
            );
            moments.push(at);
        }
        all = now_all;
    }
}

struct DeviceCtx {
    addr: SocketAddr,
    config: Arc<LoadConfig>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    abort: CancellationToken,
    rng: SplitMix64,
}

impl DeviceCtx {
    /// Full-jitter exponential backoff for the `attempt`-th failure in a row.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let cap = self
            .config
            .backoff_min
            .saturating_mul(1 << attempt.min(16))
            .min(self.config.backoff_max);
        cap.mul_f64(0.5 + 0.5 * self.rng.next_f64())
    }

    /// Sleeps, unless the run is aborted first; false when aborted.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.abort.cancelled() => false,
            _ = sleep(delay) => true,
        }
    }
}

// === TCP device ===

async fn run_tcp_device(mut device: Device, mut ctx: DeviceCtx) -> Device {
    let mut failures = 0u32;
    while !device.is_finished(&ctx.stop) {
        let session = async {
            let stream =
                match timeout(ctx.config.connect_timeout, TcpStream::connect(ctx.addr)).await {
                    Err(_) => return Err(SessionError::ConnectTimeout),
                    Ok(Err(e)) => return Err(SessionError::Connect(e)),
                    Ok(Ok(stream)) => stream,
                };
            let _ = stream.set_nodelay(true);
            device.run_session(stream, &ctx.stats, &ctx.stop).await
        };
        let result = tokio::select! {
            _ = ctx.abort.cancelled() => break,
            result = session => result,
        };
        match result {
            Ok(()) => break,
            Err(err) => {
                tracing::debug!(imei = %device.imei, reason = err.reason(), %err, "session ended");
                ctx.stats.on_error(err.reason());
                failures = if device.logged_in { 1 } else { failures + 1 };
                let delay = ctx.backoff(failures);
                if !ctx.pause(delay).await {
                    break;
                }
            }
        }
    }
    device
}

// === UDP device ===

/// Why a UDP exchange failed (counted like session errors).
fn udp_reason(err: &std::io::Error) -> &'static str {
    match err.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect",
        _ => "io",
    }
}

async fn run_udp_device(mut device: Device, mut ctx: DeviceCtx) -> Device {
    let bind: SocketAddr = if ctx.addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let socket = match UdpSocket::bind(bind).await {
        Ok(s) if s.connect(ctx.addr).await.is_ok() => s,
        _ => {
            ctx.stats.on_error("io");
            return device;
        }
    };
    let mut packet_id = ctx.rng.next_u64() as u16;
    let mut avl_packet_id = 0u8;
    let mut failures = 0u32;
    let mut buf = vec![0u8; 64];
    let response_timeout = device.settings().response_timeout;

    while !device.is_finished(&ctx.stop) {
        if device.pending.is_none() {
            let due = device.next_frame_at().unwrap_or_else(Instant::now);
            tokio::select! {
                _ = ctx.abort.cancelled() => break,
                _ = ctx.stop.cancelled(), if !ctx.stop.is_cancelled() => continue,
                _ = sleep_until(due) => {}
            }
            if let Err(err) = device.next_packet() {
                ctx.stats.on_error(SessionError::from(err).reason());
                break;
            }
        }
        let Some(pending) = device.pending.as_mut() else {
            continue;
        };
        let count = pending.packet.records.len() as u8;
        let datagram = UdpDatagram {
            packet_id,
            avl_packet_id,
            imei: device.imei,
            packet: pending.packet.clone(),
        };
        let mut out = BytesMut::new();
        if let Err(err) = encode_udp(&datagram, &mut out) {
            ctx.stats.on_error(SessionError::from(err).reason());
            break;
        }
        pending.mark_sent(&ctx.stats);
        let sent_at = Instant::now();
        if let Err(err) = socket.send(&out).await {
            ctx.stats.on_error(udp_reason(&err));
        } else {
            ctx.stats.on_frame_sent();
            let expected = udp_ack(packet_id, avl_packet_id, count);
            let reply = tokio::select! {
                _ = ctx.abort.cancelled() => break,
                reply = timeout(response_timeout, socket.recv(&mut buf)) => reply,
            };
            match reply {
                Ok(Ok(n)) if buf[..n] == expected => {
                    ctx.stats.on_latency(sent_at.elapsed());
                    device.ack_pending(&ctx.stats);
                    packet_id = packet_id.wrapping_add(1);
                    avl_packet_id = avl_packet_id.wrapping_add(1);
                    failures = 0;
                    continue;
                }
                Ok(Ok(_)) => ctx.stats.on_wrong_ack(),
                Ok(Err(err)) => ctx.stats.on_error(udp_reason(&err)),
                Err(_) => ctx.stats.on_error("ack_timeout"),
            }
        }
        // No (or a wrong) ack: the same datagram goes out again after a pause.
        failures += 1;
        let delay = ctx.backoff(failures);
        if !ctx.pause(delay).await {
            break;
        }
    }
    device
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use trackgate_api::{ListenerLimits, PortBinding, RedisSink};

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn range_targets_count_up_ports_and_imeis() {
        let t = targets_from_range(LOCAL, 5000, 356307042441013, 3, false).unwrap();
        assert_eq!(t[2].addr.port(), 5002);
        assert_eq!(t[2].imei.as_str(), "356307042441015");
        let shared = targets_from_range(LOCAL, 5000, 1, 2, true).unwrap();
        assert_eq!(shared[1].addr.port(), 5000);
        assert_eq!(shared[1].imei.as_str(), "000000000000002");
    }

    #[test]
    fn shard_targets_follow_the_mode() {
        let mut cfg = ShardConfig {
            pool: "p".into(),
            shard: 0,
            mode: IdentificationMode::Shared,
            protocol: Default::default(),
            gt06: Default::default(),
            ports: vec![
                PortBinding {
                    port: 7000,
                    imei: None,
                },
                PortBinding {
                    port: 7001,
                    imei: None,
                },
            ],
            devices: vec![
                "356307042441013".into(),
                "356307042441014".into(),
                "356307042441015".into(),
            ],
            device_files: vec![],
            admission: Default::default(),
            udp: false,
            limits: ListenerLimits::default(),
            redis: RedisSink::default(),
        };
        let ports: Vec<u16> = targets_from_shard(&cfg, LOCAL)
            .unwrap()
            .iter()
            .map(|t| t.addr.port())
            .collect();
        assert_eq!(ports, vec![7000, 7001, 7000]);

        cfg.mode = IdentificationMode::Dedicated;
        cfg.ports[0].imei = Some("356307042441013".into());
        cfg.ports[1].imei = Some("12".into());
        assert!(matches!(
            targets_from_shard(&cfg, LOCAL),
            Err(LoadError::Imei { .. })
        ));
    }

    #[tokio::test]
    async fn unreachable_listener_is_counted_and_the_run_still_ends() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = LoadConfig::new(targets_from_range(LOCAL, port, 1, 2, true).unwrap());
        config.duration = Some(Duration::from_millis(300));
        config.drain_timeout = Duration::from_millis(200);
        config.rate = Some(100.0);
        let outcome = run(config).await.unwrap();
        let report = outcome.report;
        assert_eq!(report.counts.records_acked, 0);
        assert!(
            report.counts.errors.get("connect").copied().unwrap_or(0) >= 2,
            "{report:?}"
        );
    }
}
