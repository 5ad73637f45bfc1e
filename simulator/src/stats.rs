//! Counters and the ack-latency histogram shared by every device of a run, and the identity
//! of an acked record that the verifier looks for in Redis.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;
use trackgate_api::redis_layout::{self, RECORD_FIELDS};
use trackgate_protocol::{AvlRecord, gt06};

/// A record the server acked: what the verifier must find in Redis exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckedRecord {
    /// The device's IMEI as a number (15 digits fit in a u64).
    pub imei: u64,
    /// Device timestamp (ms since the epoch), the `ts` field.
    pub ts_ms: u64,
    /// [`record_key`] of the entry's `protocol` and record fields ([`teltonika_entry_key`],
    /// [`gt06_entry_key`]).
    pub key: u64,
    /// When the ack arrived, since the start of the run.
    pub acked_at: Duration,
}

/// The entry field naming the protocol that carried a record.
pub const FIELD_PROTOCOL: &str = "protocol";
/// The [`FIELD_PROTOCOL`] value of Teltonika entries (GT06's is [`gt06::PROTOCOL`]).
pub const TELTONIKA: &str = "teltonika";

/// [`record_key`] of the entry the listener stores for a Teltonika record: `protocol`, then the
/// record's fields. The verifier computes the same from what it reads back.
pub fn teltonika_entry_key(record: &AvlRecord) -> u64 {
    let values = redis_layout::record_values_packed(record);
    record_key(std::iter::once(TELTONIKA.as_bytes()).chain(values.iter()))
}

/// [`record_key`] of the entry the listener stores for a GT06 location: `protocol=gt06`, then
/// the fields it shares with Teltonika in their places, empty where GT06 has none (`alt`,
/// `priority`, `event`), as an absent field reads back.
pub fn gt06_entry_key(location: &gt06::Location) -> u64 {
    let fields = location.fields();
    let values = RECORD_FIELDS.map(|name| {
        fields
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    });
    record_key(
        std::iter::once(gt06::PROTOCOL)
            .chain(values)
            .map(str::as_bytes),
    )
}

/// FNV-1a over an entry's values (its `protocol`, then `redis_layout::RECORD_FIELDS` order,
/// each followed by a separator): a stable, dependency-free digest
/// so that millions of acked records cost 32 bytes each, not their text.
pub fn record_key<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for value in values {
        for &b in value.iter().chain(&[0x1f]) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

/// Highest latency the histogram tracks, in microseconds (a minute: beyond any response timeout).
const MAX_LATENCY_US: u64 = 60_000_000;

/// Everything a run counts. Cheap to update from many tasks at once.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    latency_us: Mutex<Histogram<u64>>,
    records_acked: AtomicU64,
    frames_acked: AtomicU64,
    frames_sent: AtomicU64,
    resends: AtomicU64,
    wrong_acks: AtomicU64,
    keepalives: AtomicU64,
    logins: AtomicU64,
    unsolicited_bytes: AtomicU64,
    connected: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Fresh counters; the run's clock starts now.
    pub fn new() -> Self {
        // NB: constant, valid bounds (1 µs .. 60 s, 3 significant digits): cannot fail.
        #[allow(clippy::expect_used)]
        let histogram = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
            .expect("constant histogram bounds are valid");
        Self {
            started: Instant::now(),
            latency_us: Mutex::new(histogram),
            records_acked: AtomicU64::new(0),
            frames_acked: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            resends: AtomicU64::new(0),
            wrong_acks: AtomicU64::new(0),
            keepalives: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            unsolicited_bytes: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// When the run started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the run started.
    pub fn since_start(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn on_acked(&self, records: u64) {
        self.records_acked.fetch_add(records, Relaxed);
        self.frames_acked.fetch_add(1, Relaxed);
    }

    pub(crate) fn on_latency(&self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        if let Ok(mut h) = self.latency_us.lock() {
            h.saturating_record(us);
        }
    }

    pub(crate) fn on_frame_sent(&self) {
        self.frames_sent.fetch_add(1, Relaxed);
    }

    pub(crate) fn on_resend(&self) {
        self.resends.fetch_add(1, Relaxed);
    }

    pub(crate) fn on_wrong_ack(&self) {
        self.wrong_acks.fetch_add(1, Relaxed);
    }

    pub(crate) fn on_keepalive(&self) {
        self.keepalives.fetch_add(1, Relaxed);
    }

    pub(crate) fn on_unsolicited(&self, bytes: usize) {
        self.unsolicited_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts a failed session or connect attempt by its reason.
    pub(crate) fn on_error(&self, reason: &'static str) {
        if let Ok(mut errors) = self.errors.lock() {
            *errors.entry(reason).or_default() += 1;
        }
    }

    /// Counts a login and holds the "connected" gauge up until the guard drops.
    pub(crate) fn connected_guard(&self) -> ConnectedGuard<'_> {
        self.logins.fetch_add(1, Relaxed);
        self.connected.fetch_add(1, Relaxed);
        ConnectedGuard(self)
    }

    /// Devices logged in right now.
    pub fn connected(&self) -> u64 {
        self.connected.load(Relaxed)
    }

    /// Records acked so far.
    pub fn records_acked(&self) -> u64 {
        self.records_acked.load(Relaxed)
    }

    /// A snapshot of the counters and latency percentiles.
    pub fn report_counts(&self) -> Counts {
        let latency = self
            .latency_us
            .lock()
            .map(|h| LatencySummary::of(&h))
            .unwrap_or_default();
        let errors = self.errors.lock().map(|e| e.clone()).unwrap_or_default();
        Counts {
            records_acked: self.records_acked.load(Relaxed),
            frames_acked: self.frames_acked.load(Relaxed),
            frames_sent: self.frames_sent.load(Relaxed),
            resends: self.resends.load(Relaxed),
            wrong_acks: self.wrong_acks.load(Relaxed),
            keepalives: self.keepalives.load(Relaxed),
            logins: self.logins.load(Relaxed),
            refusals: errors.get("refused").copied().unwrap_or(0),
            unsolicited_bytes: self.unsolicited_bytes.load(Relaxed),
            errors,
            latency,
        }
    }
}

/// Decrements the connected gauge when a logged-in session ends.
pub(crate) struct ConnectedGuard<'a>(&'a Stats);

impl Drop for ConnectedGuard<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Relaxed);
    }
}

/// Ack latency percentiles in microseconds: from the frame written to its ack read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Acks measured.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// The counters of a run at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Records the server acked.
    pub records_acked: u64,
    /// Frames the server acked.
    pub frames_acked: u64,
    /// Frames written, resends included.
    pub frames_sent: u64,
    /// Frames written again after a wrong or missing ack.
    pub resends: u64,
    /// Acks whose count differed from the frame's.
    pub wrong_acks: u64,
    /// `0xFF` keep-alives written.
    pub keepalives: u64,
    /// Logins accepted.
    pub logins: u64,
    /// Logins refused (`0x00`).
    pub refusals: u64,
    /// Bytes the server sent that were neither a login reply nor an ack.
    pub unsolicited_bytes: u64,
    /// Failed sessions and connects by reason (refusals included).
    pub errors: BTreeMap<&'static str, u64>,
    /// Ack latency.
    pub latency: LatencySummary,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_key_depends_on_every_value_and_its_place() {
        let key = |values: [&str; 3]| record_key(values.map(str::as_bytes));
        let a = key(["1", "2.0000000", "3"]);
        assert_eq!(a, key(["1", "2.0000000", "3"]));
        assert_ne!(a, key(["1", "2.0000001", "3"]));
        assert_ne!(a, key(["12", ".0000000", "3"]));
    }

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let stats = Stats::new();
        for ms in 1..=1000 {
            stats.on_latency(Duration::from_micros(ms * 10));
        }
        let l = stats.report_counts().latency;
        assert_eq!(l.count, 1000);
        assert!((4_990..=5_010).contains(&l.p50_us), "{l:?}");
        assert!((9_890..=9_910).contains(&l.p99_us), "{l:?}");
        assert!(l.max_us >= 9_990);
    }
}
