//! Errors of the listener library. Each one that reaches a metric has `reason()`.

use std::path::PathBuf;

/// Why the listener could not start (or a shard could not be added).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The shard config file could not be read.
    #[error("reading shard config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The shard config is invalid.
    #[error("shard config {origin}: {source}")]
    Config {
        /// The file, or `inline` for a config given in memory.
        origin: String,
        /// What is wrong with it.
        source: trackgate_api::shard_config::ShardConfigError,
    },
    /// A device list file (`deviceFiles`) could not be read.
    #[error("reading device list {path}: {source}")]
    ReadDevices {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A device list file holds a line that is not an IMEI.
    #[error("device list {path}: {source}")]
    Devices {
        /// The file.
        path: PathBuf,
        /// The line.
        source: trackgate_api::imei_list::ImeiLineError,
    },
    /// A port could not be bound.
    #[error("binding {proto} port {port}: {source}")]
    Bind {
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The port.
        port: u16,
        /// The IO error.
        source: std::io::Error,
    },
    /// The admin address could not be bound or served.
    #[error("admin server: {0}")]
    Admin(std::io::Error),
    /// The metrics could not be registered (a second listener on the same registry).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Redis URL is invalid.
    #[error("redis URL: {0}")]
    RedisUrl(redis::RedisError),
    /// Two shard configs in one process name the same pool and shard, or the same port.
    #[error("shard {0} is configured twice or shares a port with another shard")]
    Conflict(String),
}

/// Why storing a frame's records failed (one attempt).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishError {
    /// Redis did not answer within the response timeout.
    #[error("redis timed out")]
    Timeout,
    /// Redis is unreachable or the connection broke.
    #[error("redis connection: {0}")]
    Connection(String),
    /// Redis answered with an error.
    #[error("redis error: {0}")]
    Server(String),
    /// The records are stored but the pool's durability wait (`WAIT`/`WAITAOF`) failed or
    /// timed out: not acked, the device resends and dedup absorbs the copy.
    #[error("durability not reached: {0}")]
    Durability(String),
    /// The publisher task has stopped (shutdown).
    #[error("publisher stopped")]
    Stopped,
}

impl PublishError {
    /// A bounded label for `trackgate_listener_publish_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Timeout => "timeout",
            PublishError::Connection(_) => "connection",
            PublishError::Server(_) => "server",
            PublishError::Durability(_) => "durability",
            PublishError::Stopped => "stopped",
        }
    }

    pub(crate) fn from_redis(err: &redis::RedisError) -> Self {
        if err.is_timeout() {
            PublishError::Timeout
        } else if err.is_io_error() || err.is_connection_dropped() || err.is_unrecoverable_error() {
            PublishError::Connection(err.to_string())
        } else {
            PublishError::Server(err.to_string())
        }
    }
}

/// Why a session ended: the `reason` label of `trackgate_listener_sessions_closed_total` and
/// the `reason` field of the disconnect event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The device closed the connection.
    PeerClosed,
    /// No bytes for the idle timeout.
    IdleTimeout,
    /// No login within the login timeout.
    LoginTimeout,
    /// The login IMEI was refused (unknown, or another device's port).
    LoginRefused,
    /// A malformed login or frame.
    Malformed,
    /// Redis did not store a frame within the retry bound; the device will resend.
    PublishFailed,
    /// A reload removed the device or its port.
    ConfigRemoved,
    /// The listener is shutting down.
    Shutdown,
    /// A socket error.
    Io,
}

impl CloseReason {
    /// The bounded label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::LoginTimeout => "login_timeout",
            CloseReason::LoginRefused => "login_refused",
            CloseReason::Malformed => "malformed",
            CloseReason::PublishFailed => "publish_failed",
            CloseReason::ConfigRemoved => "config_removed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Io => "io_error",
        }
    }
}
