//! The verifier: after a run, every acked record must be in the readings streams exactly once.
//!
//! It reads every partition stream `<prefix>:{<pool>:<n>}:readings` from start to end and
//! matches entries on `imei` + `ts` + `protocol` and the record's fields (by [`record_key`]):
//! Teltonika and GT06 entries alike, each against the key its device computed
//! ([`crate::teltonika_entry_key`], [`crate::gt06_entry_key`]). An altered field, or a record
//! stored under another protocol, therefore shows as a missing record.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;
use trackgate_api::redis_layout::{self, FIELD_IMEI, FIELD_RECV, RECORD_FIELDS};
use trackgate_protocol::Imei;

use crate::report::AckedLog;
use crate::stats::{FIELD_PROTOCOL, record_key};

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
    let mut tally = Tally::new(acked, &ours);

    // NB: the client's default 500 ms response timeout is too short for a page of a big
    // stream on a machine busy with the load that just ran.
    let nodes = redis_layout::cluster_nodes(&layout.url).map_err(VerifyError::Url)?;
    let mut reader = Reader {
        layout,
        tally: &mut tally,
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
    Ok(tally.finish())
}

type Counts = HashMap<(u64, u64, u64), u32>;

/// Copies of each record of the simulated devices, counted entry by entry (no IO, so the
/// judging is unit-tested without Redis).
struct Tally<'a> {
    ours: &'a HashSet<&'a str>,
    started_unix_ms: u64,
    /// (imei, ts, key) → copies found. Keyed on the fields too: two runs of the same devices
    /// can reuse a device timestamp (tracks log one record per second of device time, faster
    /// than real time under load), and such records are different records.
    expected: Counts,
    unacked: Counts,
    result: Verification,
}

impl<'a> Tally<'a> {
    fn new(acked: &AckedLog, ours: &'a HashSet<&'a str>) -> Self {
        let expected: Counts = acked
            .records()
            .iter()
            .map(|r| ((r.imei, r.ts_ms, r.key), 0))
            .collect();
        let result = Verification {
            acked: expected.len() as u64,
            ..Verification::default()
        };
        Self {
            ours,
            started_unix_ms: acked.started_unix_ms(),
            expected,
            unacked: HashMap::new(),
            result,
        }
    }

    /// Counts one stream entry, given as its (name, value) pairs.
    ///
    /// The entry's key covers `protocol` and every record field, so an entry of the wrong
    /// protocol, or one whose fields the listener altered, is not the acked record: it shows
    /// as that record missing.
    fn entry<'e>(&mut self, fields: impl IntoIterator<Item = (&'e str, &'e str)>) {
        self.result.entries_read += 1;
        // A linear scan of the ~15 fields beats building a map per entry.
        let mut values = [""; RECORD_FIELDS.len()];
        let (mut imei, mut recv, mut protocol) = (None, None, "");
        for (name, value) in fields {
            match name {
                FIELD_IMEI => imei = Some(value),
                FIELD_RECV => recv = Some(value),
                FIELD_PROTOCOL => protocol = value,
                _ => {
                    if let Some(i) = RECORD_FIELDS.iter().position(|f| *f == name) {
                        values[i] = value;
                    }
                }
            }
        }
        let Some(imei) = imei.filter(|i| self.ours.contains(i)) else {
            return;
        };
        let (Ok(imei), Ok(ts), Some(Ok(recv))) = (
            imei.parse::<u64>(),
            values[0].parse::<u64>(),
            recv.map(str::parse::<u64>),
        ) else {
            self.result.malformed += 1;
            return;
        };
        let id = (
            imei,
            ts,
            record_key(std::iter::once(protocol).chain(values).map(str::as_bytes)),
        );
        if let Some(copies) = self.expected.get_mut(&id) {
            *copies += 1;
        } else if recv >= self.started_unix_ms {
            // Received during this run but never acked; earlier runs' records are not this
            // run's business.
            *self.unacked.entry(id).or_default() += 1;
        }
    }

    fn finish(mut self) -> Verification {
        for copies in self.expected.values() {
            match copies {
                0 => self.result.missing += 1,
                n => {
                    self.result.found += 1;
                    self.result.duplicated += u64::from(n - 1);
                }
            }
        }
        for copies in self.unacked.values() {
            self.result.stored_unacked += 1;
            self.result.duplicated += u64::from(copies - 1);
        }
        self.result
    }
}

/// One pass over every partition stream, feeding each entry to the tally.
struct Reader<'a, 't> {
    layout: &'a StreamLayout,
    tally: &'a mut Tally<'t>,
}

impl Reader<'_, '_> {
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
                    self.tally.entry(
                        flat.chunks_exact(2)
                            .map(|kv| (kv[0].as_str(), kv[1].as_str())),
                    );
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

    // === Tally: GT06 and Teltonika entries judged alike ===

    const GT06_IMEI: &str = "864717003283581";
    const TELTONIKA_IMEI: &str = "356307042441013";
    const STARTED: u64 = 1_700_000_000_000;

    /// Three GT06 locations as a device logs them acked, and the entries a listener stores
    /// for them (field for field what the store script writes: absent fields left out).
    fn gt06_run() -> (AckedLog, Vec<Vec<(String, String)>>) {
        let mut track = crate::Track::new(5, 0, STARTED);
        let mut acked = Vec::new();
        let mut entries = Vec::new();
        for _ in 0..3 {
            let rec = track.next_record(trackgate_protocol::Codec::Codec8);
            let (loc, stored) = crate::device::gt06::location_from(&rec);
            acked.push(crate::AckedRecord {
                imei: GT06_IMEI.parse().unwrap(),
                ts_ms: stored.timestamp_ms,
                key: crate::gt06_entry_key(&loc),
                acked_at: std::time::Duration::ZERO,
            });
            let mut entry = vec![("imei".to_owned(), GT06_IMEI.to_owned())];
            entry.extend(loc.fields().map(|(k, v)| (k.to_owned(), v)));
            entry.push(("port".into(), "5023".into()));
            entry.push(("recv".into(), (STARTED + 1).to_string()));
            entries.push(entry);
        }
        (AckedLog::new(acked, STARTED), entries)
    }

    fn judge(acked: &AckedLog, imeis: &[&str], entries: &[Vec<(String, String)>]) -> Verification {
        let ours: HashSet<&str> = imeis.iter().copied().collect();
        let mut tally = Tally::new(acked, &ours);
        for e in entries {
            tally.entry(e.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        tally.finish()
    }

    /// Guards against a verifier that cannot fail on GT06: a lost, a doubled, an altered and a
    /// mislabelled GT06 location each fail it.
    #[test]
    fn gt06_entries_are_judged_missing_duplicated_or_altered() {
        let (acked, entries) = gt06_run();
        let clean = judge(&acked, &[GT06_IMEI], &entries);
        assert!(clean.is_ok(), "{clean}");
        assert_eq!((clean.acked, clean.found, clean.entries_read), (3, 3, 3));

        let mut doubled = entries.clone();
        doubled.push(entries[1].clone());
        let v = judge(&acked, &[GT06_IMEI], &doubled);
        assert_eq!((v.found, v.duplicated), (3, 1), "{v}");
        assert!(!v.is_ok());

        let v = judge(&acked, &[GT06_IMEI], &entries[..2]);
        assert_eq!((v.found, v.missing), (2, 1), "{v}");
        assert!(!v.is_ok());

        // The speed changed, or the entry not labelled gt06: not the acked location.
        for (field, value) in [
            ("speed", Some("1")),
            ("protocol", Some("teltonika")),
            ("protocol", None),
        ] {
            let mut changed = entries.clone();
            changed[2].retain(|(k, _)| k != field);
            if let Some(value) = value {
                changed[2].push((field.to_owned(), value.to_owned()));
            }
            let v = judge(&acked, &[GT06_IMEI], &changed);
            assert_eq!((v.found, v.missing), (2, 1), "{field}={value:?}: {v}");
            assert!(!v.is_ok());
        }
    }

    /// A mixed fleet's streams hold both protocols' entries; each device's are judged by the
    /// key its own protocol computed.
    #[test]
    fn teltonika_and_gt06_entries_in_one_stream() {
        let (gt06_acked, mut entries) = gt06_run();
        let mut track = crate::Track::new(6, 1, STARTED);
        let records: Vec<_> = (0..2)
            .map(|_| track.next_record(trackgate_protocol::Codec::Codec8Ext))
            .collect();
        let mut acked = gt06_acked.records().to_vec();
        for r in &records {
            acked.push(crate::AckedRecord {
                imei: TELTONIKA_IMEI.parse().unwrap(),
                ts_ms: r.timestamp_ms,
                key: crate::teltonika_entry_key(r),
                acked_at: std::time::Duration::ZERO,
            });
            let mut entry = vec![("imei".to_owned(), TELTONIKA_IMEI.to_owned())];
            entry.extend(redis_layout::record_fields(r).map(|(k, v)| (k.to_owned(), v)));
            entry.push(("codec".into(), "8E".into()));
            entry.push(("protocol".into(), "teltonika".into()));
            entry.push(("recv".into(), (STARTED + 1).to_string()));
            entries.push(entry);
        }
        let acked = AckedLog::new(acked, STARTED);
        let both = [GT06_IMEI, TELTONIKA_IMEI];
        let v = judge(&acked, &both, &entries);
        assert!(v.is_ok() && v.found == 5, "{v}");

        // A Teltonika entry without its protocol is not the acked record either.
        entries[4].retain(|(k, _)| k != "protocol");
        let v = judge(&acked, &both, &entries);
        assert_eq!((v.found, v.missing), (4, 1), "{v}");
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
