//! PURE: the allocation record, the one authoritative IMEI → port table of a pool.
//!
//! The record lives in ConfigMaps that no listener mounts: `<pool>-allocation` (part 0, the
//! head) and, past [`RECORD_PART_ENTRIES`] devices, `<pool>-allocation-1`, `-2`, ... Each holds
//! `allocation.txt` (`imei port` per line, sorted by port). The shard ConfigMaps are derived
//! from it, so deleting or editing one cannot change a port: the next reconcile rebuilds it from
//! the record. Each shard ConfigMap names its record ([`RECORD_ANNOTATION`]), which is how a
//! lost record is told apart from a pool written by a version that kept tables only in shards.
//!
//! When the record is missing or unreadable while the pool has a history (shards, or devices
//! allocated in its status), [`recover`] refuses to guess: the operator reports `Degraded` and
//! changes nothing until the record is restored or the user asks for a fresh allocation
//! ([`trackgate_api::annotations::REALLOCATE`]).
//!
//! Sizes: a line is at most 22 bytes (15-digit IMEI, space, 5-digit port, newline), so a part of
//! 40,000 entries holds at most 880,000 bytes, inside the API server's 1 MiB ConfigMap limit
//! with room for metadata; a 50,000-device pool is two parts. The split is by sorted position;
//! parts are written before the head (which names the part count), and a device a shard still
//! serves but a half-written record lacks keeps its port (see [`recover`]).

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use trackgate_api::annotations::REALLOCATE;
use trackgate_api::conditions::reasons;

use crate::allocate::{self, ALLOCATION_TABLE_FILE, Allocation, LineError, Previous};

/// On a shard ConfigMap: the name of the allocation record it was derived from.
pub const RECORD_ANNOTATION: &str = "trackgate.dev/allocation-record";
/// On the record's head: how many parts the record has.
pub const PARTS_ANNOTATION: &str = "trackgate.dev/allocation-parts";
/// Entries per record part: 40,000 × 22 bytes = 880,000 bytes, under the 1 MiB limit.
pub const RECORD_PART_ENTRIES: usize = 40_000;
/// Most parts read (a bound on a corrupt annotation): 64 × 40,000 devices.
pub const MAX_PARTS: usize = 64;
/// `app.kubernetes.io/component` of the record ConfigMaps.
pub const RECORD_COMPONENT: &str = "allocation";

/// Name of part `part` of `pool`'s record.
pub fn record_name(pool: &str, part: usize) -> String {
    if part == 0 {
        format!("{pool}-allocation")
    } else {
        format!("{pool}-allocation-{part}")
    }
}

/// Whether `name` is a part of `pool`'s record.
pub fn is_record_name(pool: &str, name: &str) -> bool {
    name.strip_prefix(pool)
        .and_then(|rest| rest.strip_prefix("-allocation"))
        .is_some_and(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix('-')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// The record ConfigMaps for `allocation`: at least the head, even for an empty pool, so that
/// "no record" always means "lost".
pub fn record_objects(
    pool: &str,
    namespace: Option<String>,
    owner: &OwnerReference,
    allocation: &Allocation,
) -> Vec<ConfigMap> {
    let mut entries: Vec<&(u16, String)> = allocation.shards.values().flatten().collect();
    entries.sort_unstable();
    let chunks: Vec<&[&(u16, String)]> = if entries.is_empty() {
        vec![&[]]
    } else {
        entries.chunks(RECORD_PART_ENTRIES).collect()
    };
    let parts = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(part, chunk)| {
            let owned: Vec<(u16, String)> = chunk.iter().map(|e| (*e).clone()).collect();
            let labels = BTreeMap::from([
                (crate::desired::POOL_LABEL.to_owned(), pool.to_owned()),
                (
                    "app.kubernetes.io/component".to_owned(),
                    RECORD_COMPONENT.to_owned(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    crate::desired::FIELD_MANAGER.to_owned(),
                ),
            ]);
            let annotations = (part == 0)
                .then(|| BTreeMap::from([(PARTS_ANNOTATION.to_owned(), parts.to_string())]));
            ConfigMap {
                metadata: ObjectMeta {
                    name: Some(record_name(pool, part)),
                    namespace: namespace.clone(),
                    labels: Some(labels),
                    annotations,
                    owner_references: Some(vec![owner.clone()]),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    ALLOCATION_TABLE_FILE.to_owned(),
                    allocate::render_table(&owned),
                )])),
                ..ConfigMap::default()
            }
        })
        .collect()
}

/// Why the previous allocation cannot be known. The pool is left as it is until this is fixed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The record's head is gone but the pool has shards or allocated devices.
    #[error(
        "allocation record ConfigMap {record} is missing while the pool has {evidence}; nothing \
         is changed until it is restored (kubectl apply -f a backup of it) or a fresh allocation \
         is asked for with `kubectl annotate tpp {pool} trackgate.dev/reallocate=true` (devices \
         whose shard ConfigMap survives keep their port, the others may move)"
    )]
    Missing {
        /// The pool.
        pool: String,
        /// The record's head.
        record: String,
        /// What shows the pool had an allocation.
        evidence: String,
    },
    /// The head names more parts than exist.
    #[error(
        "allocation record part {record} is missing ({parts} parts expected); nothing is changed \
         until it is restored from a backup or a fresh allocation is asked for with `kubectl \
         annotate tpp {pool} trackgate.dev/reallocate=true`"
    )]
    PartMissing {
        /// The pool.
        pool: String,
        /// The missing part.
        record: String,
        /// Parts the head names.
        parts: usize,
    },
    /// A record part (or, before migration, a shard table) holds something unreadable.
    #[error(
        "allocation table in ConfigMap {config_map} is unreadable ({source}); nothing is changed \
         until it is restored from a backup or a fresh allocation is asked for with `kubectl \
         annotate tpp {pool} trackgate.dev/reallocate=true`"
    )]
    Unreadable {
        /// The pool.
        pool: String,
        /// The ConfigMap.
        config_map: String,
        /// The bad line.
        source: LineError,
    },
}

impl RecordError {
    /// The `Degraded` reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } | Self::PartMissing { .. } => reasons::ALLOCATION_RECORD_MISSING,
            Self::Unreadable { .. } => reasons::ALLOCATION_RECORD_UNREADABLE,
        }
    }
}

/// Where the previous allocation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The record.
    Record,
    /// A new pool: no record and no history.
    Fresh,
    /// A pool from a version that kept tables only in shard ConfigMaps: adopted unchanged.
    Adopted,
    /// Record lost or unreadable and [`REALLOCATE`] set: rebuilt from what shards still tell.
    Reallocated,
}

/// The previous allocation and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// IMEI → port.
    pub previous: Previous,
    /// Its origin.
    pub origin: Origin,
}

/// What [`recover`] looks at.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// The pool's name.
    pub pool: &'a str,
    /// The record parts that exist (any order; other ConfigMaps are ignored).
    pub record: &'a [ConfigMap],
    /// The pool's shard ConfigMaps.
    pub shards: &'a [ConfigMap],
    /// Other children of the pool (Deployments, Services, PDBs) that exist.
    pub other_children: usize,
    /// Devices the pool's status says hold a port.
    pub allocated_in_status: u32,
    /// Whether the pool carries [`REALLOCATE`].
    pub reallocate: bool,
}

/// Whether `annotations` ask for a fresh allocation.
pub fn wants_reallocation(annotations: &BTreeMap<String, String>) -> bool {
    annotations.get(REALLOCATE).is_some_and(|v| v != "false")
}

/// The previous allocation of a pool: from its record, or adopted from legacy shard tables, or
/// empty for a new pool.
///
/// # Errors
/// The record is missing or unreadable while the pool has a history, and no fresh allocation
/// was asked for.
pub fn recover(e: Evidence<'_>) -> Result<Recovered, RecordError> {
    let pool = e.pool.to_owned();
    let part = |k: usize| {
        let name = record_name(e.pool, k);
        e.record.iter().find(|cm| cm.name_any() == name)
    };
    let from_record = || -> Result<Previous, RecordError> {
        let Some(head) = part(0) else {
            return Err(RecordError::Missing {
                pool: pool.clone(),
                record: record_name(e.pool, 0),
                evidence: String::new(),
            });
        };
        let parts = head
            .annotations()
            .get(PARTS_ANNOTATION)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(1)
            .clamp(1, MAX_PARTS);
        let mut previous = Previous::new();
        for k in 0..parts {
            let cm = part(k).ok_or_else(|| RecordError::PartMissing {
                pool: pool.clone(),
                record: record_name(e.pool, k),
                parts,
            })?;
            let text = table(cm).unwrap_or_default();
            allocate::parse_table(text, &mut previous).map_err(|source| {
                RecordError::Unreadable {
                    pool: pool.clone(),
                    config_map: cm.name_any(),
                    source,
                }
            })?;
        }
        Ok(previous)
    };
    match from_record() {
        Ok(mut previous) => {
            // A device a shard serves but a half-written multi-part record lacks keeps its
            // port, unless the record gives that port to someone else (the record wins).
            let held: HashSet<u16> = previous.values().copied().collect();
            for (imei, port) in shard_tables(e.shards) {
                if !held.contains(&port) {
                    previous.entry(imei).or_insert(port);
                }
            }
            Ok(Recovered {
                previous,
                origin: Origin::Record,
            })
        }
        Err(_) if e.reallocate => Ok(Recovered {
            previous: shard_tables(e.shards).collect(),
            origin: Origin::Reallocated,
        }),
        Err(RecordError::Missing { pool, record, .. }) => {
            let derived = e
                .shards
                .iter()
                .filter(|cm| cm.annotations().contains_key(RECORD_ANNOTATION))
                .count();
            if derived == 0 && e.shards.is_empty() {
                if e.other_children == 0 && e.allocated_in_status == 0 {
                    return Ok(Recovered {
                        previous: Previous::new(),
                        origin: Origin::Fresh,
                    });
                }
                let evidence = if e.other_children > 0 {
                    format!(
                        "{} listener objects but no shard ConfigMap",
                        e.other_children
                    )
                } else {
                    format!("{} devices allocated in its status", e.allocated_in_status)
                };
                return Err(RecordError::Missing {
                    pool,
                    record,
                    evidence,
                });
            }
            if derived > 0 {
                return Err(RecordError::Missing {
                    pool,
                    record,
                    evidence: format!("{} shard ConfigMaps derived from it", e.shards.len()),
                });
            }
            // written by a version without a record: adopt every table, or none
            let mut previous = Previous::new();
            for cm in e.shards {
                allocate::parse_table(table(cm).unwrap_or_default(), &mut previous).map_err(
                    |source| RecordError::Unreadable {
                        pool: pool.clone(),
                        config_map: cm.name_any(),
                        source,
                    },
                )?;
            }
            Ok(Recovered {
                previous,
                origin: Origin::Adopted,
            })
        }
        Err(err) => Err(err),
    }
}

fn table(cm: &ConfigMap) -> Option<&str> {
    cm.data
        .as_ref()?
        .get(ALLOCATION_TABLE_FILE)
        .map(String::as_str)
}

/// Every readable `imei port` entry of the shard tables; unreadable tables are skipped.
fn shard_tables(shards: &[ConfigMap]) -> impl Iterator<Item = (String, u16)> + '_ {
    shards.iter().flat_map(|cm| {
        let mut p = Previous::new();
        match table(cm).map(|t| allocate::parse_table(t, &mut p)) {
            Some(Ok(())) => p.into_iter().collect::<Vec<_>>(),
            _ => Vec::new(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{PoolBuilder, allocate_for};
    use kube::Resource;

    fn objects(n: u64) -> (Allocation, Vec<ConfigMap>) {
        let pool = PoolBuilder::dedicated(1, 65000)
            .ports_per_shard(50)
            .with_devices(n)
            .build();
        let a = allocate_for(&pool, &Previous::new());
        let owner = pool.controller_owner_ref(&()).unwrap();
        let r = record_objects("fleet", Some("trackers".into()), &owner, &a);
        (a, r)
    }

    fn evidence<'a>(record: &'a [ConfigMap], shards: &'a [ConfigMap]) -> Evidence<'a> {
        Evidence {
            pool: "fleet",
            record,
            shards,
            other_children: 0,
            allocated_in_status: 0,
            reallocate: false,
        }
    }

    /// A 50,000-device record must fit the API server's 1 MiB ConfigMap limit: two parts, each
    /// well under it, read back to the same table.
    #[test]
    fn a_fifty_thousand_device_record_fits_in_parts_under_one_mib() {
        let (a, record) = objects(50_000);
        assert_eq!(record.len(), 2);
        for cm in &record {
            let bytes = serde_json::to_vec(cm).unwrap().len();
            assert!(bytes < 1_000_000, "{} is {bytes} bytes", cm.name_any());
        }
        assert_eq!(record[0].annotations()[PARTS_ANNOTATION], "2");
        let got = recover(evidence(&record, &[])).unwrap();
        assert_eq!(got.origin, Origin::Record);
        assert_eq!(got.previous, a.to_previous());
    }

    #[test]
    fn names_of_parts_are_recognised_and_nothing_else() {
        assert!(is_record_name("fleet", "fleet-allocation"));
        assert!(is_record_name("fleet", "fleet-allocation-3"));
        assert!(!is_record_name("fleet", "fleet-allocation-x"));
        assert!(!is_record_name("fleet", "fleet-shard-0"));
        assert!(!is_record_name("fleet", "fleet-b-allocation"));
        assert_eq!(record_name("fleet", 2), "fleet-allocation-2");
    }

    #[test]
    fn a_new_pool_starts_fresh_and_a_pool_with_history_but_no_record_is_refused() {
        let got = recover(evidence(&[], &[])).unwrap();
        assert_eq!(got.origin, Origin::Fresh);
        let e = Evidence {
            allocated_in_status: 7,
            ..evidence(&[], &[])
        };
        let err = recover(e).unwrap_err();
        assert_eq!(err.reason(), reasons::ALLOCATION_RECORD_MISSING);
        assert!(err.to_string().contains("7 devices allocated"), "{err}");
        assert!(
            err.to_string().contains("trackgate.dev/reallocate"),
            "{err}"
        );
        let e = Evidence {
            other_children: 3,
            ..evidence(&[], &[])
        };
        assert!(recover(e).is_err());
    }

    #[test]
    fn a_missing_part_or_a_garbled_table_is_refused_unless_reallocation_is_asked_for() {
        let (_, record) = objects(45_000);
        let err = recover(evidence(&record[..1], &[])).unwrap_err();
        assert!(err.to_string().contains("fleet-allocation-1"), "{err}");
        let mut bad = record.clone();
        bad[1]
            .data
            .as_mut()
            .unwrap()
            .insert(ALLOCATION_TABLE_FILE.into(), "garbage\n".into());
        let err = recover(evidence(&bad, &[])).unwrap_err();
        assert_eq!(err.reason(), reasons::ALLOCATION_RECORD_UNREADABLE);
        let e = Evidence {
            reallocate: true,
            ..evidence(&bad, &[])
        };
        assert_eq!(recover(e).unwrap().origin, Origin::Reallocated);
    }

    #[test]
    fn the_record_wins_over_a_shard_table_that_claims_its_ports() {
        let (a, record) = objects(3);
        let entries = &a.shards[&0];
        let (port0, imei0) = entries[0].clone();
        let edited = ConfigMap {
            metadata: ObjectMeta {
                name: Some("fleet-shard-0".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                ALLOCATION_TABLE_FILE.to_owned(),
                // a hand edit: another IMEI on device 0's port, and a device the record lacks
                format!("359999999999999 {port0}\n358888888888888 60000\n"),
            )])),
            ..ConfigMap::default()
        };
        let got = recover(evidence(&record, std::slice::from_ref(&edited))).unwrap();
        assert_eq!(got.previous[&imei0], port0);
        assert!(!got.previous.contains_key("359999999999999"));
        assert_eq!(got.previous["358888888888888"], 60000);
    }
}
