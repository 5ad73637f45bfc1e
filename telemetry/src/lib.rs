//! Admin endpoints, progress heartbeats and log set-up, shared by the listener and the operator.
//!
//! ```text
//!  accept loop ──beat──┐
//!  publisher   ──beat──┤  Health ──► GET /livez   200 | 503 "stale: publisher (12s)"
//!  runtime     ──beat──┘         ──► GET /readyz  200 | 503 "not ready: redis"
//!  prometheus::Registry ─────────► GET /metrics  text format 0.0.4
//! ```
//!
//! Liveness is built from heartbeats, not from "the HTTP server answers": a worker whose accept
//! loop or publisher has silently stopped is exactly the failure trackgate exists to end, and
//! only a stale heartbeat reveals it to the kubelet.

mod admin;
mod health;
mod logging;

pub use admin::{AdminError, serve};
pub use health::{Health, Heartbeat};
pub use logging::{LogFormat, init_logging};

/// Registers `trackgate_build_info{version} 1` on `registry`.
///
/// # Errors
/// When a metric of that name is already registered.
pub fn register_build_info(
    registry: &prometheus::Registry,
    version: &str,
) -> prometheus::Result<()> {
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "trackgate_build_info",
            "Build of the running trackgate binary.",
        ),
        &["version"],
    )?;
    info.with_label_values(&[version]).set(1);
    registry.register(Box::new(info))
}
