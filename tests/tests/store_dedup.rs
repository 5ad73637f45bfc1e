//! The store script against a real redis-server: its dedup window (property tests), and the
//! upgrade from trackgate 0.1.0's script (`tests/fixtures/store_readings_v1.lua`) with old and
//! new listeners storing for the same devices at once.

use std::collections::BTreeMap;

use proptest::prelude::*;
use redis::Commands;
use trackgate_api::redis_layout::{
    self as layout, LEGACY_DEDUP_GRACE_MS, STORE_READINGS_LUA, StoreArgs,
};
use trackgate_protocol::{AvlRecord, Imei, IoElement, IoValue};
use trackgate_tests::{RedisServer, workspace_root};

const PREFIX: &str = "trackgate";
const POOL: &str = "fleet";
const PARTITIONS: u32 = 4;
const TTL_MS: u64 = 604_800_000;

/// A record told apart from every other by `id` (its speed and an IO value); `ts` may repeat
/// or run backwards.
fn record(id: u16, ts: u64) -> AvlRecord {
    AvlRecord {
        timestamp_ms: ts,
        priority: 0,
        longitude: 251_234_567,
        latitude: -546_872_345,
        altitude: 120,
        angle: 90,
        satellites: 9,
        speed: id,
        event_id: 0,
        generation_type: None,
        io: vec![IoElement {
            id: 16,
            value: IoValue::U32(u32::from(id)),
        }],
    }
}

/// One device's store calls, as a listener of either version makes them.
struct Store {
    conn: redis::Connection,
    imei: Imei,
    window: u32,
}

/// trackgate 0.1.0's store script, read once for every simulated old listener.
static LEGACY_SCRIPT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::fs::read_to_string(workspace_root().join("tests/fixtures/store_readings_v1.lua"))
        .expect("the 0.1.0 store script")
});

impl Store {
    fn new(server: &RedisServer, imei: &str, window: u32) -> Self {
        let client = redis::Client::open(server.url()).expect("redis url");
        Self {
            conn: client.get_connection().expect("connect to redis"),
            imei: Imei::parse(imei).expect("imei"),
            window,
        }
    }

    fn fixed(&self, recv_ms: u64) -> StoreArgs<'_> {
        StoreArgs {
            max_len: 1_000_000,
            dedup_records: self.window,
            dedup_ttl_ms: TTL_MS,
            imei: self.imei.as_str(),
            codec: "8",
            port: 5027,
            recv_ms,
            protocol: "teltonika",
        }
    }

    /// The current script, as today's listener calls it: how many records were new.
    fn store(&mut self, records: &[AvlRecord]) -> u32 {
        let keys = layout::store_keys(PREFIX, POOL, &self.imei, PARTITIONS);
        let args = layout::store_args(&self.fixed(1_700_000_000_000), records);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(STORE_READINGS_LUA).arg(keys.len()).arg(&keys[..]);
        for arg in args.iter() {
            cmd.arg(arg);
        }
        cmd.query(&mut self.conn).expect("store_readings")
    }

    /// The 0.1.0 script, with the arguments a 0.1.0 listener sent.
    fn store_legacy(&mut self, records: &[AvlRecord]) -> u32 {
        let [readings, _, seen] = layout::store_keys(PREFIX, POOL, &self.imei, PARTITIONS);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEGACY_SCRIPT.as_str())
            .arg(2)
            .arg(readings)
            .arg(seen)
            .arg(layout::store_args_v1(
                &self.fixed(1_700_000_000_000),
                records,
            ));
        cmd.query(&mut self.conn).expect("0.1.0 store_readings")
    }

    /// Stored records of this device by id, with how often each was stored.
    fn stored(&mut self) -> BTreeMap<u16, u32> {
        let [readings, ..] = layout::store_keys(PREFIX, POOL, &self.imei, PARTITIONS);
        let entries: redis::streams::StreamRangeReply =
            self.conn.xrange_all(readings).expect("xrange");
        let mut ids = BTreeMap::new();
        for entry in entries.ids {
            if entry.get::<String>("imei").as_deref() != Some(self.imei.as_str()) {
                continue;
            }
            let id: u16 = entry.get("speed").expect("speed field");
            *ids.entry(id).or_insert(0) += 1;
        }
        ids
    }

    fn dedup_len(&mut self) -> usize {
        let key = &layout::store_keys(PREFIX, POOL, &self.imei, PARTITIONS)[1];
        self.conn.strlen(key).expect("strlen")
    }

    fn legacy_exists(&mut self) -> bool {
        let key = &layout::store_keys(PREFIX, POOL, &self.imei, PARTITIONS)[2];
        self.conn.exists(key).expect("exists")
    }

    /// Makes the 0.1.0 set look last written `ago_ms` ago (its TTL is refreshed on every
    /// 0.1.0 write and never by the current script).
    fn age_legacy(&mut self, ago_ms: u64) {
        let key = &layout::store_keys(PREFIX, POOL, &self.imei, PARTITIONS)[2];
        let _: bool = self
            .conn
            .pexpire(key, i64::try_from(TTL_MS - ago_ms).unwrap_or(1))
            .expect("pexpire");
    }
}

/// What a device does next.
#[derive(Debug, Clone)]
enum Step {
    /// `n` records never sent before; `ts_step` moves the device clock (0: the same second
    /// again; negative: a clock running backwards).
    New { n: usize, ts_step: i64 },
    /// Sends again `n` records from among the newest `back` stored (the ack was lost), with
    /// `fresh` new records packed into the same frame.
    Resend { back: usize, n: usize, fresh: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1usize..6, prop_oneof![3 => 1i64..5_000, 1 => Just(0i64), 1 => -60_000i64..0])
            .prop_map(|(n, ts_step)| Step::New { n, ts_step }),
        2 => (1usize..20, 1usize..6, 0usize..3)
            .prop_map(|(back, n, fresh)| Step::Resend { back, n, fresh }),
    ]
}

/// Plays `steps` against the store: returns the records sent (by id, in first-sent order).
fn play(store: &mut Store, steps: &[Step], window: usize) -> Vec<u16> {
    let mut sent: Vec<AvlRecord> = Vec::new();
    let mut ts: i64 = 1_700_000_000_000;
    let mut next_id: u16 = 0;
    let mut fresh_record = |ts: &mut i64, step: i64| {
        *ts += step;
        next_id += 1;
        record(next_id, u64::try_from(*ts).unwrap_or(0))
    };
    for step in steps {
        let frame: Vec<AvlRecord> = match *step {
            Step::New { n, ts_step } => (0..n).map(|_| fresh_record(&mut ts, ts_step)).collect(),
            Step::Resend { back, n, fresh } => {
                // Only records still inside the window are promised to be caught.
                let back = back.min(window).min(sent.len());
                let mut frame: Vec<AvlRecord> =
                    sent[sent.len() - back..].iter().take(n).cloned().collect();
                frame.extend((0..fresh).map(|_| fresh_record(&mut ts, 1000)));
                frame
            }
        };
        let new_in_frame = frame
            .iter()
            .filter(|r| !sent.iter().any(|s| s.speed == r.speed))
            .count();
        let stored = store.store(&frame);
        assert_eq!(
            stored as usize, new_in_frame,
            "frame {step:?}: {stored} stored, {new_in_frame} were new"
        );
        for r in frame {
            if !sent.iter().any(|s| s.speed == r.speed) {
                sent.push(r);
            }
        }
    }
    sent.iter().map(|r| r.speed).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every distinct record is stored (no false duplicate, whatever the device clock does),
    /// every resend of a record within the window is caught, and the window's memory stays
    /// 16 bytes + 8 per remembered record.
    #[test]
    fn the_window_stores_each_record_once(
        window in 1u32..12,
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let Some(server) = RedisServer::start() else { return Ok(()) };
        let mut store = Store::new(&server, "356307042441013", window);
        let sent = play(&mut store, &steps, window as usize);
        let stored = store.stored();
        prop_assert_eq!(stored.len(), sent.len());
        prop_assert!(stored.values().all(|&n| n == 1), "stored twice: {:?}", stored);
        let window_bytes = if sent.is_empty() { 0 } else { 16 + 8 * window as usize };
        prop_assert_eq!(store.dedup_len(), window_bytes);
    }
}

/// A frame larger than the window, and the window shrunk and grown between calls: the newest
/// records are remembered, nothing is stored twice.
#[test]
fn window_resizes_keep_the_newest_records() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut store = Store::new(&server, "356307042441013", 4);
    let records: Vec<AvlRecord> = (1..=10)
        .map(|i| record(i, 1_700_000_000_000 + u64::from(i)))
        .collect();
    assert_eq!(store.store(&records), 10);
    assert_eq!(store.dedup_len(), 16 + 4 * 8);
    assert_eq!(store.store(&records[6..]), 0);
    store.window = 2;
    assert_eq!(store.store(&records[8..]), 0);
    assert_eq!(store.dedup_len(), 16 + 2 * 8, "a shrink keeps the newest 2");
    store.window = 6;
    assert_eq!(store.store(&records[8..]), 0);
    let more: Vec<AvlRecord> = (11..=13)
        .map(|i| record(i, 1_700_000_000_000 + u64::from(i)))
        .collect();
    assert_eq!(store.store(&more), 3);
    assert_eq!(store.store(&records[8..]), 0);
    assert_eq!(store.store(&more), 0);
    assert!(store.stored().values().all(|&n| n == 1));
    assert_eq!(store.stored().len(), 13);
}

/// A device moving between 0.1.0 listeners and current ones in the middle of a rolling
/// upgrade, its acks lost at every move: each record is stored once, whichever listener stored
/// it first and whichever gets the resend.
#[test]
fn the_upgrade_from_0_1_0_stores_each_record_once() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut store = Store::new(&server, "356307042441013", 128);
    let frame = |ids: std::ops::RangeInclusive<u16>| -> Vec<AvlRecord> {
        ids.map(|i| record(i, 1_700_000_000_000 + u64::from(i) * 1000))
            .collect()
    };
    // Stored by an old listener, the ack lost; resent to a new one.
    assert_eq!(store.store_legacy(&frame(1..=3)), 3);
    assert_eq!(store.store(&frame(1..=3)), 0);
    // Stored by the new one, the ack lost; resent to an old one (still running).
    assert_eq!(store.store(&frame(4..=6)), 3);
    assert_eq!(store.store_legacy(&frame(4..=6)), 0);
    // Re-packed: old and new records in one frame, to each version.
    assert_eq!(store.store_legacy(&frame(5..=8)), 2);
    assert_eq!(store.store(&frame(7..=10)), 2);
    assert_eq!(store.store_legacy(&frame(9..=11)), 1);
    // The rollout is over: no old listener has written for longer than the grace period. The
    // set's fingerprints move into the window and the set goes.
    store.age_legacy(LEGACY_DEDUP_GRACE_MS + 1000);
    assert_eq!(store.store(&frame(10..=12)), 1);
    assert!(
        !store.legacy_exists(),
        "the 0.1.0 set outlived the grace period"
    );
    // A record stored by an old listener before that is still caught, though newer than
    // anything the current script stored itself.
    assert_eq!(store.store(&frame(11..=11)), 0);
    assert_eq!(store.store(&frame(13..=14)), 2);
    let stored = store.stored();
    assert_eq!(stored.len(), 14);
    assert!(stored.values().all(|&n| n == 1), "stored twice: {stored:?}");
}

/// A fleet switching from the 0.1.0 script to the current one: devices land on old or new
/// listeners at random (more often new as the rollout goes on), a third of the acks are lost
/// and the frame is resent on the next connection, then the rollout ends and the grace period
/// passes. No record is lost or stored twice.
#[test]
fn a_fleet_rolling_from_0_1_0_loses_and_repeats_nothing() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let devices = 40u64;
    let rounds = 60u32;
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut fleet: Vec<(Store, Vec<AvlRecord>, u16)> = (0..devices)
        .map(|d| {
            let imei = format!("{}", 356_307_042_441_000 + d);
            (Store::new(&server, &imei, 128), Vec::new(), 0)
        })
        .collect();
    let mut sent = 0usize;
    for round in 0..rounds {
        for (store, unacked, next_id) in &mut fleet {
            let frame = if unacked.is_empty() {
                let n = 1 + (next() % 4) as u16;
                let first = *next_id + 1;
                *next_id += n;
                sent += usize::from(n);
                (first..=*next_id)
                    .map(|i| record(i, 1_700_000_000_000 + u64::from(i) * 1000))
                    .collect()
            } else {
                std::mem::take(unacked)
            };
            // The share of new listeners grows from 0 to 1 over the first 40 rounds.
            let on_new = (next() % 40) < u64::from(round);
            if on_new {
                store.store(&frame);
            } else {
                store.store_legacy(&frame);
            }
            if next() % 3 == 0 {
                *unacked = frame;
            }
        }
        if round == 45 {
            for (store, ..) in &mut fleet {
                if store.legacy_exists() {
                    store.age_legacy(LEGACY_DEDUP_GRACE_MS + 1000);
                }
            }
        }
    }
    // Every lost ack is resent once more, to a new listener.
    for (store, unacked, _) in &mut fleet {
        let frame = std::mem::take(unacked);
        store.store(&frame);
    }
    let mut stored = 0usize;
    for (store, _, next_id) in &mut fleet {
        let ids = store.stored();
        assert_eq!(ids.len(), usize::from(*next_id), "a record was lost");
        assert!(ids.values().all(|&n| n == 1), "stored twice: {ids:?}");
        assert!(!store.legacy_exists(), "a 0.1.0 set outlived the rollout");
        stored += ids.len();
    }
    assert_eq!(stored, sent);
}
