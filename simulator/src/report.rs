//! The run summary (human text and JSON) and the log of acked records.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::load::LoadConfig;
use crate::stats::{AckedRecord, Counts};

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Devices simulated.
    pub devices: usize,
    /// `"tcp"` or `"udp"`.
    pub transport: &'static str,
    /// Codec label (`"8"`, `"8e"`, `"16"`).
    pub codec: &'static str,
    /// Records per frame.
    pub records_per_frame: u8,
    /// Target rate (records/s over all devices), if paced.
    pub target_rate: Option<f64>,
    /// Idle mode (keep-alives only).
    pub idle: bool,
    /// Wall time of the run, drain included.
    pub elapsed_seconds: f64,
    /// Acked records per second of `elapsed_seconds`.
    pub records_per_second: f64,
    /// Counters and latency.
    #[serde(flatten)]
    pub counts: Counts,
    /// Records left unacked when the run ended (the server never acked them in time).
    pub records_unacked_at_end: u64,
    /// Moments (seconds since the start) when every device was logged in at once: the first
    /// login of the fleet, then every full re-login after a listener restart.
    pub all_logged_in_at_seconds: Vec<f64>,
}

impl LoadReport {
    pub(crate) fn new(
        config: &LoadConfig,
        counts: Counts,
        elapsed: Duration,
        unacked: u64,
        all_connected_at: Vec<Duration>,
    ) -> Self {
        let secs = elapsed.as_secs_f64();
        Self {
            devices: config.targets.len(),
            transport: config.transport.label(),
            codec: config.device.codec.label(),
            records_per_frame: config.device.records_per_frame,
            target_rate: config.rate,
            idle: config.device.idle,
            elapsed_seconds: secs,
            records_per_second: if secs > 0.0 {
                counts.records_acked as f64 / secs
            } else {
                0.0
            },
            counts,
            records_unacked_at_end: unacked,
            all_logged_in_at_seconds: all_connected_at.iter().map(Duration::as_secs_f64).collect(),
        }
    }

    /// Errors other than refusals, summed.
    pub fn error_count(&self) -> u64 {
        self.counts
            .errors
            .iter()
            .filter(|(reason, _)| **reason != "refused")
            .map(|(_, n)| n)
            .sum()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        let l = &c.latency;
        let ms = |us: u64| us as f64 / 1000.0;
        writeln!(
            f,
            "devices {} ({}, codec {}, {} record(s)/frame{}{})",
            self.devices,
            self.transport,
            self.codec,
            self.records_per_frame,
            self.target_rate
                .map(|r| format!(", target {r:.0} records/s"))
                .unwrap_or_default(),
            if self.idle { ", idle" } else { "" },
        )?;
        writeln!(
            f,
            "acked    {} records in {} frames over {:.2} s = {:.0} records/s",
            c.records_acked, c.frames_acked, self.elapsed_seconds, self.records_per_second
        )?;
        writeln!(
            f,
            "latency  p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} acks)",
            ms(l.p50_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us),
            l.count
        )?;
        writeln!(
            f,
            "sessions {} logins, {} refusals, {} keep-alives, {} frames sent, {} resends, {} wrong acks",
            c.logins, c.refusals, c.keepalives, c.frames_sent, c.resends, c.wrong_acks
        )?;
        let errors: Vec<String> = c.errors.iter().map(|(r, n)| format!("{r}={n}")).collect();
        writeln!(
            f,
            "errors   {}",
            if errors.is_empty() {
                "none".to_owned()
            } else {
                errors.join(" ")
            }
        )?;
        if self.records_unacked_at_end > 0 {
            writeln!(
                f,
                "unacked  {} records at the end",
                self.records_unacked_at_end
            )?;
        }
        if !self.all_logged_in_at_seconds.is_empty() {
            let at: Vec<String> = self
                .all_logged_in_at_seconds
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect();
            writeln!(f, "all devices logged in at {} s", at.join(", "))?;
        }
        Ok(())
    }
}

/// Every record the server acked during a run.
#[derive(Debug, Clone, Default)]
pub struct AckedLog {
    records: Vec<AckedRecord>,
    started_unix_ms: u64,
}

impl AckedLog {
    /// A log of these records, for a run that started at `started_unix_ms` (wall clock, ms
    /// since the epoch; the verifier ignores entries the listener received before it).
    pub fn new(records: Vec<AckedRecord>, started_unix_ms: u64) -> Self {
        Self {
            records,
            started_unix_ms,
        }
    }

    /// Wall-clock start of the run, ms since the epoch.
    pub fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }

    /// The records.
    pub fn records(&self) -> &[AckedRecord] {
        &self.records
    }

    /// Number of acked records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing was acked.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Only the records acked at or after `since` (from the start of the run): after a Redis
    /// restart that lost its data, these are the ones that must be in the new dataset.
    pub fn acked_since(&self, since: Duration) -> AckedLog {
        AckedLog::new(
            self.records
                .iter()
                .filter(|r| r.acked_at >= since)
                .copied()
                .collect(),
            self.started_unix_ms,
        )
    }

    /// How many records were acked in `[from, to)` (from the start of the run).
    pub fn count_acked_between(&self, from: Duration, to: Duration) -> usize {
        self.records
            .iter()
            .filter(|r| r.acked_at >= from && r.acked_at < to)
            .count()
    }
}
