//! `trackgate simulate`: simulated Teltonika or GT06 devices against a listener, a summary, and an
//! optional check that every acked record landed in Redis exactly once.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use trackgate_api::ShardConfig;
use trackgate_api::shard_config::REDIS_URL_ENV;
use trackgate_protocol::Codec;
use trackgate_protocol::gt06::UtcOffset;
use trackgate_simulator::{
    DeviceSettings, LoadConfig, Protocol, StreamLayout, Transport, run, targets_from_range,
    targets_from_shard, verify,
};

/// Codecs a simulated device can send.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CodecArg {
    /// Codec 8.
    #[value(name = "8")]
    C8,
    /// Codec 8 Extended.
    #[value(name = "8e")]
    C8e,
    /// Codec 16.
    #[value(name = "16")]
    C16,
}

impl From<CodecArg> for Codec {
    fn from(c: CodecArg) -> Self {
        match c {
            CodecArg::C8 => Codec::Codec8,
            CodecArg::C8e => Codec::Codec8Ext,
            CodecArg::C16 => Codec::Codec16,
        }
    }
}

/// Protocols a simulated device can speak.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProtocolArg {
    /// Teltonika (login, AVL frames acked with the record count).
    Teltonika,
    /// GT06 (login, locations, heartbeats).
    Gt06,
}

/// Simulate Teltonika or GT06 devices: login, frames, acks, resends, reconnects.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Take devices (ports and IMEIs), pool and Redis layout from this shard config.
    #[arg(long, value_name = "SHARD_JSON")]
    config: Option<PathBuf>,
    /// Listener host.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Without --config: the first device's port (device i uses port + i unless --shared-port).
    #[arg(long, default_value_t = 5000)]
    port: u16,
    /// Without --config: the first device's IMEI (device i has IMEI + i).
    #[arg(long, default_value_t = 356_307_042_441_013)]
    first_imei: u64,
    /// Without --config: number of devices.
    #[arg(long, visible_alias = "connections", default_value_t = 1)]
    devices: u32,
    /// Without --config: every device connects to --port (shared identification mode).
    #[arg(long)]
    shared_port: bool,
    /// Protocol the devices speak (default: the shard config's, else teltonika).
    #[arg(long, value_enum)]
    protocol: Option<ProtocolArg>,
    /// GT06: minutes east of UTC of the device clocks (default: the shard config's, else 0).
    #[arg(long, allow_hyphen_values = true)]
    utc_offset_minutes: Option<i16>,
    /// Codec of the AVL frames (Teltonika).
    #[arg(long, value_enum, default_value = "8e")]
    codec: CodecArg,
    /// Records per frame (1-255).
    #[arg(long, default_value_t = 1)]
    records_per_frame: u8,
    /// Records per second over all devices; 0 = each device sends as soon as it is acked.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Stop sending new records after this long (e.g. 30s, 500ms, 2m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many records over all devices.
    #[arg(long)]
    records: Option<u64>,
    /// Log in and send only keep-alives (the idle-connection benchmark).
    #[arg(long)]
    idle: bool,
    /// Send UDP datagrams instead of TCP sessions.
    #[arg(long)]
    udp: bool,
    /// Wait this long for a login reply or an ack before resending.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    response_timeout: Duration,
    /// Send a 0xFF keep-alive after this much silence.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    keepalive: Duration,
    /// First reconnect delay (doubles per failure, with jitter).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    backoff_min: Duration,
    /// Longest reconnect delay.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    backoff_max: Duration,
    /// After the stop, how long devices may keep trying to get their last frame acked.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    drain: Duration,
    /// Seed of the GPS tracks and jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Afterwards, check that every acked record is in Redis exactly once (exit 1 if not).
    #[arg(long)]
    verify: bool,
    /// Redis URL for --verify.
    #[arg(long, env = REDIS_URL_ENV)]
    redis_url: Option<String>,
    /// Pool name for --verify (default: from --config).
    #[arg(long)]
    pool: Option<String>,
    /// Stream key prefix for --verify (default: from --config, else "trackgate").
    #[arg(long)]
    prefix: Option<String>,
    /// Number of readings partitions for --verify (default: from --config, else 4).
    #[arg(long)]
    partitions: Option<u32>,
}

/// `10s`, `250ms`, `2m`, `1h` or plain seconds (`1.5`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s or 250ms"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// Runs the simulation; exits with an error when verification finds a loss or a duplicate.
pub fn run_simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let runtime = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    runtime.block_on(simulate(args))
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let shard = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let mut shard = ShardConfig::from_json(&text)
                .with_context(|| format!("parse {}", path.display()))?;
            // A shared pool's devices live in files beside the config, as the pod mounts them.
            let base = path.parent().unwrap_or(std::path::Path::new(""));
            for file in std::mem::take(&mut shard.device_files) {
                let list = base.join(&file);
                let text = std::fs::read_to_string(&list)
                    .with_context(|| format!("read {}", list.display()))?;
                trackgate_api::imei_list::parse(&text, |imei| shard.devices.push(imei.to_string()))
                    .with_context(|| format!("parse {}", list.display()))?;
            }
            Some(shard)
        }
        None => None,
    };
    let targets = match &shard {
        Some(shard) => targets_from_shard(shard, args.host)?,
        None => targets_from_range(
            args.host,
            args.port,
            args.first_imei,
            args.devices,
            args.shared_port,
        )?,
    };
    let imeis: Vec<_> = targets.iter().map(|t| t.imei).collect();

    let layout = if args.verify {
        let Some(url) = args.redis_url.clone() else {
            bail!("--verify needs --redis-url or {REDIS_URL_ENV}");
        };
        let pool = args
            .pool
            .clone()
            .or_else(|| shard.as_ref().map(|s| s.pool.clone()))
            .context("--verify needs --pool (or --config)")?;
        let sink = shard.as_ref().map(|s| s.redis.clone()).unwrap_or_default();
        Some(StreamLayout {
            url,
            pool,
            prefix: args.prefix.clone().unwrap_or(sink.stream_prefix),
            partitions: args.partitions.unwrap_or(sink.partitions),
        })
    } else {
        None
    };

    let mut config = LoadConfig::new(targets);
    config.transport = if args.udp {
        Transport::Udp
    } else {
        Transport::Tcp
    };
    let gt06 = match args.protocol {
        Some(protocol) => matches!(protocol, ProtocolArg::Gt06),
        None => shard
            .as_ref()
            .is_some_and(|s| s.protocol == trackgate_api::shard_config::Protocol::Gt06),
    };
    let protocol = if gt06 {
        let minutes = args
            .utc_offset_minutes
            .or_else(|| shard.as_ref().map(|s| s.gt06.utc_offset_minutes))
            .unwrap_or(0);
        let utc_offset = UtcOffset::from_minutes(minutes)
            .with_context(|| format!("--utc-offset-minutes {minutes}: -840 to 840"))?;
        if args.udp {
            bail!("GT06 devices speak TCP only");
        }
        Protocol::Gt06 { utc_offset }
    } else {
        Protocol::Teltonika
    };
    config.device = DeviceSettings {
        protocol,
        codec: args.codec.into(),
        records_per_frame: args.records_per_frame,
        frame_interval: None,
        response_timeout: args.response_timeout,
        keepalive_interval: args.keepalive,
        idle: args.idle,
        keep_acked: args.verify,
        ..DeviceSettings::default()
    };
    config.rate = (args.rate > 0.0).then_some(args.rate);
    config.duration = args.duration;
    config.records = args.records;
    if config.duration.is_none() && config.records.is_none() {
        config.duration = Some(Duration::from_secs(10));
    }
    config.drain_timeout = args.drain;
    config.backoff_min = args.backoff_min;
    config.backoff_max = args.backoff_max;
    config.seed = args.seed;

    let outcome = run(config).await?;
    if !args.json {
        crate::print_stdout(&outcome.report.to_string())?;
    }
    let verification = match &layout {
        Some(layout) => Some(verify(layout, &outcome.acked, &imeis).await?),
        None => None,
    };
    if args.json {
        let json = serde_json::json!({ "report": outcome.report, "verification": verification });
        crate::print_stdout(&format!("{}\n", serde_json::to_string_pretty(&json)?))?;
    } else if let Some(v) = &verification {
        crate::print_stdout(&format!("{v}\n"))?;
    }
    if let Some(v) = verification
        && !v.is_ok()
    {
        bail!(
            "verification failed: {} missing, {} duplicated, {} malformed",
            v.missing,
            v.duplicated,
            v.malformed
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
