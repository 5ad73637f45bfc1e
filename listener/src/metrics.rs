//! The listener's Prometheus metrics: STYLE.md's starter set, names written out in full.
//!
//! Labels are bounded: pool and shard (few per process), codec, and reasons from `&'static str`
//! sets. Never an IMEI, a port (in dedicated mode a port *is* a device) or a peer address.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Publish latency buckets: 0.5 ms to 2.5 s.
const PUBLISH_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Every listener metric, registered once per registry; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub(crate) connections_accepted: IntCounterVec,
    pub(crate) connections_open: IntGaugeVec,
    pub(crate) connections_rejected: IntCounterVec,
    pub(crate) logins: IntCounterVec,
    pub(crate) frames: IntCounterVec,
    pub(crate) records: IntCounterVec,
    pub(crate) duplicate_records: IntCounterVec,
    pub(crate) received_bytes: IntCounterVec,
    pub(crate) decode_errors: IntCounterVec,
    pub(crate) publish_duration: HistogramVec,
    pub(crate) publish_errors: IntCounterVec,
    pub(crate) ack_delay: HistogramVec,
    pub(crate) sessions_closed: IntCounterVec,
    pub(crate) inflight_bytes: IntGauge,
    pub(crate) events_dropped: IntCounterVec,
    pub(crate) commands: IntCounterVec,
    pub(crate) command_failures: IntCounterVec,
    pub(crate) command_response: HistogramVec,
    pub(crate) command_queue_depth: IntGaugeVec,
}

/// The metric names this crate registers (a golden list for tests and dashboards).
pub const METRIC_NAMES: &[&str] = &[
    "trackgate_listener_connections_accepted_total",
    "trackgate_listener_connections_open",
    "trackgate_listener_connections_rejected_total",
    "trackgate_listener_logins_total",
    "trackgate_listener_frames_total",
    "trackgate_listener_records_total",
    "trackgate_listener_duplicate_records_total",
    "trackgate_listener_received_bytes_total",
    "trackgate_listener_decode_errors_total",
    "trackgate_listener_publish_duration_seconds",
    "trackgate_listener_publish_errors_total",
    "trackgate_listener_ack_delay_seconds",
    "trackgate_listener_sessions_closed_total",
    "trackgate_listener_inflight_bytes",
    "trackgate_listener_events_dropped_total",
    "trackgate_listener_commands_total",
    "trackgate_listener_command_failures_total",
    "trackgate_listener_command_response_seconds",
    "trackgate_listener_command_queue_depth",
];

/// Command answer latency buckets: a device on a good link answers in well under a second, a
/// slow one in seconds; past a minute it has timed out.
const COMMAND_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    ///
    /// # Errors
    /// When a metric of the same name is already registered there.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(PUBLISH_BUCKETS.to_vec()),
                &["pool"],
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let connections_open = IntGaugeVec::new(
            Opts::new(
                "trackgate_listener_connections_open",
                "Device connections open now.",
            ),
            &["pool", "shard"],
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        let inflight_bytes = IntGauge::new(
            "trackgate_listener_inflight_bytes",
            "Bytes of received frames waiting for Redis (bounded by the in-flight cap).",
        )?;
        registry.register(Box::new(inflight_bytes.clone()))?;
        let command_response = HistogramVec::new(
            HistogramOpts::new(
                "trackgate_listener_command_response_seconds",
                "Command written to the device to its answer (or Codec 14 refusal) recorded.",
            )
            .buckets(COMMAND_BUCKETS.to_vec()),
            &["pool"],
        )?;
        registry.register(Box::new(command_response.clone()))?;
        let command_queue_depth = IntGaugeVec::new(
            Opts::new(
                "trackgate_listener_command_queue_depth",
                "Commands of the pool without a final status (queued or outstanding), as this listener last saw them in Redis.",
            ),
            &["pool"],
        )?;
        registry.register(Box::new(command_queue_depth.clone()))?;
        Ok(Self {
            connections_accepted: counter(
                "trackgate_listener_connections_accepted_total",
                "TCP connections accepted.",
                &["pool", "shard"],
            )?,
            connections_open,
            connections_rejected: counter(
                "trackgate_listener_connections_rejected_total",
                "TCP connections closed at once because of a limit (limit, rate).",
                &["pool", "shard", "reason"],
            )?,
            logins: counter(
                "trackgate_listener_logins_total",
                "Device logins by result (UDP datagrams count as logins too).",
                &["pool", "result"],
            )?,
            frames: counter(
                "trackgate_listener_frames_total",
                "Frames decoded after login, by codec.",
                &["pool", "codec"],
            )?,
            records: counter(
                "trackgate_listener_records_total",
                "AVL records stored and acked, by codec (duplicates included).",
                &["pool", "codec"],
            )?,
            duplicate_records: counter(
                "trackgate_listener_duplicate_records_total",
                "Acked records that Redis already held (a resend): not stored again.",
                &["pool"],
            )?,
            received_bytes: counter(
                "trackgate_listener_received_bytes_total",
                "Bytes read from devices (TCP and UDP).",
                &["pool"],
            )?,
            decode_errors: counter(
                "trackgate_listener_decode_errors_total",
                "Malformed logins, frames and datagrams, by reason.",
                &["pool", "reason"],
            )?,
            publish_duration: histogram(
                "trackgate_listener_publish_duration_seconds",
                "Time for Redis to store one frame's records (one attempt).",
            )?,
            publish_errors: counter(
                "trackgate_listener_publish_errors_total",
                "Failed attempts to store a frame's records, by reason.",
                &["pool", "reason"],
            )?,
            ack_delay: histogram(
                "trackgate_listener_ack_delay_seconds",
                "Frame fully read to ack written.",
            )?,
            sessions_closed: counter(
                "trackgate_listener_sessions_closed_total",
                "Device sessions closed, by reason.",
                &["pool", "reason"],
            )?,
            inflight_bytes,
            events_dropped: counter(
                "trackgate_listener_events_dropped_total",
                "Best-effort events and device-state updates dropped (queue full or Redis down).",
                &["pool"],
            )?,
            commands: counter(
                "trackgate_listener_commands_total",
                "Command status changes recorded by this listener, by status (queued, sent, answered, expired, failed).",
                &["pool", "status"],
            )?,
            command_failures: counter(
                "trackgate_listener_command_failures_total",
                "Commands failed, by reason (refused, timeout, malformed, too_large, unknown_imei).",
                &["pool", "reason"],
            )?,
            command_response,
            command_queue_depth,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::Collector;

    #[test]
    fn registers_the_golden_names_once() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        m.frames.with_label_values(&["p", "8"]).inc();
        m.connections_open.with_label_values(&["p", "0"]).set(1);
        m.publish_duration.with_label_values(&["p"]).observe(0.001);
        m.ack_delay.with_label_values(&["p"]).observe(0.001);
        m.command_response.with_label_values(&["p"]).observe(0.1);
        m.command_queue_depth.with_label_values(&["p"]).set(2);
        for c in [
            &m.connections_accepted,
            &m.frames,
            &m.records,
            &m.duplicate_records,
            &m.received_bytes,
            &m.decode_errors,
            &m.publish_errors,
            &m.sessions_closed,
            &m.logins,
            &m.events_dropped,
            &m.commands,
            &m.command_failures,
        ] {
            let labels: Vec<&str> = match c.desc()[0].variable_labels.len() {
                1 => vec!["p"],
                2 => vec!["p", "x"],
                _ => vec!["p", "0", "x"],
            };
            c.with_label_values(&labels).inc();
        }
        m.connections_rejected
            .with_label_values(&["p", "0", "limit"])
            .inc();
        let mut names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        names.sort();
        let mut golden: Vec<String> = METRIC_NAMES.iter().map(|s| (*s).to_owned()).collect();
        golden.sort();
        assert_eq!(names, golden);
        assert!(Metrics::register(&registry).is_err());
    }
}
