//! Log set-up: JSON in a cluster (for log pipelines), compact on a terminal.

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable single lines.
    Compact,
}

impl LogFormat {
    /// `TRACKGATE_LOG_FORMAT=json|compact` when set; otherwise JSON inside Kubernetes (where
    /// `KUBERNETES_SERVICE_HOST` is always set) and compact elsewhere.
    pub fn from_env() -> Self {
        match std::env::var("TRACKGATE_LOG_FORMAT").as_deref() {
            Ok("json") => Self::Json,
            Ok("compact") => Self::Compact,
            _ if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Self::Json,
            _ => Self::Compact,
        }
    }
}

/// Installs the global subscriber; the filter comes from `RUST_LOG` (default `info`). Logs go
/// to stderr so that commands printing data on stdout (`decode`, `crd`) stay pipeable. A second
/// call is a no-op, so tests may call it freely.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Compact => builder.compact().try_init(),
    };
}
