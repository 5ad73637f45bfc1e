//! Operator metrics (`trackgate_operator_*`). Labels are bounded: the controller name, a pool
//! name (a cluster has few pools), and `&'static str` reasons and states.

use std::time::Instant;

use prometheus::core::Collector;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The only controller of this binary, as a label value.
pub const CONTROLLER: &str = "trackerportpool";

/// Every operator metric.
#[derive(Clone)]
pub struct Metrics {
    /// `trackgate_operator_reconcile_duration_seconds{controller}`.
    pub reconcile_duration: HistogramVec,
    /// `trackgate_operator_reconciles_total{controller}`.
    pub reconciles: IntCounterVec,
    /// `trackgate_operator_reconcile_errors_total{controller,reason}`.
    pub reconcile_errors: IntCounterVec,
    /// `trackgate_operator_pool_devices{pool,state}`, state ∈ {allocated, unallocated}.
    pub pool_devices: IntGaugeVec,
    /// `trackgate_operator_pool_ports{pool,state}`, state ∈ {allocated, free}.
    pub pool_ports: IntGaugeVec,
    /// `trackgate_operator_writes_total{verb}`, verb ∈ {create, apply, patch, delete, status, event}.
    pub writes: IntCounterVec,
    /// `trackgate_operator_leader`: 1 while this replica holds the lease.
    pub leader: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics.
    ///
    /// # Errors
    /// When a name is already registered on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            reconcile_duration: HistogramVec::new(
                HistogramOpts::new(
                    "trackgate_operator_reconcile_duration_seconds",
                    "Time of one reconcile of a TrackerPortPool.",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["controller"],
            )?,
            reconciles: IntCounterVec::new(
                Opts::new("trackgate_operator_reconciles_total", "Reconciles started."),
                &["controller"],
            )?,
            reconcile_errors: IntCounterVec::new(
                Opts::new(
                    "trackgate_operator_reconcile_errors_total",
                    "Reconciles that failed, by reason.",
                ),
                &["controller", "reason"],
            )?,
            pool_devices: IntGaugeVec::new(
                Opts::new(
                    "trackgate_operator_pool_devices",
                    "Devices of a pool, by allocation state.",
                ),
                &["pool", "state"],
            )?,
            pool_ports: IntGaugeVec::new(
                Opts::new(
                    "trackgate_operator_pool_ports",
                    "Allocatable ports of a pool, by state.",
                ),
                &["pool", "state"],
            )?,
            writes: IntCounterVec::new(
                Opts::new(
                    "trackgate_operator_writes_total",
                    "Writes to the Kubernetes API, by verb.",
                ),
                &["verb"],
            )?,
            leader: IntGauge::new(
                "trackgate_operator_leader",
                "1 while this replica is the leader.",
            )?,
        };
        registry.register(Box::new(m.reconcile_duration.clone()))?;
        registry.register(Box::new(m.reconciles.clone()))?;
        registry.register(Box::new(m.reconcile_errors.clone()))?;
        registry.register(Box::new(m.pool_devices.clone()))?;
        registry.register(Box::new(m.pool_ports.clone()))?;
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.leader.clone()))?;
        Ok(m)
    }

    /// Drops the per-pool gauges of every pool not in `live`. A deleted pool gets no
    /// reconcile, so without this its last counts would stay on the dashboard for ever.
    pub fn forget_pools_except<'a>(&self, live: impl IntoIterator<Item = &'a str>) {
        let live: std::collections::HashSet<&str> = live.into_iter().collect();
        for gauge in [&self.pool_devices, &self.pool_ports] {
            let stale: Vec<Vec<String>> = gauge
                .collect()
                .iter()
                .flat_map(|family| family.get_metric())
                .map(|m| {
                    m.get_label()
                        .iter()
                        .map(|l| l.value().to_owned())
                        .collect::<Vec<_>>()
                })
                .filter(|labels| {
                    labels
                        .first()
                        .is_some_and(|pool| !live.contains(pool.as_str()))
                })
                .collect();
            for labels in stale {
                let values: Vec<&str> = labels.iter().map(String::as_str).collect();
                let _ = gauge.remove_label_values(&values);
            }
        }
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.with_label_values(&[CONTROLLER]).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }
}

/// Observes the reconcile duration on drop, so early returns are timed too (controller-rs).
pub struct ReconcileTimer {
    start: Instant,
    histogram: HistogramVec,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram
            .with_label_values(&[CONTROLLER])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deleted_pools_gauges_are_forgotten() {
        let m = Metrics::register(&Registry::new()).unwrap();
        for pool in ["kept", "deleted"] {
            m.pool_devices
                .with_label_values(&[pool, "allocated"])
                .set(3);
            m.pool_ports.with_label_values(&[pool, "free"]).set(7);
        }
        m.forget_pools_except(["kept"]);
        let pools = |g: &IntGaugeVec| -> Vec<String> {
            g.collect()[0]
                .get_metric()
                .iter()
                .map(|m| m.get_label()[0].value().to_owned())
                .collect()
        };
        assert_eq!(pools(&m.pool_devices), ["kept"]);
        assert_eq!(pools(&m.pool_ports), ["kept"]);
    }

    #[test]
    fn names_are_the_documented_ones() {
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        drop(m.reconcile_started());
        m.reconcile_errors
            .with_label_values(&[CONTROLLER, "conflict"])
            .inc();
        m.pool_devices
            .with_label_values(&["fleet", "allocated"])
            .set(3);
        m.pool_ports.with_label_values(&["fleet", "free"]).set(7);
        m.writes.with_label_values(&["apply"]).inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "trackgate_operator_leader",
                "trackgate_operator_pool_devices",
                "trackgate_operator_pool_ports",
                "trackgate_operator_reconcile_duration_seconds",
                "trackgate_operator_reconcile_errors_total",
                "trackgate_operator_reconciles_total",
                "trackgate_operator_writes_total",
            ]
        );
    }

    /// The chart's dashboards and alerts query these names; promtool catches a malformed
    /// exposition (bad suffix, help text, type) before Prometheus would.
    #[test]
    fn exposition_passes_promtool() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        use prometheus::Encoder;
        let registry = Registry::new();
        let m = Metrics::register(&registry).unwrap();
        drop(m.reconcile_started());
        m.pool_devices
            .with_label_values(&["fleet", "allocated"])
            .set(3);
        let mut text = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(_) if std::env::var("TRACKGATE_ALLOW_SKIP").as_deref() == Ok("1") => {
                eprintln!("SKIP: promtool is not installed");
                return;
            }
            Err(e) => panic!("promtool: {e} (install it, or set TRACKGATE_ALLOW_SKIP=1)"),
        };
        child.stdin.take().unwrap().write_all(&text).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
