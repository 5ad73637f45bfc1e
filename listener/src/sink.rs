//! The Redis Streams publisher — with `command::store` (the command path's own connections),
//! the only module that knows Redis.
//!
//! ```text
//!  session ─┐ StoreCall + oneshot        ┌─ EVALSHA store_readings (per partition) ─┐
//!  session ─┼──► bounded mpsc ──► publisher task: one pipeline per batch ───────────►│ Redis
//!  udp     ─┘  events / device state (try_send, best effort) ─── XADD / HSET ───────┘
//! ```
//!
//! Records from every connection are batched: the publisher takes what is queued (up to
//! [`MAX_BATCH_CALLS`] frames) and sends it as one pipeline, with one script call for up to 16
//! frames of one readings partition, so a busy listener makes one round trip and few calls for
//! many frames. While Redis has two pipelines of work queued, a few frames wait for one of
//! them rather than take a pipeline of their own (`publisher.rs`). The script answers each
//! frame on its own; each session awaits its own frame's result and acks only on `Ok`.
//!
//! Dedup is atomic with the XADD: the `store_readings` script checks each record's
//! fingerprint against the device's dedup window (`<prefix>:{<pool>:<n>}:dedup:<imei>`, a
//! string: a header with the newest `ts` stored and a ring of the newest `dedup_records`
//! fingerprints), XADDs the records not in it and remembers them. A record newer than anything
//! the device stored is new without a lookup. Every key shares the partition's hash tag, so the
//! script is valid on Redis Cluster. The XADDs come before the window is written: a failing
//! XADD aborts the script before its fingerprint is remembered, so a remembered record is
//! always in the stream.
//!
//! NB: the window is the device's last N records, not a time span. A Teltonika device sends
//! one frame and waits for its ack, so a record that was stored but not acked is always among
//! the newest records of that device when it comes back, however long the device was away.
//! Bounding by count makes the cost per device fixed (1,368 B per device at N = 128, by `MEMORY USAGE`) instead of growing
//! with traffic: one marker key per record with a TTL costs ~150 B per record (the same as the
//! stream entry itself), i.e. gigabytes per day for a large fleet. The window expires
//! `dedup_ttl` after the device's last stored record, so removed devices leave nothing behind.
//! The script's own header has the layout, and the upgrade from 0.1.0's sorted sets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Cmd, Script};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use trackgate_api::Durability;
use trackgate_api::redis_layout::{
    self as layout, STORE_READINGS_LUA, StoreArgs, StoreFrame, StoreSettings,
};
use trackgate_protocol::{AvlRecord, Codec, Imei};
use trackgate_telemetry::Health;

use crate::command::PoolKeys;
use crate::error::{PublishError, StartError};
use crate::metrics::Metrics;
use crate::publisher::{Batcher, DURABILITY_READY, Publisher, REDIS_READY, run_side_writes};
use crate::redis_conn::RedisConn;

/// Most frames in one pipeline: large enough to amortise the round trip, small enough that
/// one slow batch does not hold hundreds of acks.
pub const MAX_BATCH_CALLS: usize = 256;
/// Queue in front of the publisher. Sessions wait here when Redis is slower than the devices;
/// the in-flight byte cap is the real memory bound.
const QUEUE_DEPTH: usize = 4 * MAX_BATCH_CALLS;
/// Best-effort writes (events, device state) queued at most; beyond that they are dropped and
/// counted rather than slowing the data path.
const SIDE_QUEUE_DEPTH: usize = 4096;
/// `MAXLEN ~` of the events stream.
const EVENTS_MAX_LEN: u64 = 100_000;

/// Publisher settings.
#[derive(Clone, Debug)]
pub(crate) struct SinkOptions {
    pub(crate) redis_url: String,
    pub(crate) redis_tls: crate::redis_conn::RedisTlsFiles,
    pub(crate) pod: String,
    pub(crate) response_timeout: Duration,
    pub(crate) max_inflight_bytes: usize,
    pub(crate) dedup_records: u32,
    pub(crate) dedup_ttl: Duration,
    pub(crate) heartbeat_max_silence: Duration,
    /// Durability of the shards configured at start (checked before the first frame).
    pub(crate) durability: Vec<Durability>,
}

/// Where one shard's data goes (from its config's `redis` section).
#[derive(Clone, Debug)]
pub(crate) struct ShardKeys {
    pub(crate) prefix: String,
    pub(crate) pool: String,
    pub(crate) partitions: u32,
    pub(crate) max_len: u64,
    pub(crate) durability: Durability,
    /// The pool's command keys.
    pub(crate) commands: Arc<PoolKeys>,
}

impl ShardKeys {
    pub(crate) fn new(config: &trackgate_api::ShardConfig) -> Self {
        Self {
            prefix: config.redis.stream_prefix.clone(),
            pool: config.pool.clone(),
            partitions: config.redis.partitions,
            max_len: config.redis.max_len,
            durability: config.redis.durability,
            commands: Arc::new(PoolKeys::new(
                &config.redis.stream_prefix,
                &config.pool,
                config.redis.max_len,
            )),
        }
    }
}

/// The `protocol` field of Teltonika entries (GT06's is `trackgate_protocol::gt06::PROTOCOL`).
const TELTONIKA: &str = "teltonika";

/// One frame's records, ready to send (kept for retries: same keys, same `recv`).
#[derive(Debug)]
pub(crate) struct StoreCall {
    pub(crate) frame: StoreFrame,
    pub(crate) settings: StoreSettings,
    pub(crate) durability: Durability,
}

impl StoreCall {
    /// Number of records in the call (a record repeated within the frame counts once).
    #[cfg(test)]
    pub(crate) fn records(&self) -> usize {
        self.frame.records()
    }

    /// Whether `other` may share a script call with this one: same stream, same settings.
    pub(crate) fn joins(&self, other: &StoreCall) -> bool {
        self.frame.readings() == other.frame.readings() && self.settings == other.settings
    }
}

/// One `EVALSHA` of the store script for `frames`, of calls that all [`StoreCall::joins`]
/// the first.
pub(crate) fn script_cmd(script: &Script, settings: &StoreSettings, frames: &[&StoreFrame]) -> Cmd {
    with_script("EVALSHA", script.get_hash(), settings, frames)
}

/// The same call with the script's text (after `NOSCRIPT`).
pub(crate) fn eval_cmd(settings: &StoreSettings, frames: &[&StoreFrame]) -> Cmd {
    with_script("EVAL", STORE_READINGS_LUA, settings, frames)
}

fn with_script(name: &str, script: &str, settings: &StoreSettings, frames: &[&StoreFrame]) -> Cmd {
    let mut cmd = redis::cmd(name);
    cmd.arg(script);
    layout::store_call_args(settings, frames, |arg| {
        cmd.arg(arg);
    });
    cmd
}

pub(crate) struct Job {
    pub(crate) call: Arc<StoreCall>,
    pub(crate) reply: oneshot::Sender<Result<u32, PublishError>>,
}

pub(crate) struct SideWrite {
    pub(crate) cmd: Cmd,
    /// The key written: on a cluster, side writes are pipelined per key.
    pub(crate) key: String,
    pub(crate) pool: Arc<str>,
}

/// A session or UDP event for the events stream.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event<'a> {
    Connect,
    Login {
        imei: &'a str,
        result: &'static str,
    },
    Disconnect {
        imei: Option<&'a str>,
        reason: &'static str,
    },
    DecodeError {
        imei: Option<&'a str>,
        reason: &'static str,
    },
    /// A GT06 packet with no stored layout (information, LBS-only, unknown types): kept here
    /// as hex.
    Gt06Packet {
        imei: &'a str,
        protocol: u8,
        payload_hex: &'a str,
    },
    /// A Codec 12/13/14/15 frame from the device: never acked, published here as hex.
    Command {
        imei: &'a str,
        codec: &'static str,
        kind: u8,
        payload_hex: &'a str,
    },
}

/// The handle sessions publish through; cheap to clone.
#[derive(Clone)]
pub(crate) struct Sink {
    jobs: mpsc::Sender<Job>,
    side: mpsc::Sender<SideWrite>,
    inflight: Arc<Semaphore>,
    inflight_cap: u32,
    metrics: Metrics,
    pod: Arc<str>,
    dedup_records: u32,
    dedup_ttl_ms: u64,
}

/// Bytes of one frame counted against the global in-flight cap until dropped.
pub(crate) struct InflightPermit {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    metrics: Metrics,
}

impl Drop for InflightPermit {
    fn drop(&mut self) {
        self.metrics.inflight_bytes.sub(self.bytes);
    }
}

/// Milliseconds since the Unix epoch, for `recv` and event times.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Sink {
    /// Starts the publisher task and returns the handle and the task.
    pub(crate) fn start(
        options: &SinkOptions,
        metrics: Metrics,
        health: &Health,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<()>), StartError> {
        let conn = RedisConn::open(
            &options.redis_url,
            options.response_timeout,
            &options.redis_tls,
        )
        .map_err(StartError::RedisUrl)?;
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_DEPTH);
        let (side_tx, side_rx) = mpsc::channel(SIDE_QUEUE_DEPTH);
        health.set_ready(REDIS_READY, false);
        health.set_ready(DURABILITY_READY, false);
        let batcher = Batcher {
            conn,
            script: Script::new(STORE_READINGS_LUA),
            health: health.clone(),
            response_timeout: options.response_timeout,
            metrics: metrics.clone(),
        };
        let publisher = Publisher {
            batcher: batcher.clone(),
            jobs: jobs_rx,
            heartbeat: health.heartbeat("publisher", options.heartbeat_max_silence),
            modes: options.durability.iter().copied().collect(),
        };
        tokio::spawn(run_side_writes(batcher, side_rx, stop.clone()));
        let task = tokio::spawn(publisher.run(stop));
        let cap = u32::try_from(options.max_inflight_bytes.max(1)).unwrap_or(u32::MAX);
        let sink = Sink {
            jobs: jobs_tx,
            side: side_tx,
            inflight: Arc::new(Semaphore::new(cap as usize)),
            inflight_cap: cap,
            metrics,
            pod: options.pod.as_str().into(),
            dedup_records: options.dedup_records.max(1),
            dedup_ttl_ms: u64::try_from(options.dedup_ttl.as_millis()).unwrap_or(u64::MAX),
        };
        Ok((sink, task))
    }

    /// A sink whose publisher is the test: it receives every store call and answers it.
    #[cfg(test)]
    pub(crate) fn for_test(metrics: Metrics) -> (Self, mpsc::Receiver<Job>) {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let (side, _) = mpsc::channel(1);
        let sink = Sink {
            jobs,
            side,
            inflight: Arc::new(Semaphore::new(1 << 20)),
            inflight_cap: 1 << 20,
            metrics,
            pod: "test".into(),
            dedup_records: 128,
            dedup_ttl_ms: 1000,
        };
        (sink, rx)
    }

    /// Waits until `bytes` fit under the global in-flight cap. `None` only when the
    /// semaphore is closed (never, in practice).
    pub(crate) async fn reserve(&self, bytes: usize) -> Option<InflightPermit> {
        let n = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.inflight_cap);
        let permit = self.inflight.clone().acquire_many_owned(n).await.ok()?;
        self.metrics.inflight_bytes.add(i64::from(n));
        Some(InflightPermit {
            _permit: permit,
            bytes: i64::from(n),
            metrics: self.metrics.clone(),
        })
    }

    /// The store script's keys of a device ([`layout::store_keys`]): computed once per session.
    pub(crate) fn device_keys(keys: &ShardKeys, imei: &Imei) -> Arc<[String; 3]> {
        layout::store_keys(&keys.prefix, &keys.pool, imei, keys.partitions).into()
    }

    /// Builds the script call for one frame of one device, received now; `device` is its
    /// [`Sink::device_keys`].
    pub(crate) fn prepare(
        &self,
        keys: &ShardKeys,
        device: &Arc<[String; 3]>,
        imei: &Imei,
        codec: Codec,
        port: u16,
        records: &[AvlRecord],
    ) -> Arc<StoreCall> {
        let fixed = StoreArgs {
            max_len: keys.max_len,
            dedup_records: self.dedup_records,
            dedup_ttl_ms: self.dedup_ttl_ms,
            imei: imei.as_str(),
            codec: codec.label(),
            port,
            recv_ms: now_ms(),
            protocol: TELTONIKA,
        };
        self.call(keys, device, &fixed, layout::store_args(&fixed, records))
    }

    /// Builds the script call for one GT06 location (`protocol=gt06`, no `codec`).
    pub(crate) fn prepare_gt06(
        &self,
        keys: &ShardKeys,
        device: &Arc<[String; 3]>,
        imei: &Imei,
        port: u16,
        location: &trackgate_protocol::gt06::Location,
    ) -> Arc<StoreCall> {
        let fixed = StoreArgs {
            max_len: keys.max_len,
            dedup_records: self.dedup_records,
            dedup_ttl_ms: self.dedup_ttl_ms,
            imei: imei.as_str(),
            codec: "",
            port,
            recv_ms: now_ms(),
            protocol: trackgate_protocol::gt06::PROTOCOL,
        };
        let args = layout::gt06_store_args(&fixed, std::slice::from_ref(location));
        self.call(keys, device, &fixed, args)
    }

    fn call(
        &self,
        keys: &ShardKeys,
        device: &Arc<[String; 3]>,
        fixed: &StoreArgs<'_>,
        args: layout::PackedArgs,
    ) -> Arc<StoreCall> {
        Arc::new(StoreCall {
            frame: StoreFrame {
                keys: Arc::clone(device),
                args,
            },
            settings: fixed.settings(),
            durability: keys.durability,
        })
    }

    /// Stores one frame's records (one attempt). `Ok(n)`: every record is in Redis, `n` of them
    /// were new (the rest were resends).
    pub(crate) async fn store(&self, call: &Arc<StoreCall>) -> Result<u32, PublishError> {
        let (reply, result) = oneshot::channel();
        self.jobs
            .send(Job {
                call: Arc::clone(call),
                reply,
            })
            .await
            .map_err(|_| PublishError::Stopped)?;
        result.await.unwrap_or(Err(PublishError::Stopped))
    }

    /// Queues an event for `<prefix>:{<pool>}:events` (best effort).
    pub(crate) fn event(&self, keys: &ShardKeys, port: u16, peer: SocketAddr, event: Event<'_>) {
        let mut cmd = redis::cmd("XADD");
        let key = layout::events_key(&keys.prefix, &keys.pool);
        cmd.arg(&key)
            .arg("MAXLEN")
            .arg("~")
            .arg(EVENTS_MAX_LEN)
            .arg("*");
        let kind = match event {
            Event::Connect => "connect",
            Event::Login { imei, result } => {
                cmd.arg("imei").arg(imei).arg("result").arg(result);
                if result == "accepted" {
                    "login_accepted"
                } else {
                    "login_refused"
                }
            }
            Event::Disconnect { imei, reason } => {
                if let Some(imei) = imei {
                    cmd.arg("imei").arg(imei);
                }
                cmd.arg("reason").arg(reason);
                "disconnect"
            }
            Event::DecodeError { imei, reason } => {
                if let Some(imei) = imei {
                    cmd.arg("imei").arg(imei);
                }
                cmd.arg("reason").arg(reason);
                "decode_error"
            }
            Event::Command {
                imei,
                codec,
                kind,
                payload_hex,
            } => {
                cmd.arg("imei")
                    .arg(imei)
                    .arg("codec")
                    .arg(codec)
                    .arg("type")
                    .arg(kind)
                    .arg("payload")
                    .arg(payload_hex);
                "command_response"
            }
            Event::Gt06Packet {
                imei,
                protocol,
                payload_hex,
            } => {
                cmd.arg("imei")
                    .arg(imei)
                    .arg("protocol")
                    .arg(protocol)
                    .arg("payload")
                    .arg(payload_hex);
                "gt06_packet"
            }
        };
        cmd.arg("kind")
            .arg(kind)
            .arg("port")
            .arg(port)
            .arg("peer")
            .arg(peer.to_string())
            .arg("pod")
            .arg(&*self.pod)
            .arg("ts")
            .arg(now_ms());
        self.side_write(cmd, key, &keys.pool);
    }

    /// Updates the device's entry in `<prefix>:{<pool>}:devices` (best effort): a JSON object
    /// `{"connected","lastSeen","pod","port"}`.
    pub(crate) fn device_state(&self, keys: &ShardKeys, imei: &str, port: u16, connected: bool) {
        let state = serde_json::json!({
            "connected": connected,
            "lastSeen": now_ms(),
            "pod": &*self.pod,
            "port": port,
        });
        let mut cmd = redis::cmd("HSET");
        let key = layout::devices_key(&keys.prefix, &keys.pool);
        cmd.arg(&key).arg(imei).arg(state.to_string());
        self.side_write(cmd, key, &keys.pool);
    }

    fn side_write(&self, cmd: Cmd, key: String, pool: &str) {
        let write = SideWrite {
            cmd,
            key,
            pool: pool.into(),
        };
        if self.side.try_send(write).is_err() {
            self.metrics.events_dropped.with_label_values(&[pool]).inc();
        }
    }
}
