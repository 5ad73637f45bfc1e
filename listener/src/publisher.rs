//! The publisher task behind [`crate::sink::Sink`]: batches store calls into pipelines, waits
//! for the pool's durability once per pipeline, and answers each frame with its own script
//! call's result. Side writes (events, device state) go through their own task and pipelines,
//! so a slow or failing side write never delays an ack.
//!
//! On a Redis Cluster every pipeline holds the calls of one partition (one hash tag, so one
//! slot): the cluster client routes it to the slot's primary and follows `MOVED`/`ASK` for the
//! whole pipeline. If a redirect is still unresolved after the client's retries (a slot
//! mid-migration answers `ASK` for some calls and serves others), the calls are retried one per
//! pipeline, where `ASKING` covers exactly that call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, RedisResult, Script, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trackgate_api::Durability;
use trackgate_api::redis_layout::{StoreFrame, StoreSettings};
use trackgate_telemetry::{Health, Heartbeat};

use crate::error::PublishError;
use crate::metrics::Metrics;
use crate::redis_conn::{RedisConn, check_durability};
use crate::sink::{Job, MAX_BATCH_CALLS, SideWrite, eval_cmd, script_cmd};

/// Readiness name of the Redis condition (reachable).
pub(crate) const REDIS_READY: &str = "redis";
/// Readiness name of the durability condition (the servers can keep the pools' promise).
pub(crate) const DURABILITY_READY: &str = "redis-durability";

/// Pipelines in flight at once. With one, Redis idles while the listener collects and encodes
/// the next batch: `simulator/bench/listener.sh` measured 69 % of the Redis ceiling with one,
/// 72 % with two and 80 % with four. More only queue inside Redis. Every frame is its own job
/// with its own reply, so batches may finish in any order; a device has one frame in flight,
/// so none of its frames can overtake another.
const PIPELINES_IN_FLIGHT: usize = 4;

/// Frames that make a pipeline worth sending while Redis has work queued (two pipelines and
/// [`BUSY_FRAMES`] in flight). Fewer wait for one of those to finish: sent at once, the first
/// frame back from a finished pipeline took a slot of its own, and Redis, having run through
/// the few frames of such pipelines, idled while the others were still on their way back
/// (`listener.sh` saw a median pipeline of one frame and Redis idle 7-20 % of the time at full
/// load).
const FULL_PIPELINE: usize = 4 * FRAMES_PER_CALL;

/// Frames in flight below which Redis is about to run dry, so whatever is queued goes at once:
/// under moderate load the pipelines are small, and a frame held back behind them would wait
/// for a round trip Redis does not need.
const BUSY_FRAMES: usize = FRAMES_PER_CALL;

/// Frames in one script call at most. A call's fixed cost (the command, the script's set-up,
/// the reply) spread over more frames: at 1 record per frame that cost is most of a frame's
/// (docs/benchmarks.md "Store"). Few enough that a call, which holds Redis while it runs,
/// stays around a millisecond at 10 records per frame.
const FRAMES_PER_CALL: usize = 16;

/// Side-write pipelines in flight at once: they are best effort and must not crowd the data
/// path's connection.
const SIDE_PIPELINES_IN_FLIGHT: usize = 1;

/// How often the servers are checked against the durability modes in use: often enough to
/// notice a lost replica or a failover within seconds, rarely enough to cost nothing.
const DURABILITY_CHECK_EVERY: Duration = Duration::from_secs(5);

pub(crate) struct Publisher {
    pub(crate) batcher: Batcher,
    pub(crate) jobs: mpsc::Receiver<Job>,
    pub(crate) heartbeat: Arc<Heartbeat>,
    /// Durability modes of the shards configured at start; modes seen in jobs are added.
    pub(crate) modes: BTreeSet<Durability>,
}

/// Sends pipelines; cheap to clone (the connection is multiplexed).
#[derive(Clone)]
pub(crate) struct Batcher {
    pub(crate) conn: RedisConn,
    pub(crate) script: Script,
    pub(crate) health: Health,
    pub(crate) response_timeout: Duration,
    pub(crate) metrics: Metrics,
}

impl Publisher {
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut busy = false;
        let mut last_check: Option<tokio::time::Instant> = None;
        let mut in_flight = tokio::task::JoinSet::new();
        // Frames in the pipelines in flight.
        let mut frames = 0;
        let mut jobs: Vec<Job> = Vec::new();
        loop {
            self.heartbeat.beat();
            if send_now(jobs.len(), in_flight.len(), frames) {
                for job in &jobs {
                    if self.modes.insert(job.call.durability) {
                        last_check = None;
                    }
                }
                let batch = std::mem::take(&mut jobs);
                let n = batch.len();
                frames += n;
                let batcher = self.batcher.clone();
                in_flight.spawn(async move {
                    batcher.send_batch(batch).await;
                    n
                });
                continue;
            }
            // Each batch ends within its response timeouts, so waiting on one is bounded.
            tokio::select! {
                biased;
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    // A batch that panicked takes its count along: none in flight resets it.
                    frames = if in_flight.is_empty() {
                        0
                    } else {
                        frames.saturating_sub(done.unwrap_or(0))
                    };
                }
                job = self.jobs.recv(), if jobs.len() < MAX_BATCH_CALLS => match job {
                    Some(job) => {
                        busy = true;
                        jobs.push(job);
                        while jobs.len() < MAX_BATCH_CALLS {
                            match self.jobs.try_recv() {
                                Ok(job) => jobs.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    // Readiness tracks Redis even when no device is sending.
                    if !busy {
                        self.batcher.ping().await;
                    }
                    busy = false;
                    if last_check.is_none_or(|t| t.elapsed() >= DURABILITY_CHECK_EVERY) {
                        last_check = Some(tokio::time::Instant::now());
                        self.batcher.check(&self.modes).await;
                    }
                }
                () = stop.cancelled() => break,
            }
        }
        // Shutdown: batches already sent get their answers; whatever is still queued gets a
        // definite one too (no ack).
        while in_flight.join_next().await.is_some() {}
        self.jobs.close();
        while let Ok(job) = self.jobs.try_recv() {
            jobs.push(job);
        }
        for job in jobs {
            let _ = job.reply.send(Err(PublishError::Stopped));
        }
    }
}

/// Whether `queued` frames go out as a pipeline now, with `in_flight` pipelines of `frames`
/// frames unanswered: never past [`PIPELINES_IN_FLIGHT`]; at once while fewer than two
/// pipelines or [`BUSY_FRAMES`] frames are in flight (so a quiet listener adds no wait, and
/// Redis has the next pipeline before it finishes the current); otherwise only a
/// [`FULL_PIPELINE`] worth.
fn send_now(queued: usize, in_flight: usize, frames: usize) -> bool {
    queued > 0
        && in_flight < PIPELINES_IN_FLIGHT
        && (in_flight < 2 || frames < BUSY_FRAMES || queued >= FULL_PIPELINE)
}

/// Writes events and device state in pipelines of their own; failures are counted
/// (`trackgate_listener_events_dropped_total`) and never retried.
pub(crate) async fn run_side_writes(
    batcher: Batcher,
    mut side: mpsc::Receiver<SideWrite>,
    stop: CancellationToken,
) {
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while in_flight.len() >= SIDE_PIPELINES_IN_FLIGHT {
            let _ = in_flight.join_next().await;
        }
        let mut writes = Vec::new();
        tokio::select! {
            write = side.recv() => match write {
                Some(write) => writes.push(write),
                None => break,
            },
            () = stop.cancelled() => break,
        }
        while writes.len() < MAX_BATCH_CALLS {
            match side.try_recv() {
                Ok(write) => writes.push(write),
                Err(_) => break,
            }
        }
        let batcher = batcher.clone();
        in_flight.spawn(async move { batcher.send_side(writes).await });
    }
    while in_flight.join_next().await.is_some() {}
}

impl Batcher {
    async fn ping(&mut self) {
        let ping = redis::cmd("PING");
        let result = tokio::time::timeout(
            self.response_timeout,
            ping.query_async::<String>(&mut self.conn),
        )
        .await;
        let state = match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("PING timed out".to_owned()),
        };
        self.health.set_condition(REDIS_READY, state);
    }

    async fn check(&mut self, modes: &BTreeSet<Durability>) {
        let modes: Vec<Durability> = modes.iter().copied().collect();
        let state = match tokio::time::timeout(
            self.response_timeout,
            check_durability(&mut self.conn, &modes),
        )
        .await
        {
            Ok(state) => state,
            Err(_) => Err("durability check timed out".to_owned()),
        };
        let current = self.health.readiness();
        match &state {
            Err(why) => {
                tracing::warn!(%why, "redis cannot keep the durability promise: frames are not acked")
            }
            Ok(())
                if current
                    .as_ref()
                    .is_err_and(|r| r.contains(DURABILITY_READY)) =>
            {
                tracing::info!("redis can keep the durability promise again");
            }
            Ok(()) => {}
        }
        self.health.set_condition(DURABILITY_READY, state);
    }

    async fn send_batch(self, mut jobs: Vec<Job>) {
        // One pipeline per durability (one wait each) and, on a cluster, per partition; in it,
        // one script call per partition. The sort is stable: two frames of one device (it
        // reconnected while its first was on the way) keep their order.
        let cluster = self.conn.is_cluster();
        jobs.sort_by(|a, b| {
            let (a, b) = (&a.call, &b.call);
            (a.durability, a.frame.readings(), a.settings).cmp(&(
                b.durability,
                b.frame.readings(),
                b.settings,
            ))
        });
        let mut groups: Vec<Vec<Job>> = Vec::new();
        for job in jobs {
            match groups.last_mut() {
                Some(group)
                    if group[0].call.durability == job.call.durability
                        && (!cluster
                            || group[0].call.frame.readings() == job.call.frame.readings()) =>
                {
                    group.push(job);
                }
                _ => groups.push(vec![job]),
            }
        }
        let sends = groups.into_iter().map(|jobs| {
            let durability = jobs[0].call.durability;
            self.clone().send_group(jobs, durability, FRAMES_PER_CALL)
        });
        futures::future::join_all(sends).await;
    }

    /// Sends `jobs` as one pipeline of script calls of up to `frames_per_call` frames each.
    /// The script answers each frame on its own, so a frame Redis refuses (a dedup key of
    /// the wrong type, say) fails alone. A call that fails as a whole (a redirect on a
    /// cluster, say) is retried frame by frame; a frame it had stored is then a resend,
    /// stored once.
    async fn send_group(mut self, jobs: Vec<Job>, durability: Durability, frames_per_call: usize) {
        let mut calls: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            match calls.last_mut() {
                Some(call)
                    if call.len() < frames_per_call && jobs[call.start].call.joins(&job.call) =>
                {
                    call.end = i + 1;
                }
                _ => calls.push(i..i + 1),
            }
        }
        // A call's settings are its first frame's: `joins` made them equal.
        let frames = |call: &std::ops::Range<usize>| -> (StoreSettings, Vec<&StoreFrame>) {
            let jobs = &jobs[call.clone()];
            let frames = jobs.iter().map(|j| &j.call.frame).collect();
            (jobs[0].call.settings, frames)
        };
        let cmds = calls
            .iter()
            .map(|call| {
                let (settings, frames) = frames(call);
                script_cmd(&self.script, &settings, &frames)
            })
            .collect();
        let results = match self.pipeline(cmds, durability).await {
            Ok(results) => results,
            Err(err @ PublishError::Server(_)) if self.conn.is_cluster() && jobs.len() > 1 => {
                tracing::debug!(%err, frames = jobs.len(), "cluster pipeline failed: retrying its frames one by one");
                let singles = jobs.into_iter().map(|job| {
                    let batcher = self.clone();
                    Box::pin(batcher.send_group(vec![job], durability, 1))
                });
                futures::future::join_all(singles).await;
                return;
            }
            Err(err) => {
                for job in jobs {
                    let _ = job.reply.send(Err(err.clone()));
                }
                return;
            }
        };
        let mut results: Vec<RedisResult<Value>> = results;
        // After a Redis restart or a failover the script cache is empty: resend those calls
        // as EVAL, which also caches the script on that node (safe to repeat: the script is
        // idempotent per record).
        let noscript: Vec<usize> = (0..results.len())
            .filter(|&i| is_noscript(&results[i]))
            .collect();
        if !noscript.is_empty() {
            let cmds = noscript
                .iter()
                .map(|&i| {
                    let (settings, frames) = frames(&calls[i]);
                    eval_cmd(&settings, &frames)
                })
                .collect();
            let retried = self.pipeline(cmds, durability).await;
            for (k, &i) in noscript.iter().enumerate() {
                results[i] = match &retried {
                    Ok(values) => values
                        .get(k)
                        .cloned()
                        .unwrap_or_else(|| Err(missing_reply())),
                    Err(err) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "script resend failed",
                        err.to_string(),
                    ))),
                };
            }
        }
        let mut jobs = jobs.into_iter();
        let mut alone = Vec::new();
        for (call, result) in calls.iter().zip(results) {
            let call_jobs = jobs.by_ref().take(call.len());
            match result {
                Ok(Value::Array(counts)) if counts.len() == call.len() => {
                    for (job, count) in call_jobs.zip(counts) {
                        let outcome = match count {
                            Value::Int(n) => Ok(u32::try_from(n).unwrap_or(0)),
                            // This frame alone failed (the script catches each frame's error).
                            Value::ServerError(err) => {
                                Err(PublishError::from_redis(&redis::RedisError::from(err)))
                            }
                            other => Err(unexpected_reply(&other)),
                        };
                        let _ = job.reply.send(outcome);
                    }
                }
                Err(err) if call.len() > 1 => {
                    tracing::debug!(%err, frames = call.len(), "store call failed: retrying its frames one by one");
                    alone.extend(call_jobs);
                }
                result => {
                    let err = match result {
                        Err(err) => PublishError::from_redis(&err),
                        Ok(other) => unexpected_reply(&other),
                    };
                    for job in call_jobs {
                        let _ = job.reply.send(Err(err.clone()));
                    }
                }
            }
        }
        if !alone.is_empty() {
            Box::pin(self.send_group(alone, durability, 1)).await;
        }
    }

    /// Sends `cmds` as one pipeline followed by the durability wait, if any. `Err` for the
    /// whole pipeline when it failed or the wait did not reach its target in time.
    async fn pipeline(
        &mut self,
        cmds: Vec<Cmd>,
        durability: Durability,
    ) -> Result<Vec<RedisResult<Value>>, PublishError> {
        let calls = cmds.len();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in cmds {
            pipe.add_command(cmd);
        }
        let wait = durability.wait();
        let mut timeout = self.response_timeout;
        if let Some((name, local, replicas)) = wait {
            let mut cmd = redis::cmd(name);
            if name == "WAITAOF" {
                cmd.arg(local);
            }
            cmd.arg(replicas).arg(durability.timeout_ms);
            pipe.add_command(cmd);
            timeout += durability.timeout();
        }
        let expected = calls + usize::from(wait.is_some());
        let result = tokio::time::timeout(
            timeout,
            pipe.query_async::<Vec<RedisResult<Value>>>(&mut self.conn),
        )
        .await;
        let outcome = match result {
            Ok(Ok(values)) if values.len() == expected => Ok(values),
            Ok(Ok(_)) => Err(PublishError::Server("short pipeline reply".to_owned())),
            Ok(Err(err)) => Err(PublishError::from_redis(&err)),
            Err(_) => Err(PublishError::Timeout),
        };
        let state = match &outcome {
            Err(err @ (PublishError::Timeout | PublishError::Connection(_))) => {
                Err(err.to_string())
            }
            _ => Ok(()),
        };
        self.health.set_condition(REDIS_READY, state);
        let mut values = outcome?;
        if let Some((name, local, replicas)) = wait {
            let reply = values.pop().unwrap_or_else(|| Err(missing_reply()));
            wait_reached(name, local, replicas, reply)?;
        }
        Ok(values)
    }

    async fn send_side(mut self, writes: Vec<SideWrite>) {
        // One pipeline per key on a cluster: every command of a pipeline is then for the same
        // key, so a redirect for one is right for all.
        let cluster = self.conn.is_cluster();
        let mut groups: BTreeMap<String, Vec<SideWrite>> = BTreeMap::new();
        for write in writes {
            let key = if cluster {
                write.key.clone()
            } else {
                String::new()
            };
            groups.entry(key).or_default().push(write);
        }
        for writes in groups.into_values() {
            let pools: Vec<Arc<str>> = writes.iter().map(|w| Arc::clone(&w.pool)).collect();
            let cmds = writes.into_iter().map(|w| w.cmd).collect();
            let failed: Vec<bool> = match self.pipeline(cmds, Durability::default()).await {
                Ok(results) => results.iter().map(Result::is_err).collect(),
                Err(_) => vec![true; pools.len()],
            };
            for (pool, failed) in pools.iter().zip(failed) {
                if failed {
                    self.metrics
                        .events_dropped
                        .with_label_values(&[&**pool])
                        .inc();
                }
            }
        }
    }
}

/// Checks a `WAIT`/`WAITAOF` reply against its target.
fn wait_reached(
    name: &str,
    local: u32,
    replicas: u32,
    reply: RedisResult<Value>,
) -> Result<(), PublishError> {
    let reached = match reply.map_err(|err| PublishError::Durability(format!("{name}: {err}")))? {
        Value::Int(n) => (local == 0, i64::from(replicas) <= n),
        Value::Array(counts) => match counts.as_slice() {
            [Value::Int(l), Value::Int(r)] => (i64::from(local) <= *l, i64::from(replicas) <= *r),
            _ => (false, false),
        },
        _ => (false, false),
    };
    if reached == (true, true) {
        Ok(())
    } else {
        Err(PublishError::Durability(format!(
            "{name} {local} {replicas} did not reach its target in time"
        )))
    }
}

fn unexpected_reply(reply: &Value) -> PublishError {
    PublishError::Server(format!("unexpected script reply {reply:?}"))
}

fn is_noscript(result: &RedisResult<Value>) -> bool {
    matches!(result, Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

fn missing_reply() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "missing pipeline reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_frames_wait_only_behind_two_busy_pipelines_and_never_past_the_limit() {
        // Quiet: a lone frame goes at once, and so does the next beside one in flight, or
        // beside a few small pipelines that Redis is about to finish.
        assert!(send_now(1, 0, 0));
        assert!(send_now(1, 1, 200));
        assert!(send_now(1, 3, BUSY_FRAMES - 1));
        assert!(!send_now(0, 0, 0));
        // Busy: behind two pipelines with work in them, a partial one waits for a slot to
        // free or to fill up.
        assert!(!send_now(1, 2, BUSY_FRAMES));
        assert!(!send_now(FULL_PIPELINE - 1, 3, 200));
        assert!(send_now(FULL_PIPELINE, 2, 200));
        assert!(send_now(MAX_BATCH_CALLS, 3, 200));
        assert!(!send_now(MAX_BATCH_CALLS, PIPELINES_IN_FLIGHT, 0));
    }

    #[test]
    fn a_wait_counts_only_when_it_reached_its_target() {
        assert_eq!(wait_reached("WAIT", 0, 1, Ok(Value::Int(1))), Ok(()));
        assert!(wait_reached("WAIT", 0, 2, Ok(Value::Int(1))).is_err());
        let aof = |l, r| Ok(Value::Array(vec![Value::Int(l), Value::Int(r)]));
        assert_eq!(wait_reached("WAITAOF", 1, 0, aof(1, 0)), Ok(()));
        assert!(wait_reached("WAITAOF", 1, 0, aof(0, 0)).is_err());
        assert!(wait_reached("WAITAOF", 1, 1, aof(1, 0)).is_err());
        assert!(
            wait_reached(
                "WAITAOF",
                1,
                0,
                Err(redis::RedisError::from((redis::ErrorKind::Io, "x")))
            )
            .is_err()
        );
    }
}
