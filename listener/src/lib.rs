//! The trackgate listener: device sockets in, Redis Streams out, and an ack only for what
//! Redis has stored.
//!
//! ```text
//!  device ─TCP─► accept loop (limits) ─► session: login ─► frames ─► Sink ─► publisher ─► Redis
//!         ◄──────────────────────────── ack(n) ◄── only after every record is stored ◄──┘
//!  device ─UDP─► udp loop ─► datagram task ─► Sink … ─► udp_ack
//!  shard.json ─(poll)─► reload: bind new ports, close removed ones, re-check live sessions
//! ```
//!
//! What it is: [`Listener`] serves one or several shard configs in one process, sharing one
//! Redis publisher, one metrics registry and one [`trackgate_telemetry::Health`]; [`run`] is
//! the `trackgate listen` command around it and [`serve`] the same for several shards
//! (`trackgate run`): admin server, signals, graceful shutdown. What it is not: no
//! protocol parsing (that is `trackgate-protocol`), no Kubernetes client.
//!
//! Module map: `server` (accept loops, limits, reload, shutdown), `session` (one device),
//! `udp`, `sink` (the data path's Redis), `publisher`, `redis_conn`, `command` (commands to
//! devices, with their own Redis connections), `config`, `metrics`. The Redis layout (key names,
//! fields, fingerprint, store script) is [`trackgate_api::redis_layout`].
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod command;
mod config;
mod error;
mod metrics;
mod publisher;
mod redis_conn;
mod server;
mod session;
mod sink;
mod udp;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tracing::info;
use trackgate_telemetry::Health;

pub use config::load as load_shard_config;
pub use error::{CloseReason, PublishError, StartError};
pub use metrics::{METRIC_NAMES, Metrics};
pub use redis_conn::RedisTlsFiles;
pub use server::{
    BoundPort, COMMAND_RESPONSE_TIMEOUT_ENV, DEFAULT_REDIS_URL, Listener, ListenerOptions,
    ShardSource,
};
pub use sink::MAX_BATCH_CALLS;

/// `trackgate listen`: sets up logging, then [`serve`]s one shard config file.
///
/// # Errors
/// [`StartError`] when the config, a port, the admin address or the Redis URL is unusable.
pub async fn run(
    config: PathBuf,
    admin_addr: SocketAddr,
    bind_ip: std::net::IpAddr,
) -> Result<(), StartError> {
    trackgate_telemetry::init_logging(trackgate_telemetry::LogFormat::from_env());
    serve(vec![ShardSource::File(config)], admin_addr, Some(bind_ip)).await
}

/// Serves one or several shards in this process with an admin server (`/metrics` with
/// `trackgate_build_info`, `/livez`, `/readyz`) until SIGTERM or Ctrl-C, then shuts down
/// gracefully. Options come from the environment ([`ListenerOptions::from_env`]); `bind`
/// overrides the device ports' bind address (default `0.0.0.0`). This is `trackgate listen`
/// (one file) and `trackgate run` (a whole pool).
///
/// # Errors
/// [`StartError`] when a config, a port, the admin address or the Redis URL is unusable.
pub async fn serve(
    sources: Vec<ShardSource>,
    admin_addr: SocketAddr,
    bind: Option<IpAddr>,
) -> Result<(), StartError> {
    let (mut options, from_env) = ListenerOptions::from_env();
    if let Some(ip) = bind {
        options.bind_ip = ip;
    }
    if from_env {
        info!(
            "Redis URL from {}",
            trackgate_api::shard_config::REDIS_URL_ENV
        );
    } else {
        info!(
            url = DEFAULT_REDIS_URL,
            "{} is unset: using the default Redis URL",
            trackgate_api::shard_config::REDIS_URL_ENV
        );
    }
    let registry = Registry::new();
    trackgate_telemetry::register_build_info(&registry, env!("CARGO_PKG_VERSION"))?;
    let health = Health::new();
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(StartError::Admin)?;
    let drain_delay = options.drain_delay;
    let listener = Listener::start(options, sources, &registry, health.clone()).await?;
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(trackgate_telemetry::serve(
        admin,
        registry,
        health.clone(),
        admin_stop.clone().cancelled_owned(),
    ));
    info!(%admin_addr, ports = listener.bound_ports().len(), "listening");
    wait_for_signal().await.map_err(StartError::Admin)?;
    if !drain_delay.is_zero() {
        // the load balancer's health check sees /readyz fail and stops sending new devices;
        // until then a device that is sent here still gets in
        health.set_ready(DRAINING, false);
        info!(delay = ?drain_delay, "draining: /readyz fails, still accepting");
        tokio::time::sleep(drain_delay).await;
    }
    info!("shutting down: no new connections, finishing in-flight frames");
    listener.shutdown().await;
    admin_stop.cancel();
    let _ = admin_task.await;
    Ok(())
}

/// Readiness condition that fails from SIGTERM on.
pub const DRAINING: &str = "not-draining";

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok(()),
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c,
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
