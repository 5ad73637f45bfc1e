//! The verifier: after a run, every acked record must be in the readings streams exactly once.
//!
//! It reads every partition stream `<prefix>:{<pool>:<n>}:readings` from start to end and
//! matches entries on `imei` + `ts` + the record's fields (by [`record_key`]). An altered
//! field therefore shows as a missing record.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;
use trackgate_api::redis_layout::{self, FIELD_IMEI, FIELD_RECV, RECORD_FIELDS};
use trackgate_protocol::Imei;

use crate::report::AckedLog;
use crate::stats::record_key;

/// Entries read per `XRANGE` call: big enough to keep round trips few, small enough to keep
/// one reply's memory modest.
const PAGE: usize = 2_000;

/// Response timeout of one page read.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where the listener stores readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    /// Redis URL.
    pub url: String,
    /// Pool name.
    pub pool: String,
    /// Key prefix (`trackgate`).
    pub prefix: String,
    /// Number of partition streams.
    pub partitions: u32,
}

impl StreamLayout {
    /// The key of partition `n`'s readings stream.
    pub fn readings_key(&self, n: u32) -> String {
        redis_layout::readings_key(&self.prefix, &self.pool, n)
    }
}

/// Why verification could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Talking to Redis failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The Redis URL is not usable.
    #[error("redis URL: {0}")]
    Url(String),
}

impl VerifyError {
    /// A short, bounded name.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Redis(_) => "redis",
            VerifyError::Url(_) => "url",
        }
    }
}

/// What the verifier found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Acked records looked for.
    pub acked: u64,
    /// Acked records found (at least once).
    pub found: u64,
    /// Acked records not in Redis: a broken no-loss promise.
    pub missing: u64,
    /// Extra copies of any record of the simulated devices: a broken dedup promise.
    pub duplicated: u64,
    /// Entries of the simulated devices without a numeric `ts` or `recv`.
    pub malformed: u64,
    /// Records received during the run and stored but never acked (the ack was lost and the
    /// device gave up at the end of the run). Allowed: the device still holds them.
    pub stored_unacked: u64,
    /// Stream entries read, all devices.
    pub entries_read: u64,
}

impl Verification {
    /// True when nothing is missing, duplicated or malformed.
    pub fn is_ok(&self) -> bool {
        self.missing == 0 && self.duplicated == 0 && self.malformed == 0
    }
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verify   {} acked, {} found, {} missing, {} duplicated, {} malformed, {} stored but unacked ({} entries read): {}",
            self.acked,
            self.found,
            self.missing,
            self.duplicated,
            self.malformed,
            self.stored_unacked,
            self.entries_read,
            if self.is_ok() { "OK" } else { "FAILED" }
        )
    }
}

/// Checks that every record in `acked` is stored exactly once, and that no record of the
/// `devices` is stored twice.
///
/// # Errors
/// [`VerifyError`] when Redis cannot be read.
pub async fn verify(
    layout: &StreamLayout,
    acked: &AckedLog,
    devices: &[Imei],
) -> Result<Verification, VerifyError> {
    let ours: HashSet<&str> = devices.iter().map(Imei::as_str).collect();
    // (imei, ts, key) → copies found. Keyed on the fields too: two runs of the same devices
    // can reuse a device timestamp (tracks log one record per second of device time, faster
    // than real time under load), and such records are different records.
    let mut expected: Counts = acked
        .records()
        .iter()
        .map(|r| ((r.imei, r.ts_ms, r.key), 0))
        .collect();
    let mut unacked: Counts = HashMap::new();
    let mut result = Verification {
        acked: expected.len() as u64,
        ..Verification::default()
    };

    // NB: the client's default 500 ms response timeout is too short for a page of a big
    // stream on a machine busy with the load that just ran.
    let nodes = redis_layout::cluster_nodes(&layout.url).map_err(VerifyError::Url)?;
    let mut reader = Reader {
        layout,
        ours: &ours,
        acked,
        expected: &mut expected,
        unacked: &mut unacked,
        result: &mut result,
    };
    match nodes {
        Some(nodes) => {
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .response_timeout(READ_TIMEOUT)
                .build()?;
            reader
                .read(&mut client.get_async_connection().await?)
                .await?;
        }
        None => {
            let client = redis::Client::open(layout.url.as_str())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            conn.set_response_timeout(READ_TIMEOUT);
            reader.read(&mut conn).await?;
        }
    }

    for copies in expected.values() {
        match copies {
            0 => result.missing += 1,
            n => {
                result.found += 1;
                result.duplicated += u64::from(n - 1);
            }
        }
    }
    for copies in unacked.values() {
        result.stored_unacked += 1;
        result.duplicated += u64::from(copies - 1);
    }
    Ok(result)
}

type Counts = HashMap<(u64, u64, u64), u32>;

/// One pass over every partition stream, counting copies of each record.
struct Reader<'a> {
    layout: &'a StreamLayout,
    ours: &'a HashSet<&'a str>,
    acked: &'a AckedLog,
    expected: &'a mut Counts,
    unacked: &'a mut Counts,
    result: &'a mut Verification,
}

impl Reader<'_> {
    async fn read(
        &mut self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> Result<(), VerifyError> {
        for n in 0..self.layout.partitions {
            let key = self.layout.readings_key(n);
            let mut start = "-".to_owned();
            loop {
                let page: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE)
                    .query_async(conn)
                    .await?;
                for (_, flat) in &page {
                    self.result.entries_read += 1;
                    // A linear scan of the ~14 fields beats building a map per entry.
                    let mut values = [""; RECORD_FIELDS.len()];
                    let (mut imei, mut recv) = (None, None);
                    for kv in flat.chunks_exact(2) {
                        let (name, value) = (kv[0].as_str(), kv[1].as_str());
                        match name {
                            FIELD_IMEI => imei = Some(value),
                            FIELD_RECV => recv = Some(value),
                            _ => {
                                if let Some(i) = RECORD_FIELDS.iter().position(|f| *f == name) {
                                    values[i] = value;
                                }
                            }
                        }
                    }
                    let Some(imei) = imei.filter(|i| self.ours.contains(i)) else {
                        continue;
                    };
                    let (Ok(imei), Ok(ts), Some(Ok(recv))) = (
                        imei.parse::<u64>(),
                        values[0].parse::<u64>(),
                        recv.map(str::parse::<u64>),
                    ) else {
                        self.result.malformed += 1;
                        continue;
                    };
                    let entry_key = record_key(values);
                    let id = (imei, ts, entry_key);
                    if let Some(copies) = self.expected.get_mut(&id) {
                        *copies += 1;
                    } else if recv >= self.acked.started_unix_ms() {
                        // Received during this run but never acked; earlier runs' records are
                        // not this run's business.
                        *self.unacked.entry(id).or_default() += 1;
                    }
                }
                match page.last() {
                    Some((id, _)) if page.len() == PAGE => start = format!("({id}"),
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_keys_use_the_partition_hash_tag() {
        let layout = StreamLayout {
            url: "redis://127.0.0.1/".into(),
            pool: "fleet".into(),
            prefix: "trackgate".into(),
            partitions: 4,
        };
        assert_eq!(layout.readings_key(3), "trackgate:{fleet:3}:readings");
    }

    #[test]
    fn verification_fails_on_any_loss_duplicate_or_alteration() {
        let ok = Verification {
            acked: 2,
            found: 2,
            stored_unacked: 1,
            ..Verification::default()
        };
        assert!(ok.is_ok());
        assert!(
            !Verification {
                missing: 1,
                ..ok.clone()
            }
            .is_ok()
        );
        assert!(
            !Verification {
                duplicated: 1,
                ..ok.clone()
            }
            .is_ok()
        );
        assert!(!Verification { malformed: 1, ..ok }.is_ok());
    }
}
