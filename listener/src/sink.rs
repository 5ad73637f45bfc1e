//! The Redis Streams publisher — with `command::store` (the command path's own connections),
//! the only module that knows Redis.
//!
//! ```text
//!  session ─┐ StoreCall + oneshot        ┌─ EVALSHA store_readings (one per frame) ─┐
//!  session ─┼──► bounded mpsc ──► publisher task: one pipeline per batch ───────────►│ Redis
//!  udp     ─┘  events / device state (try_send, best effort) ─── XADD / HSET ───────┘
//! ```
//!
//! Records from every connection are batched: the publisher takes what is queued (up to
//! [`MAX_BATCH_CALLS`]) and sends it as one pipeline, so a busy listener makes one round trip
//! for many frames. Each session awaits its own frame's result and acks only on `Ok`.
//!
//! Dedup is atomic with the XADD: the `store_readings` script checks each record's
//! fingerprint against the device's recent-fingerprint set
//! (`<prefix>:{<pool>:<n>}:seen:<imei>`, a sorted set scored by arrival), XADDs the records not
//! in it and adds their fingerprints, first trimming the set so that it holds at most the
//! newest `dedup_records` (unless one frame alone is larger). Both keys share the partition's hash tag, so the script is
//! valid on Redis Cluster. The XADD comes before the ZADD: a failing XADD aborts the script
//! before its fingerprint is remembered, so a remembered record is always in the stream.
//!
//! NB: the window is the device's last N records, not a time span. A Teltonika device sends
//! one frame and waits for its ack, so a record that was stored but not acked is always among
//! the newest records of that device when it comes back, however long the device was away.
//! Bounding by count makes the cost per device fixed (~4.2 KB at N = 128, measured with
//! Redis 7.0: the set stays a listpack up to `zset-max-listpack-entries` = 128) instead of
//! growing with traffic: one marker key per record with a TTL costs ~150 B per record (the
//! same as the stream entry itself), i.e. gigabytes per day for a large fleet. The set expires
//! `dedup_ttl` after the device's last stored record, so removed devices leave nothing behind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisResult, Script, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use trackgate_protocol::{AvlRecord, Codec, Imei};
use trackgate_telemetry::{Health, Heartbeat};

use crate::command::PoolKeys;
use crate::error::{PublishError, StartError};
use crate::keys;
use crate::metrics::Metrics;

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
/// Readiness name of the Redis condition.
pub(crate) const REDIS_READY: &str = "redis";

const STORE_READINGS: &str = r"
-- KEYS[1]: readings stream; KEYS[2]: the device's recent-fingerprint set.
-- ARGV: maxlen, window (records), ttl_ms, imei, codec, port, recv,
--       then per record: fingerprint and the 10 field values.
-- Returns how many records were new (added to the stream).
local names = {'ts','lat','lon','alt','angle','sats','speed','priority','event','io'}
local new, pending = {}, {}
for a = 8, #ARGV, 11 do
  local fp = ARGV[a]
  if not pending[fp] and not redis.call('ZSCORE', KEYS[2], fp) then
    pending[fp] = true
    new[#new + 1] = a
  end
end
if #new == 0 then
  return 0
end
-- Make room first, so the set never exceeds the window and stays a compact listpack.
local room = math.max(tonumber(ARGV[2]) - #new, 0)
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(room + 1))
for seq, a in ipairs(new) do
  local e = {'imei', ARGV[4]}
  for j = 1, 10 do
    e[#e + 1] = names[j]
    e[#e + 1] = ARGV[a + j]
  end
  e[#e + 1] = 'codec'; e[#e + 1] = ARGV[5]
  e[#e + 1] = 'port'; e[#e + 1] = ARGV[6]
  e[#e + 1] = 'recv'; e[#e + 1] = ARGV[7]
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(e))
  redis.call('ZADD', KEYS[2], string.format('%d', tonumber(ARGV[7]) * 1000 + seq), ARGV[a])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return #new
";

/// Publisher settings.
#[derive(Clone, Debug)]
pub(crate) struct SinkOptions {
    pub(crate) redis_url: String,
    pub(crate) pod: String,
    pub(crate) response_timeout: Duration,
    pub(crate) max_inflight_bytes: usize,
    pub(crate) dedup_records: u32,
    pub(crate) dedup_ttl: Duration,
    pub(crate) heartbeat_max_silence: Duration,
}

/// Where one shard's data goes (from its config's `redis` section).
#[derive(Clone, Debug)]
pub(crate) struct ShardKeys {
    pub(crate) prefix: String,
    pub(crate) pool: String,
    pub(crate) partitions: u32,
    pub(crate) max_len: u64,
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
            commands: Arc::new(PoolKeys::new(
                &config.redis.stream_prefix,
                &config.pool,
                config.redis.max_len,
            )),
        }
    }
}

/// One frame's records, ready to send (kept for retries: same keys, same `recv`).
#[derive(Debug)]
pub(crate) struct StoreCall {
    keys: Vec<String>,
    args: Vec<String>,
}

impl StoreCall {
    /// Number of records in the call.
    #[cfg(test)]
    pub(crate) fn records(&self) -> usize {
        self.args.len().saturating_sub(7) / 11
    }

    fn cmd(&self, script: &Script) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }
}

pub(crate) struct Job {
    pub(crate) call: Arc<StoreCall>,
    pub(crate) reply: oneshot::Sender<Result<u32, PublishError>>,
}

struct SideWrite {
    cmd: Cmd,
    pool: Arc<str>,
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
        let client =
            redis::Client::open(options.redis_url.as_str()).map_err(StartError::RedisUrl)?;
        // Reconnects in the background with exponential backoff (100 ms to 2 s) while the
        // calls in between fail fast: the sessions' own retry bound decides when to give up.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.response_timeout))
            .set_response_timeout(Some(options.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(StartError::RedisUrl)?;
        let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_DEPTH);
        let (side_tx, side_rx) = mpsc::channel(SIDE_QUEUE_DEPTH);
        health.set_ready(REDIS_READY, false);
        let publisher = Publisher {
            batcher: Batcher {
                conn,
                script: Script::new(STORE_READINGS),
                health: health.clone(),
                response_timeout: options.response_timeout,
                metrics: metrics.clone(),
            },
            jobs: jobs_rx,
            side: side_rx,
            heartbeat: health.heartbeat("publisher", options.heartbeat_max_silence),
        };
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

    /// Builds the script call for one frame of one device.
    pub(crate) fn prepare(
        &self,
        keys: &ShardKeys,
        imei: &Imei,
        codec: Codec,
        port: u16,
        records: &[AvlRecord],
        recv_ms: u64,
    ) -> Arc<StoreCall> {
        let partition = keys::partition_of(imei, keys.partitions);
        let call_keys = vec![
            keys::readings_key(&keys.prefix, &keys.pool, partition),
            keys::seen_key(&keys.prefix, &keys.pool, partition, imei.as_str()),
        ];
        let mut args = Vec::with_capacity(7 + 11 * records.len());
        args.extend([
            keys.max_len.to_string(),
            self.dedup_records.to_string(),
            self.dedup_ttl_ms.to_string(),
            imei.as_str().to_owned(),
            codec.label().to_owned(),
            port.to_string(),
            recv_ms.to_string(),
        ]);
        for record in records {
            args.push(keys::fingerprint_member(record.fingerprint()));
            args.extend(record.fields().into_iter().map(|(_, value)| value));
        }
        Arc::new(StoreCall {
            keys: call_keys,
            args,
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
        cmd.arg(keys::events_key(&keys.prefix, &keys.pool))
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
        self.side_write(cmd, &keys.pool);
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
        cmd.arg(keys::devices_key(&keys.prefix, &keys.pool))
            .arg(imei)
            .arg(state.to_string());
        self.side_write(cmd, &keys.pool);
    }

    fn side_write(&self, cmd: Cmd, pool: &str) {
        let write = SideWrite {
            cmd,
            pool: pool.into(),
        };
        if self.side.try_send(write).is_err() {
            self.metrics.events_dropped.with_label_values(&[pool]).inc();
        }
    }
}

// === Publisher ===

/// Pipelines in flight at once. With one, Redis idles while the listener collects and encodes
/// the next batch: `simulator/bench/listener.sh` measured 69 % of the Redis ceiling with one,
/// 72 % with two and 80 % with four. More only queue inside Redis. Every frame is its own job
/// with its own reply, so batches may finish in any order; a device has one frame in flight,
/// so none of its frames can overtake another.
const PIPELINES_IN_FLIGHT: usize = 4;

struct Publisher {
    batcher: Batcher,
    jobs: mpsc::Receiver<Job>,
    side: mpsc::Receiver<SideWrite>,
    heartbeat: Arc<Heartbeat>,
}

/// Sends one batch as one pipeline; cheap to clone (the connection is multiplexed).
#[derive(Clone)]
struct Batcher {
    conn: ConnectionManager,
    script: Script,
    health: Health,
    response_timeout: Duration,
    metrics: Metrics,
}

impl Publisher {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut busy = false;
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            self.heartbeat.beat();
            // Each batch ends within its response timeouts, so this wait is bounded too.
            while in_flight.len() >= PIPELINES_IN_FLIGHT {
                let _ = in_flight.join_next().await;
                self.heartbeat.beat();
            }
            let mut jobs = Vec::new();
            let mut side = Vec::new();
            tokio::select! {
                biased;
                job = self.jobs.recv() => match job {
                    Some(job) => jobs.push(job),
                    None => break,
                },
                write = self.side.recv() => if let Some(write) = write { side.push(write) },
                _ = tick.tick() => {
                    // Readiness tracks Redis even when no device is sending.
                    if !busy {
                        self.batcher.ping().await;
                    }
                    busy = false;
                    continue;
                }
                () = stop.cancelled() => break,
            }
            busy = true;
            while jobs.len() < MAX_BATCH_CALLS {
                match self.jobs.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            while side.len() < MAX_BATCH_CALLS {
                match self.side.try_recv() {
                    Ok(write) => side.push(write),
                    Err(_) => break,
                }
            }
            let batcher = self.batcher.clone();
            in_flight.spawn(async move { batcher.send_batch(jobs, side).await });
        }
        // Shutdown: batches already sent get their answers; whatever is still queued gets a
        // definite one too (no ack).
        while in_flight.join_next().await.is_some() {}
        self.jobs.close();
        while let Ok(job) = self.jobs.try_recv() {
            let _ = job.reply.send(Err(PublishError::Stopped));
        }
    }
}

impl Batcher {
    async fn ping(&mut self) {
        let ping = redis::cmd("PING");
        let result = tokio::time::timeout(
            self.response_timeout,
            ping.query_async::<String>(&mut self.conn),
        )
        .await;
        self.health
            .set_ready(REDIS_READY, matches!(result, Ok(Ok(_))));
    }

    async fn send_batch(mut self, jobs: Vec<Job>, side: Vec<SideWrite>) {
        let pools: Vec<Arc<str>> = side.iter().map(|w| Arc::clone(&w.pool)).collect();
        let cmds: Vec<Cmd> = jobs
            .iter()
            .map(|j| j.call.cmd(&self.script))
            .chain(side.into_iter().map(|w| w.cmd))
            .collect();
        let mut results = match self.pipeline(cmds).await {
            Ok(results) => results,
            Err(err) => {
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
                for pool in &pools {
                    self.metrics
                        .events_dropped
                        .with_label_values(&[&**pool])
                        .inc();
                }
                return;
            }
        };
        results.truncate(jobs.len());
        // After a Redis restart the script cache is empty: load it once and resend the calls
        // that hit NOSCRIPT (safe to repeat: the script is idempotent per record).
        let noscript: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| is_noscript(r))
            .map(|(i, _)| i)
            .collect();
        if !noscript.is_empty() {
            let retry = self.load_script().await.map(|()| {
                noscript
                    .iter()
                    .map(|&i| jobs[i].call.cmd(&self.script))
                    .collect::<Vec<Cmd>>()
            });
            let retried = match retry {
                Ok(cmds) => self.pipeline(cmds).await,
                Err(err) => Err(err),
            };
            for (k, &i) in noscript.iter().enumerate() {
                results[i] = match &retried {
                    Ok(values) => values
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| Err(missing_reply())),
                    Err(err) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "script reload failed",
                        err.to_string(),
                    ))),
                };
            }
        }
        for (job, result) in jobs.into_iter().zip(results) {
            let outcome = match result {
                Ok(Value::Int(n)) => Ok(u32::try_from(n).unwrap_or(0)),
                Ok(other) => Err(PublishError::Server(format!(
                    "unexpected script reply {other:?}"
                ))),
                Err(err) => Err(PublishError::from_redis(&err)),
            };
            let _ = job.reply.send(outcome);
        }
    }

    async fn pipeline(&mut self, cmds: Vec<Cmd>) -> Result<Vec<RedisResult<Value>>, PublishError> {
        let expected = cmds.len();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        let result = tokio::time::timeout(
            self.response_timeout,
            pipe.query_async::<Vec<RedisResult<Value>>>(&mut self.conn),
        )
        .await;
        let outcome = match result {
            Ok(Ok(values)) if values.len() == expected => Ok(values),
            Ok(Ok(_)) => Err(PublishError::Server("short pipeline reply".to_owned())),
            Ok(Err(err)) => Err(PublishError::from_redis(&err)),
            Err(_) => Err(PublishError::Timeout),
        };
        let reachable = !matches!(
            outcome,
            Err(PublishError::Timeout | PublishError::Connection(_))
        );
        self.health.set_ready(REDIS_READY, reachable);
        outcome
    }

    async fn load_script(&mut self) -> Result<(), PublishError> {
        let load = self.script.prepare_invoke();
        match tokio::time::timeout(self.response_timeout, load.load_async(&mut self.conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(PublishError::from_redis(&err)),
            Err(_) => Err(PublishError::Timeout),
        }
    }
}

fn is_noscript(result: &RedisResult<Value>) -> bool {
    matches!(result, Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

fn missing_reply() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "missing pipeline reply"))
}
