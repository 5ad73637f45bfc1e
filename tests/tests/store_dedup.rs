//! The store script against a real redis-server: its dedup window (property tests), and the
//! upgrade from trackgate 0.1.0's script (`tests/fixtures/store_readings_v1.lua`) with old and
//! new listeners storing for the same devices at once.

use std::collections::BTreeMap;

use proptest::prelude::*;
use redis::Commands;
use trackgate_api::redis_layout::{
    self as layout, LEGACY_DEDUP_GRACE_MS, STORE_READINGS_LUA, StoreArgs, StoreFrame,
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

fn fixed(imei: &Imei, window: u32, recv_ms: u64) -> StoreArgs<'_> {
    StoreArgs {
        max_len: 1_000_000,
        dedup_records: window,
        dedup_ttl_ms: TTL_MS,
        imei: imei.as_str(),
        codec: "8",
        port: 5027,
        recv_ms,
        protocol: "teltonika",
    }
}

/// One call of the current script for `frames` (devices of one partition), as the listener's
/// publisher makes it: how many records of each frame were new.
fn store_call(
    conn: &mut redis::Connection,
    prefix: &str,
    window: u32,
    frames: &[(&Imei, &[AvlRecord])],
) -> Vec<u32> {
    let settings = fixed(frames[0].0, window, 0).settings();
    let frames: Vec<StoreFrame> = frames
        .iter()
        .map(|(imei, records)| StoreFrame {
            keys: layout::store_keys(prefix, POOL, imei, PARTITIONS).into(),
            args: layout::store_args(&fixed(imei, window, 1_700_000_000_000), records),
        })
        .collect();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(STORE_READINGS_LUA);
    let refs: Vec<&StoreFrame> = frames.iter().collect();
    layout::store_call_args(&settings, &refs, |arg| {
        cmd.arg(arg);
    });
    let counts: Vec<u32> = cmd.query(conn).expect("store_readings");
    assert_eq!(counts.len(), frames.len(), "a count per frame");
    counts
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
        fixed(&self.imei, self.window, recv_ms)
    }

    /// The current script, as today's listener calls it for a frame alone: how many records
    /// were new.
    fn store(&mut self, records: &[AvlRecord]) -> u32 {
        let counts = store_call(
            &mut self.conn,
            PREFIX,
            self.window,
            &[(&self.imei, records)],
        );
        counts[0]
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

/// The frames a device sends for `steps`, each with how many of its records were never sent
/// before.
fn frames(steps: &[Step], window: usize) -> Vec<(Vec<AvlRecord>, usize)> {
    let mut sent: Vec<AvlRecord> = Vec::new();
    let mut ts: i64 = 1_700_000_000_000;
    let mut next_id: u16 = 0;
    let mut fresh_record = |ts: &mut i64, step: i64| {
        *ts += step;
        next_id += 1;
        record(next_id, u64::try_from(*ts).unwrap_or(0))
    };
    let mut frames = Vec::new();
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
        let mut new_in_frame = 0;
        for r in &frame {
            if !sent.iter().any(|s| s.speed == r.speed) {
                sent.push(r.clone());
                new_in_frame += 1;
            }
        }
        frames.push((frame, new_in_frame));
    }
    frames
}

/// Plays `steps` against the store, one frame per call: returns the records sent (by id, in
/// first-sent order).
fn play(store: &mut Store, steps: &[Step], window: usize) -> Vec<u16> {
    let mut sent = Vec::new();
    for (step, (frame, new_in_frame)) in steps.iter().zip(frames(steps, window)) {
        let stored = store.store(&frame);
        assert_eq!(
            stored as usize, new_in_frame,
            "frame {step:?}: {stored} stored, {new_in_frame} were new"
        );
        for r in frame {
            if !sent.contains(&r.speed) {
                sent.push(r.speed);
            }
        }
    }
    sent
}

/// Everything the store keeps under `prefix` for `imeis`: each partition's entries (without
/// their ids) and each device's window, byte for byte.
fn store_state(conn: &mut redis::Connection, prefix: &str, imeis: &[Imei]) -> Vec<Vec<u8>> {
    let mut state = Vec::new();
    for partition in 0..PARTITIONS {
        let key = layout::readings_key(prefix, POOL, partition);
        let entries: redis::streams::StreamRangeReply = conn.xrange_all(key).expect("xrange");
        for entry in entries.ids {
            let mut fields: Vec<(String, redis::Value)> = entry.map.into_iter().collect();
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            state.push(format!("{partition} {fields:?}").into_bytes());
        }
    }
    for imei in imeis {
        let key = &layout::store_keys(prefix, POOL, imei, PARTITIONS)[1];
        let window: Vec<u8> = conn.get(key).expect("get window");
        state.push(window);
    }
    state
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// A call of many frames, from several devices of one partition and with a device's
    /// consecutive frames in one call (a reconnect), stores exactly what the same frames
    /// called one at a time store: the same counts, the same entries in the same order, the
    /// same windows byte for byte.
    #[test]
    fn a_call_of_many_frames_stores_what_its_frames_store_one_by_one(
        window in 1u32..12,
        devices in proptest::collection::vec(proptest::collection::vec(step(), 1..10), 1..4),
        order in proptest::collection::vec(0usize..4, 0..30),
        calls in proptest::collection::vec(1usize..7, 1..30),
    ) {
        let Some(server) = RedisServer::start() else { return Ok(()) };
        let client = redis::Client::open(server.url()).expect("redis url");
        let mut conn = client.get_connection().expect("connect to redis");
        // IMEIs four apart share a partition.
        let imeis: Vec<Imei> = (0..devices.len() as u64)
            .map(|d| Imei::parse(&format!("{}", 356_307_042_441_013 + 4 * d)).expect("imei"))
            .collect();
        let mut pending: Vec<std::collections::VecDeque<(Vec<AvlRecord>, usize)>> = devices
            .iter()
            .map(|steps| frames(steps, window as usize).into())
            .collect();
        // The devices' frames interleaved as `order` says, then whatever is left.
        let mut sequence: Vec<(usize, Vec<AvlRecord>)> = Vec::new();
        let rest = (0..devices.len()).flat_map(|d| std::iter::repeat_n(d, 10));
        for d in order.into_iter().map(|d| d % devices.len()).chain(rest) {
            if let Some((frame, _)) = pending[d].pop_front() {
                sequence.push((d, frame));
            }
        }
        let one_by_one: Vec<u32> = sequence
            .iter()
            .flat_map(|(d, frame)| store_call(&mut conn, "alone", window, &[(&imeis[*d], frame)]))
            .collect();
        let mut together = Vec::new();
        let mut sizes = calls.into_iter().cycle();
        let mut at = 0;
        while at < sequence.len() {
            let end = (at + sizes.next().unwrap_or(1)).min(sequence.len());
            let call: Vec<(&Imei, &[AvlRecord])> = sequence[at..end]
                .iter()
                .map(|(d, frame)| (&imeis[*d], frame.as_slice()))
                .collect();
            together.extend(store_call(&mut conn, "together", window, &call));
            at = end;
        }
        prop_assert_eq!(&together, &one_by_one);
        prop_assert_eq!(
            store_state(&mut conn, "together", &imeis),
            store_state(&mut conn, "alone", &imeis)
        );
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
