//! The Redis contract (DESIGN.md's Redis layout) in one place: key names, the partition
//! function, the entry fields, the record fingerprint and the store script. The listener
//! writes by it; the simulator's verifier, the CLI and the tests read by it.
//!
//! Every key of one readings call carries the partition's hash tag `{<pool>:<n>}`, so the
//! store script touching the stream and the device's dedup set stays in one Redis Cluster
//! slot. Events and device state carry the pool's tag `{<pool>}`: one slot per pool.

use trackgate_protocol::{AvlRecord, Imei, IoValue, gt06};

// === readings ===

/// The fields a record contributes to its stream entry, in the order of
/// [`record_values`] and of the store script's `names`.
pub const RECORD_FIELDS: [&str; 10] = [
    "ts", "lat", "lon", "alt", "angle", "sats", "speed", "priority", "event", "io",
];

/// Entry field: the device's IMEI (15 digits).
pub const FIELD_IMEI: &str = "imei";
/// Entry field: the codec label (`8`, `8E`, `16`).
pub const FIELD_CODEC: &str = "codec";
/// Entry field: the listener port the frame arrived on.
pub const FIELD_PORT: &str = "port";
/// Entry field: server receive time, ms since the Unix epoch.
pub const FIELD_RECV: &str = "recv";

/// The store script: dedups frames' records against their devices' dedup windows and XADDs
/// the new ones, atomically; one call carries the frames of one readings partition.
/// [`store_call_args`] writes its `numkeys`, `KEYS` and `ARGV` (the whole layout is at the top
/// of the file). Runnable by hand with `redis-cli --eval api/src/store_readings.lua`.
pub const STORE_READINGS_LUA: &str = include_str!("store_readings.lua");

/// How long after a trackgate 0.1.0 listener last wrote a device's dedup set the store script
/// keeps reading and writing that set too (the upgrade path; see `store_readings.lua`). A
/// rolling upgrade is expected to finish well within it.
pub const LEGACY_DEDUP_GRACE_MS: u64 = 3_600_000;

/// What one store call's frame is made from.
#[derive(Debug, Clone, Copy)]
pub struct StoreArgs<'a> {
    /// `MAXLEN ~` of the readings stream.
    pub max_len: u64,
    /// Fingerprints kept per device (the dedup window, in records; at most 65,535).
    pub dedup_records: u32,
    /// Idle time after which the device's dedup window expires, ms.
    pub dedup_ttl_ms: u64,
    /// The device.
    pub imei: &'a str,
    /// Codec label; empty for a protocol without codecs (its empty values are left out).
    pub codec: &'a str,
    /// Listener port.
    pub port: u16,
    /// Server receive time, ms since the Unix epoch.
    pub recv_ms: u64,
    /// The `protocol` field (`teltonika`, `gt06`).
    pub protocol: &'a str,
}

impl StoreArgs<'_> {
    /// The part of these arguments a call carries once for all its frames.
    pub fn settings(&self) -> StoreSettings {
        StoreSettings {
            max_len: self.max_len,
            dedup_records: self.dedup_records.clamp(1, u32::from(u16::MAX)),
            dedup_ttl_ms: self.dedup_ttl_ms,
        }
    }
}

/// The `ARGV` a store call carries once, ahead of its frames: frames may share a call only when
/// these are equal (and their readings stream is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreSettings {
    /// `MAXLEN ~` of the readings stream.
    pub max_len: u64,
    /// The dedup window, in records (1 to 65,535).
    pub dedup_records: u32,
    /// Idle time after which a dedup window expires, ms.
    pub dedup_ttl_ms: u64,
}

/// Number of `ARGV` a call carries once ([`StoreSettings`] and [`LEGACY_DEDUP_GRACE_MS`]).
pub const STORE_CALL_ARGS: usize = 4;
/// Number of `ARGV` ahead of a frame's records: its record count, then the [`StoreArgs`] that
/// are not [`StoreSettings`]. Each record then takes [`STORE_ARGS_PER_RECORD`].
pub const STORE_FRAME_ARGS: usize = 6;
/// `ARGV` per record: its fingerprint and the [`RECORD_FIELDS`] values.
pub const STORE_ARGS_PER_RECORD: usize = 1 + RECORD_FIELDS.len();

/// Arguments packed in one buffer: a frame's are built once without a string per value, and
/// copied as they are into the command on every attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackedArgs {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl PackedArgs {
    fn with_capacity(records: usize) -> Self {
        Self {
            data: Vec::with_capacity(64 + 160 * records),
            ends: Vec::with_capacity(STORE_FRAME_ARGS + STORE_ARGS_PER_RECORD * records),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
        self.ends.push(self.data.len());
    }

    /// Starts a record with its fingerprint, unless `sent` (this frame's fingerprints so far)
    /// holds it: the script relies on distinct fingerprints per frame. `false`: skip the record.
    fn push_fingerprint(&mut self, sent: &mut Vec<u64>, fp: u64) -> bool {
        if sent.contains(&fp) {
            return false;
        }
        sent.push(fp);
        self.push(&fp.to_be_bytes());
        true
    }

    fn push_int(&mut self, value: impl itoa::Integer) {
        self.push(itoa::Buffer::new().format(value).as_bytes());
    }

    /// Number of arguments.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there is no argument.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The arguments in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.data[start..end])
    }
}

/// One device's frame, ready to go into a store call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFrame {
    /// [`store_keys`] of the device: the first is the call's readings stream. Shared: a
    /// session computes its device's keys once, not per frame.
    pub keys: std::sync::Arc<[String; 3]>,
    /// From [`store_args`] or [`gt06_store_args`].
    pub args: PackedArgs,
}

impl StoreFrame {
    /// Number of records in the frame (a record repeated within it counts once).
    pub fn records(&self) -> usize {
        self.args.len().saturating_sub(STORE_FRAME_ARGS - 1) / STORE_ARGS_PER_RECORD
    }

    /// The readings stream the frame's records go to.
    pub fn readings(&self) -> &str {
        &self.keys[0]
    }
}

/// Writes what follows the script in one store call (`numkeys`, `KEYS`, `ARGV`) for `frames`,
/// in order, one argument per call of `arg`; nothing for no frames. Every frame must have the
/// same readings stream (the first's is used): one partition, so one Redis Cluster slot.
pub fn store_call_args(
    settings: &StoreSettings,
    frames: &[&StoreFrame],
    mut arg: impl FnMut(&[u8]),
) {
    let Some(first) = frames.first() else {
        return;
    };
    let mut int = itoa::Buffer::new();
    arg(int.format(1 + 2 * frames.len()).as_bytes());
    arg(first.readings().as_bytes());
    for frame in frames {
        debug_assert_eq!(frame.readings(), first.readings(), "one partition per call");
        arg(frame.keys[1].as_bytes());
        arg(frame.keys[2].as_bytes());
    }
    arg(int.format(settings.max_len).as_bytes());
    arg(int.format(settings.dedup_records).as_bytes());
    arg(int.format(settings.dedup_ttl_ms).as_bytes());
    arg(int.format(LEGACY_DEDUP_GRACE_MS).as_bytes());
    for frame in frames {
        arg(int.format(frame.records()).as_bytes());
        for value in frame.args.iter() {
            arg(value);
        }
    }
}

/// A frame's part of a store call's `ARGV` for Teltonika records (after its record count, which
/// [`store_call_args`] writes). A record repeated within the frame is sent once (the script
/// relies on distinct fingerprints per frame).
pub fn store_args(fixed: &StoreArgs<'_>, records: &[AvlRecord]) -> PackedArgs {
    let mut args = frame_args(fixed, records.len());
    let mut sent = Vec::with_capacity(records.len());
    for record in records {
        if args.push_fingerprint(&mut sent, fingerprint(record)) {
            push_record_values(&mut args, record);
        }
    }
    args
}

/// [`store_args`] for GT06 locations: the same script and field names as Teltonika records;
/// the fields GT06 lacks (`alt`, `priority`, `event`) are left empty, so the script leaves them
/// out. Pass `codec: ""` and `protocol: "gt06"` in `fixed`.
pub fn gt06_store_args(fixed: &StoreArgs<'_>, locations: &[gt06::Location]) -> PackedArgs {
    let mut args = frame_args(fixed, locations.len());
    let mut sent = Vec::with_capacity(locations.len());
    for location in locations {
        if !args.push_fingerprint(&mut sent, location.fingerprint()) {
            continue;
        }
        let fields = location.fields();
        for name in RECORD_FIELDS {
            let value = fields
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str());
            args.push(value.unwrap_or_default().as_bytes());
        }
    }
    args
}

fn frame_args(fixed: &StoreArgs<'_>, records: usize) -> PackedArgs {
    let mut args = PackedArgs::with_capacity(records);
    args.push(fixed.imei.as_bytes());
    args.push(fixed.codec.as_bytes());
    args.push_int(fixed.port);
    args.push_int(fixed.recv_ms);
    args.push(fixed.protocol.as_bytes());
    args
}

/// The `ARGV` trackgate 0.1.0's store script took (`KEYS`: [`readings_key`], [`seen_key`]):
/// what a 0.1.0 listener sends during an upgrade, for the upgrade tests and the store
/// benchmark (`tests/fixtures/store_readings_v1.lua` is that script).
pub fn store_args_v1(fixed: &StoreArgs<'_>, records: &[AvlRecord]) -> Vec<String> {
    let mut args = vec![
        fixed.max_len.to_string(),
        fixed.dedup_records.to_string(),
        fixed.dedup_ttl_ms.to_string(),
        fixed.imei.to_owned(),
        fixed.codec.to_owned(),
        fixed.port.to_string(),
        fixed.recv_ms.to_string(),
        String::new(),
    ];
    for record in records {
        args.push(fingerprint_member(fingerprint(record)));
        args.extend(record_values(record));
    }
    args
}

/// The readings partition of a device: the IMEI's numeric value modulo `partitions`.
///
/// Plain arithmetic on purpose: a consumer in any language can compute it, and it never changes
/// between versions (a hash function from a crate could).
pub fn partition_of(imei: &Imei, partitions: u32) -> u32 {
    let value: u64 = imei.as_str().parse().unwrap_or(0);
    let partitions = u64::from(partitions.max(1));
    u32::try_from(value % partitions).unwrap_or(0)
}

/// `<prefix>:{<pool>:<n>}:readings`.
pub fn readings_key(prefix: &str, pool: &str, partition: u32) -> String {
    format!("{prefix}:{{{pool}:{partition}}}:readings")
}

/// `<prefix>:{<pool>:<n>}:dedup:<imei>`: the device's dedup window (a string: a 16-byte header
/// and a ring of 8-byte fingerprints, see `store_readings.lua`), in the same hash slot as the
/// device's readings stream.
pub fn dedup_key(prefix: &str, pool: &str, partition: u32, imei: &str) -> String {
    format!("{prefix}:{{{pool}:{partition}}}:dedup:{imei}")
}

/// `<prefix>:{<pool>:<n>}:seen:<imei>`: the dedup window of trackgate 0.1.0 (a sorted set of
/// [`fingerprint_member`]s), read and kept up to date by the store script only while a 0.1.0
/// listener may still serve the device.
pub fn seen_key(prefix: &str, pool: &str, partition: u32, imei: &str) -> String {
    format!("{prefix}:{{{pool}:{partition}}}:seen:{imei}")
}

/// The store script's `KEYS` for a device: [`readings_key`], [`dedup_key`], [`seen_key`].
pub fn store_keys(prefix: &str, pool: &str, imei: &Imei, partitions: u32) -> [String; 3] {
    let partition = partition_of(imei, partitions);
    [
        readings_key(prefix, pool, partition),
        dedup_key(prefix, pool, partition, imei.as_str()),
        seen_key(prefix, pool, partition, imei.as_str()),
    ]
}

/// A fingerprint as the member of [`seen_key`]'s set: 16 lowercase hex digits.
pub fn fingerprint_member(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// The values a record contributes to its entry, in [`RECORD_FIELDS`] order.
///
/// `lat`/`lon` are the wire integer / 10^7 with exactly 7 decimals (`54.6872345`,
/// `-3.1000000`), so no float rounding ever changes a stored coordinate. `io` is
/// [`io_json`]. (The listener adds `imei`, `codec`, `port` and `recv`.)
pub fn record_values(record: &AvlRecord) -> [String; 10] {
    let packed = record_values_packed(record);
    let mut values = packed
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned());
    std::array::from_fn(|_| values.next().unwrap_or_default())
}

/// [`record_values`] packed in one buffer (two allocations instead of ten): what the store
/// call carries, for a caller that only reads the bytes.
pub fn record_values_packed(record: &AvlRecord) -> PackedArgs {
    let mut args = PackedArgs::with_capacity(1);
    push_record_values(&mut args, record);
    args
}

/// The one place a record's values are written (integers with itoa: no `core::fmt` machinery
/// on the per-record path).
fn push_record_values(args: &mut PackedArgs, record: &AvlRecord) {
    args.push_int(record.timestamp_ms);
    push_degrees(args, record.latitude);
    push_degrees(args, record.longitude);
    args.push_int(record.altitude);
    args.push_int(record.angle);
    args.push_int(record.satellites);
    args.push_int(record.speed);
    args.push_int(record.priority);
    args.push_int(record.event_id);
    write_io_json(record, &mut args.data);
    args.ends.push(args.data.len());
}

/// The record's fields as `(name, value)` pairs, in [`RECORD_FIELDS`] order.
pub fn record_fields(record: &AvlRecord) -> impl Iterator<Item = (&'static str, String)> {
    RECORD_FIELDS.into_iter().zip(record_values(record))
}

/// The `io` field: a JSON object in wire order, IO id as a string → unsigned integer, or a
/// lowercase hex string for variable-length values: `{"239":1,"256":"575657"}`.
pub fn io_json(record: &AvlRecord) -> String {
    let mut out = Vec::with_capacity(2 + record.io.len() * 12);
    write_io_json(record, &mut out);
    // Only ASCII is written.
    String::from_utf8(out).unwrap_or_default()
}

fn write_io_json(record: &AvlRecord, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut int = itoa::Buffer::new();
    out.push(b'{');
    for (i, e) in record.io.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(int.format(e.id).as_bytes());
        out.extend_from_slice(b"\":");
        match &e.value {
            IoValue::Var(bytes) => {
                out.push(b'"');
                for b in bytes {
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
                out.push(b'"');
            }
            fixed => {
                out.extend_from_slice(int.format(fixed.as_u64().unwrap_or_default()).as_bytes());
            }
        }
    }
    out.push(b'}');
}

/// A deterministic 64-bit hash of every field of a record (FNV-1a; no per-process random
/// seed), the same for the same record whichever frame or codec carried it: the dedup key for
/// records a device resends after a lost ack. Stored records' fingerprints depend on it, so it
/// never changes (pinned by a test).
pub fn fingerprint(record: &AvlRecord) -> u64 {
    let mut h = Fnv::new();
    h.write(&record.timestamp_ms.to_be_bytes());
    h.write(&[record.priority]);
    h.write(&record.longitude.to_be_bytes());
    h.write(&record.latitude.to_be_bytes());
    h.write(&record.altitude.to_be_bytes());
    h.write(&record.angle.to_be_bytes());
    h.write(&[record.satellites]);
    h.write(&record.speed.to_be_bytes());
    h.write(&record.event_id.to_be_bytes());
    match record.generation_type {
        Some(g) => h.write(&[1, g]),
        None => h.write(&[0]),
    }
    h.write(&(record.io.len() as u64).to_be_bytes());
    for e in &record.io {
        h.write(&e.id.to_be_bytes());
        // The width is hashed so that U8(1) and U16(1) differ, and Var values are
        // length-prefixed so that adjacent values cannot run together.
        h.write(&(e.value.width() as u64).to_be_bytes());
        match &e.value {
            IoValue::Var(b) => {
                h.write(&[4]);
                h.write(b);
            }
            fixed => {
                h.write(&[0]);
                h.write(&fixed.as_u64().unwrap_or_default().to_be_bytes());
            }
        }
    }
    h.finish()
}

/// `value / 10^7` with exactly seven decimals, sign included (`-0.5000000`).
#[cfg(test)]
fn degrees(value: i32) -> String {
    let mut args = PackedArgs::default();
    push_degrees(&mut args, value);
    String::from_utf8(args.data).unwrap_or_default()
}

fn push_degrees(args: &mut PackedArgs, value: i32) {
    let abs = i64::from(value).unsigned_abs();
    if value < 0 {
        args.data.push(b'-');
    }
    args.data
        .extend_from_slice(itoa::Buffer::new().format(abs / 10_000_000).as_bytes());
    args.data.push(b'.');
    // Seven digits, zero-padded: 10^7 + the fraction, less its leading 1.
    let mut fraction = itoa::Buffer::new();
    args.push(&fraction.format(10_000_000 + abs % 10_000_000).as_bytes()[1..]);
}

/// FNV-1a, 64-bit: tiny, fast on short inputs, and stable across processes and versions.
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Self {
        Fnv(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

// === servers ===

/// The URL scheme suffix that selects a Redis Cluster: `redis+cluster://`,
/// `rediss+cluster://`.
pub const CLUSTER_SCHEME_SUFFIX: &str = "+cluster";

/// The seed node URLs of a cluster URL, `None` for a one-server URL (`redis://`, `rediss://`).
///
/// A cluster URL names one or more seed nodes, comma-separated, with the credentials and
/// query given once: `redis+cluster://user:pass@10.0.0.1:6379,10.0.0.2:6379/` gives
/// `redis://user:pass@10.0.0.1:6379/` and `redis://user:pass@10.0.0.2:6379/`. The cluster's
/// other nodes are discovered from them.
///
/// # Errors
/// A cluster URL without a host.
pub fn cluster_nodes(url: &str) -> Result<Option<Vec<String>>, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(None);
    };
    let Some(base) = scheme.strip_suffix(CLUSTER_SCHEME_SUFFIX) else {
        return Ok(None);
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (format!("{user}@"), hosts),
        None => (String::new(), authority),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|host| format!("{base}://{userinfo}{host}/{path}"))
        .collect();
    if nodes.is_empty() {
        return Err("a cluster URL needs at least one host:port".to_owned());
    }
    Ok(Some(nodes))
}

/// The least-privilege ACL rules of a listener's Redis user for key `prefix`: the commands it
/// sends (the store script's own commands included: scripts run under the caller's ACL) and
/// its keys, nothing else. `ACL SETUSER <user> on ><password> <rules>`.
///
/// - `evalsha`/`eval`: the store script (`eval` reloads it after a restart or failover);
///   inside it `getrange`, `setrange`, `set`, `pexpire`, `xadd`, and for the 0.1.0 dedup sets
///   `pttl`, `zscore`, `zrange`, `zremrangebyrank`, `zadd`, `del`;
/// - `xadd`, `hset`: events and device state;
/// - `wait`: the `replicas` mode (add [`WAITAOF_ACL`] on servers that have `WAITAOF`, for the
///   `fsync` modes); `ping`, `info`: readiness and the check that the server can keep the
///   durability promise;
/// - `cluster|slots`, `cluster|nodes`, `cluster|shards`, `asking`, `readonly`: the cluster
///   client's topology reads and redirects (harmless on one server);
/// - commands to devices, from the listener: `xgroup|create`, `xreadgroup`, `xautoclaim`,
///   `subscribe` (channels under the prefix), `hmset` (pool members), `script|load`; inside
///   its scripts: `time`, `exists`, `get`, `set`, `del`, `hget`, `hmget`, `hexists`, `hdel`,
///   `lpush`, `rpush`, `lpop`, `lrange`, `lrem`, `zcard`, `zrangebyscore`, `zrem`, `xack`,
///   `publish`.
pub fn listener_acl(prefix: &str) -> String {
    format!(
        "resetkeys ~{prefix}:* resetchannels &{prefix}:* -@all \
         +evalsha +eval +getrange +setrange +pttl +zscore +zrange +zremrangebyrank +xadd \
         +zadd +pexpire +hset \
         +wait +ping +info \
         +cluster|slots +cluster|nodes +cluster|shards +asking +readonly \
         +xgroup|create +xreadgroup +xautoclaim +subscribe +hmset +script|load \
         +time +exists +get +set +del +hget +hmget +hexists +hdel +lpush +rpush +lpop +lrange \
         +lrem +zcard +zrangebyscore +zrem +xack +publish"
    )
}

/// The rule [`listener_acl`] needs for the `fsync` durability modes on Redis >= 7.2 and Valkey
/// (older servers refuse a rule for a command they do not know).
pub const WAITAOF_ACL: &str = "+waitaof";

// === side writes ===

/// `<prefix>:{<pool>}:events`: connect, login accepted/refused, disconnect, decode error,
/// command responses.
pub fn events_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:events")
}

/// `<prefix>:{<pool>}:devices`: a hash, field = IMEI, value = JSON device state.
pub fn devices_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:devices")
}

// === commands ===
//
// The cloud-to-device path. A service `XADD`s to the pool's command stream; a listener of the
// pool routes each entry (consumer group [`COMMANDS_GROUP`]) to the device's queue; the
// listener holding the device's session sends it and records the answer in the responses
// stream and the command's status hash. docs/architecture.md "Commands to devices" has the
// state machine, docs/operations.md the consumer's view.

/// `<prefix>:{<pool>}:commands`: the stream services `XADD` commands to
/// (fields in [`command_field`]).
pub fn commands_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:commands")
}

/// `<prefix>:{<pool>}:responses`: the durable stream of every status change of every command
/// (`queued`, `sent`, then one final status), with the device's answer.
pub fn command_responses_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:responses")
}

/// `<prefix>:{<pool>}:command:<id>`: a hash with the command's current status, for lookup by
/// id; it expires [`COMMAND_STATUS_RETENTION_SECONDS`] after the command's final status.
pub fn command_status_key(prefix: &str, pool: &str, id: &str) -> String {
    format!("{prefix}:{{{pool}}}:command:{id}")
}

/// `<prefix>:{<pool>}:cmdqueue:<imei>`: a list, the device's commands not yet taken, oldest
/// first (each a JSON object `{"id","codec","payload","expires"}`, payload in hex).
pub fn command_queue_key(prefix: &str, pool: &str, imei: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdqueue:{imei}")
}

/// `<prefix>:{<pool>}:cmdinflight:<imei>`: a hash, the device's one outstanding command and
/// the lease of the listener that took it (`id`, `body`, `owner`, `deadline`, `sent`).
pub fn command_inflight_key(prefix: &str, pool: &str, imei: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdinflight:{imei}")
}

/// `<prefix>:{<pool>}:cmddeadlines`: a sorted set of every command without a final status,
/// scored by its expiry (ms since the epoch): the sweeper's index and the queue depth.
pub fn command_deadlines_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmddeadlines")
}

/// `<prefix>:{<pool>}:members`: a hash, IMEI → shard index, of every device in the pool's
/// shard configs (written by the listeners): how a command for an unknown IMEI fails at once.
pub fn pool_members_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:members")
}

/// The members field of a pool with open admission: every well-formed IMEI is a member.
pub const ANY_MEMBER: &str = "*";

/// `<prefix>:{<pool>}:cmdready`: the Pub/Sub channel on which an IMEI is published when it has
/// a command to take (routed, or the previous one resolved). A wake-up only: listeners also
/// look at every device they hold after (re)subscribing, so a lost message delays nothing
/// beyond that.
pub fn command_ready_channel(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdready")
}

/// `<prefix>:{<pool>}:cmdrouter`: the routing lease, a string holding the listener that routes
/// the pool's commands now. One router per pool keeps each device's commands in stream order.
pub fn command_router_key(prefix: &str, pool: &str) -> String {
    format!("{prefix}:{{{pool}}}:cmdrouter")
}

/// The consumer group of the command stream (one per pool; its consumer is the router of the
/// moment, and a new router claims what the last one left unrouted).
pub const COMMANDS_GROUP: &str = "trackgate-router";

/// A command's time to live when its entry gives none.
pub const DEFAULT_COMMAND_TTL_SECONDS: u64 = 3600;
/// The longest time to live accepted (a week: longer is a configuration, not a command).
pub const MAX_COMMAND_TTL_SECONDS: u64 = 7 * 24 * 3600;
/// How long a command's status hash outlives its final status.
pub const COMMAND_STATUS_RETENTION_SECONDS: u64 = 24 * 3600;
/// Largest command payload accepted. NB: Teltonika documents no limit for GPRS commands; the
/// longest in use (`setparam` lists) stay well under 1 KB, and the device's answer frame must
/// fit the listener's frame limit anyway.
pub const MAX_COMMAND_BYTES: usize = 1024;
/// Longest command id accepted (ids are part of a key name).
pub const MAX_COMMAND_ID_LEN: usize = 128;

/// Field names of the command stream, the responses stream and the status hash.
pub mod command_field {
    /// The command's id, chosen by the producer (the stream entry id when absent).
    pub const ID: &str = "id";
    /// The device's IMEI (15 digits).
    pub const IMEI: &str = "imei";
    /// The command as text, e.g. `getinfo` (sent as its bytes).
    pub const COMMAND: &str = "command";
    /// Or the raw payload in hex (exactly one of `command` and `payload`).
    pub const PAYLOAD: &str = "payload";
    /// `12` (default) or `14` (the device refuses a command carrying another IMEI).
    pub const CODEC: &str = "codec";
    /// Time to live in seconds (default [`super::DEFAULT_COMMAND_TTL_SECONDS`]).
    pub const TTL: &str = "ttl";
    /// One of [`super::CommandStatus`].
    pub const STATUS: &str = "status";
    /// Why a command `failed` or `expired` (one of [`super::CommandReason`]).
    pub const REASON: &str = "reason";
    /// The device's answer as text (when it is UTF-8).
    pub const ANSWER: &str = "answer";
    /// The device's answer in hex (always, when answered).
    pub const ANSWER_HEX: &str = "answer_hex";
    /// When the status was recorded (ms since the epoch, Redis time).
    pub const TS: &str = "ts";
}

/// A command's status. `queued` and `sent` are transient; the others are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// Routed to the device's queue.
    Queued,
    /// Written to the device's connection; waiting for the answer.
    Sent,
    /// The device answered (Codec 12/14 type 0x06).
    Answered,
    /// The time to live passed before it could be sent.
    Expired,
    /// Not delivered or not answered; see [`CommandReason`].
    Failed,
}

impl CommandStatus {
    /// Every status, for metrics and parsing.
    pub const ALL: [CommandStatus; 5] = [
        CommandStatus::Queued,
        CommandStatus::Sent,
        CommandStatus::Answered,
        CommandStatus::Expired,
        CommandStatus::Failed,
    ];

    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Queued => "queued",
            CommandStatus::Sent => "sent",
            CommandStatus::Answered => "answered",
            CommandStatus::Expired => "expired",
            CommandStatus::Failed => "failed",
        }
    }

    /// Parses a wire value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == s)
    }

    /// True for `answered`, `expired` and `failed`.
    pub fn is_final(self) -> bool {
        !matches!(self, CommandStatus::Queued | CommandStatus::Sent)
    }
}

/// Why a command failed or expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandReason {
    /// Codec 14: the device answered 0x11 (the command carried another IMEI).
    Refused,
    /// Sent, and no answer within the listener's response timeout.
    Timeout,
    /// The device was offline (or busy) until the time to live passed (status `expired`).
    Ttl,
    /// The entry or the device's answer could not be read.
    Malformed,
    /// The payload is longer than [`MAX_COMMAND_BYTES`].
    TooLarge,
    /// The IMEI is not a device of the pool.
    UnknownImei,
}

impl CommandReason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandReason::Refused => "refused",
            CommandReason::Timeout => "timeout",
            CommandReason::Ttl => "ttl",
            CommandReason::Malformed => "malformed",
            CommandReason::TooLarge => "too_large",
            CommandReason::UnknownImei => "unknown_imei",
        }
    }
}

#[cfg(test)]
mod tests {
    use trackgate_protocol::IoElement;

    use super::*;

    fn rec() -> AvlRecord {
        AvlRecord {
            timestamp_ms: 1_560_161_086_000,
            priority: 1,
            longitude: -31_000_000,
            latitude: 546_872_345,
            altitude: 120,
            angle: 90,
            satellites: 7,
            speed: 42,
            event_id: 239,
            generation_type: None,
            io: vec![
                IoElement {
                    id: 239,
                    value: IoValue::U8(1),
                },
                IoElement {
                    id: 72,
                    value: IoValue::U32(4_294_967_294),
                },
                IoElement {
                    id: 256,
                    value: IoValue::Var(vec![0x57, 0x0a].into()),
                },
            ],
        }
    }

    #[test]
    fn keys_carry_the_partition_hash_tag() {
        assert_eq!(
            readings_key("trackgate", "fleet", 3),
            "trackgate:{fleet:3}:readings"
        );
        assert_eq!(
            seen_key("trackgate", "fleet", 3, "356307042441013"),
            "trackgate:{fleet:3}:seen:356307042441013"
        );
        assert_eq!(
            dedup_key("trackgate", "fleet", 3, "356307042441013"),
            "trackgate:{fleet:3}:dedup:356307042441013"
        );
        assert_eq!(fingerprint_member(0xab), "00000000000000ab");
        assert_eq!(events_key("tg", "fleet"), "tg:{fleet}:events");
        assert_eq!(devices_key("tg", "fleet"), "tg:{fleet}:devices");
    }

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        assert_eq!(cluster_nodes("redis://127.0.0.1:6379/"), Ok(None));
        assert_eq!(
            cluster_nodes("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/"),
            Ok(Some(vec![
                "redis://u:p@10.0.0.1:7000/".to_owned(),
                "redis://u:p@10.0.0.2:7001/".to_owned()
            ]))
        );
        assert_eq!(
            cluster_nodes("rediss+cluster://node:7000"),
            Ok(Some(vec!["rediss://node:7000/".to_owned()]))
        );
        assert!(cluster_nodes("redis+cluster:///").is_err());
    }

    #[test]
    fn partition_is_the_imei_modulo_partitions() {
        let imei = Imei::parse("356307042441013").unwrap();
        assert_eq!(partition_of(&imei, 4), (356_307_042_441_013u64 % 4) as u32);
        assert_eq!(partition_of(&imei, 1), 0);
        assert_eq!(partition_of(&imei, 0), 0);
    }

    #[test]
    fn fields_follow_the_redis_contract() {
        let f: Vec<_> = record_fields(&rec()).collect();
        let names: Vec<_> = f.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, RECORD_FIELDS);
        assert_eq!(f[0].1, "1560161086000");
        assert_eq!(f[1].1, "54.6872345");
        assert_eq!(f[2].1, "-3.1000000");
        assert_eq!(f[9].1, r#"{"239":1,"72":4294967294,"256":"570a"}"#);
    }

    #[test]
    fn degrees_edges() {
        assert_eq!(degrees(0), "0.0000000");
        assert_eq!(degrees(-5_000_000), "-0.5000000");
        assert_eq!(degrees(1_800_000_000), "180.0000000");
        assert_eq!(degrees(i32::MIN), "-214.7483648");
    }

    #[test]
    fn fingerprint_is_stable_and_sensitive() {
        let a = rec();
        // Pinned: a change here would break dedup against records already stored.
        assert_eq!(fingerprint(&a), 0x0545_1be8_7c41_fa7e);
        let mut b = a.clone();
        b.io[0].value = IoValue::U16(1);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let mut c = a.clone();
        c.timestamp_ms += 1;
        assert_ne!(fingerprint(&a), fingerprint(&c));
        let mut d = a.clone();
        d.generation_type = Some(0);
        assert_ne!(fingerprint(&a), fingerprint(&d));
    }

    #[test]
    fn the_script_writes_the_fields_of_this_module() {
        let names = RECORD_FIELDS
            .iter()
            .map(|f| format!("'{f}'"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(
            STORE_READINGS_LUA.contains(&format!("local names = {{{names}}}")),
            "store_readings.lua's names differ from RECORD_FIELDS"
        );
        for field in [FIELD_IMEI, FIELD_CODEC, FIELD_PORT, FIELD_RECV] {
            assert!(
                STORE_READINGS_LUA.contains(&format!("'{field}'")),
                "{field}"
            );
        }
        // Where the script finds a call's first frame, a frame's records and the next frame.
        let (fixed, per) = (STORE_FRAME_ARGS, STORE_ARGS_PER_RECORD);
        for layout in [
            format!("local stored, a = {{}}, {}", STORE_CALL_ARGS + 1),
            format!(
                "local first, last = a + {fixed}, a + {} + {per} * n",
                fixed - 1
            ),
            "a = last + 1".to_owned(),
            format!("for r = first, last, {per} do"),
        ] {
            assert!(STORE_READINGS_LUA.contains(&layout), "{layout}");
        }
        // The spelled-out XADD of frames with a codec names every field, in the same order.
        let spelled: Vec<String> = RECORD_FIELDS
            .into_iter()
            .chain([FIELD_CODEC, "protocol", FIELD_PORT, FIELD_RECV])
            .map(|f| format!("'{f}'"))
            .collect();
        let xadd = STORE_READINGS_LUA
            .split("xadd('imei'")
            .nth(1)
            .unwrap_or_default();
        let mut at = 0;
        for field in &spelled {
            let found = xadd[at..].find(field.as_str());
            assert!(found.is_some(), "{field} missing from the spelled-out XADD");
            at += found.unwrap_or_default();
        }
    }

    #[test]
    fn a_store_call_is_keys_settings_then_each_frame_with_its_record_count() {
        let fixed = StoreArgs {
            max_len: 10,
            dedup_records: 128,
            dedup_ttl_ms: 1000,
            imei: "356307042441013",
            codec: "8E",
            port: 5027,
            recv_ms: 7,
            protocol: "teltonika",
        };
        let imei = Imei::parse(fixed.imei).expect("imei");
        let mut other = rec();
        other.timestamp_ms += 1000;
        // The repeated record is sent once.
        let first = StoreFrame {
            keys: store_keys("tg", "fleet", &imei, 4).into(),
            args: store_args(&fixed, &[rec(), rec(), other.clone()]),
        };
        assert_eq!(first.records(), 2);
        let second = StoreFrame {
            keys: store_keys("tg", "fleet", &imei, 4).into(),
            args: store_args(
                &StoreArgs {
                    recv_ms: 8,
                    ..fixed
                },
                &[],
            ),
        };
        assert_eq!(second.records(), 0);
        let mut args: Vec<Vec<u8>> = Vec::new();
        store_call_args(&fixed.settings(), &[&first, &second], |a| {
            args.push(a.to_vec())
        });
        let (readings, dedup, seen) = (
            "tg:{fleet:1}:readings",
            "tg:{fleet:1}:dedup:356307042441013",
            "tg:{fleet:1}:seen:356307042441013",
        );
        let head: Vec<&[u8]> = vec![
            b"5",
            readings.as_bytes(),
            dedup.as_bytes(),
            seen.as_bytes(),
            dedup.as_bytes(),
            seen.as_bytes(),
            b"10",
            b"128",
            b"1000",
            b"3600000",
            b"2",
            b"356307042441013",
            b"8E",
            b"5027",
            b"7",
            b"teltonika",
        ];
        assert_eq!(args[..head.len()], head[..]);
        let records = head.len();
        assert_eq!(args[records], 0x0545_1be8_7c41_fa7e_u64.to_be_bytes());
        // The values are record_values, byte for byte.
        for (record, at) in [(rec(), records), (other, records + STORE_ARGS_PER_RECORD)] {
            let values = record_values(&record);
            for (j, value) in values.iter().enumerate() {
                assert_eq!(args[at + 1 + j], value.as_bytes(), "{}", RECORD_FIELDS[j]);
            }
        }
        let tail: Vec<&[u8]> = vec![b"0", b"356307042441013", b"8E", b"5027", b"8", b"teltonika"];
        assert_eq!(args[records + 2 * STORE_ARGS_PER_RECORD..], tail[..]);
    }

    /// GT06 entries spell the names they share with Teltonika entries the same (the GT06
    /// mapping lives beside its codec, in the sans-io crate, which cannot see this module).
    #[test]
    fn gt06_fields_share_the_teltonika_names() {
        for name in &trackgate_protocol::gt06::FIELDS[1..] {
            assert!(RECORD_FIELDS.contains(name), "{name}");
        }
    }

    #[test]
    fn command_keys_share_the_pool_hash_tag() {
        assert_eq!(commands_key("tg", "fleet"), "tg:{fleet}:commands");
        assert_eq!(command_responses_key("tg", "fleet"), "tg:{fleet}:responses");
        assert_eq!(
            command_status_key("tg", "fleet", "c1"),
            "tg:{fleet}:command:c1"
        );
        assert_eq!(
            command_queue_key("tg", "fleet", "356307042441013"),
            "tg:{fleet}:cmdqueue:356307042441013"
        );
        assert_eq!(
            command_inflight_key("tg", "fleet", "356307042441013"),
            "tg:{fleet}:cmdinflight:356307042441013"
        );
        assert_eq!(
            command_deadlines_key("tg", "fleet"),
            "tg:{fleet}:cmddeadlines"
        );
        assert_eq!(pool_members_key("tg", "fleet"), "tg:{fleet}:members");
        assert_eq!(command_router_key("tg", "fleet"), "tg:{fleet}:cmdrouter");
        assert_eq!(command_ready_channel("tg", "fleet"), "tg:{fleet}:cmdready");
    }

    /// docs/operations.md shows the ACL a platform team types: it must be this one.
    #[test]
    fn the_documented_acl_is_the_listeners() {
        let docs = include_str!("../../docs/operations.md");
        let block = docs
            .split("ACL SETUSER trackgate-listener on >PASSWORD ")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap_or_default();
        let documented: Vec<&str> = block.split_whitespace().filter(|t| *t != "\\").collect();
        let acl = listener_acl("trackgate");
        let rules: Vec<&str> = acl.split_whitespace().collect();
        assert_eq!(
            documented, rules,
            "docs/operations.md's ACL differs from listener_acl"
        );
    }

    #[test]
    fn statuses_round_trip() {
        for status in CommandStatus::ALL {
            assert_eq!(CommandStatus::parse(status.as_str()), Some(status));
        }
        assert!(CommandStatus::Answered.is_final());
        assert!(!CommandStatus::Sent.is_final());
        assert_eq!(CommandStatus::parse("done"), None);
    }
}
