//! The command path's Redis side: the calls that run the scripts (`scripts`) moving a command
//! through its states, and the router's reads of the command stream.
//!
//! ```text
//!  service ─XADD─► {pool}:commands ─► router (group trackgate-router) ─ ROUTE ─► {pool}:cmdqueue:<imei>
//!                                                                          └─► PUBLISH cmdready <imei>
//!  driver (listener holding the device): TAKE ─► {pool}:cmdinflight:<imei> (lease) ─► write to device
//!        MARK_SENT (lease = response timeout) … answer / timeout ─► RESOLVE ─► {pool}:responses
//!  sweeper: queued past its TTL ─► expired; a lease nobody resolved ─► failed: timeout
//! ```
//!
//! Every script's declared keys share the pool's hash tag; ROUTE, TAKE, MARK_SENT and RESOLVE
//! touch only declared keys. SWEEP derives the status, queue and lease keys of the commands it
//! finds from their ids, all under the same tag, so they live in the same Cluster slot. Times
//! are Redis's own clock (`TIME`), so leases mean the same on every listener.
//!
//! This is the command side's own connection: a slow command call never sits in front of a
//! data frame in the publisher's pipelines. The router's blocking `XREADGROUP` has a
//! connection of its own as well.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisError, RedisResult, Script};
use trackgate_api::redis_layout::{
    self as layout, COMMAND_STATUS_RETENTION_SECONDS, COMMANDS_GROUP, CommandReason, CommandStatus,
};

use super::entry::{QueuedCommand, Routed, hex};
use super::scripts;

/// How long the router lease lasts without renewal: a dead router's pool is routed again by
/// another listener within this time.
pub(crate) const ROUTER_LEASE: Duration = Duration::from_secs(5);

/// IMEIs per `HSET` when registering a shard's devices.
const MEMBERS_CHUNK: usize = 1000;
/// Entries per router read and per sweep.
const BATCH: usize = 100;
/// How long a blocking router read waits for new entries.
const ROUTER_BLOCK: Duration = Duration::from_secs(1);

// === Keys ===

/// One pool's command keys.
#[derive(Debug, Clone)]
pub(crate) struct PoolKeys {
    pub(crate) prefix: String,
    pub(crate) pool: String,
    base: String,
    commands: String,
    responses: String,
    deadlines: String,
    members: String,
    router: String,
    pub(crate) channel: String,
    max_len: u64,
}

impl PoolKeys {
    pub(crate) fn new(prefix: &str, pool: &str, max_len: u64) -> Self {
        Self {
            prefix: prefix.to_owned(),
            pool: pool.to_owned(),
            base: format!("{prefix}:{{{pool}}}"),
            commands: layout::commands_key(prefix, pool),
            responses: layout::command_responses_key(prefix, pool),
            deadlines: layout::command_deadlines_key(prefix, pool),
            members: layout::pool_members_key(prefix, pool),
            router: layout::command_router_key(prefix, pool),
            channel: layout::command_ready_channel(prefix, pool),
            max_len: max_len.max(1000),
        }
    }

    fn queue(&self, imei: &str) -> String {
        layout::command_queue_key(&self.prefix, &self.pool, imei)
    }

    fn inflight(&self, imei: &str) -> String {
        layout::command_inflight_key(&self.prefix, &self.pool, imei)
    }

    fn status(&self, id: &str) -> String {
        layout::command_status_key(&self.prefix, &self.pool, id)
    }
}

/// What TAKE found for a device.
#[derive(Debug)]
pub(crate) enum Taken {
    /// Nothing queued.
    Empty,
    /// Another attempt holds the device's lease for this long.
    Busy { id: String, wait: Duration },
    /// The outstanding command's response timeout passed with no answer.
    TimedOut { id: String },
    /// This listener now holds the command's lease.
    Command { command: QueuedCommand, now_ms: u64 },
    /// A body that does not parse (never written by ROUTE): resolved as malformed.
    Unreadable { id: String },
}

/// A final outcome, as RESOLVE records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Answered(Vec<u8>),
    Failed(CommandReason),
    Expired,
}

impl Outcome {
    pub(crate) fn status(&self) -> CommandStatus {
        match self {
            Outcome::Answered(_) => CommandStatus::Answered,
            Outcome::Failed(_) => CommandStatus::Failed,
            Outcome::Expired => CommandStatus::Expired,
        }
    }

    pub(crate) fn reason(&self) -> Option<CommandReason> {
        match self {
            Outcome::Answered(_) => None,
            Outcome::Failed(reason) => Some(*reason),
            Outcome::Expired => Some(CommandReason::Ttl),
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Swept {
    pub(crate) expired: u64,
    pub(crate) timed_out: u64,
    pub(crate) open: i64,
}

// === Store ===

/// The command side's Redis connection and scripts; cheap to clone.
#[derive(Clone)]
pub(crate) struct CommandStore {
    conn: ConnectionManager,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    route: Script,
    take: Script,
    mark_sent: Script,
    resolve: Script,
    sweep: Script,
    release: Script,
    members_remove: Script,
}

pub(crate) fn lead_script() -> Script {
    Script::new(scripts::LEAD)
}

pub(crate) fn connection_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
}

fn retain_ms() -> u64 {
    COMMAND_STATUS_RETENTION_SECONDS * 1000
}

impl CommandStore {
    pub(crate) fn new(client: redis::Client, timeout: Duration) -> RedisResult<Self> {
        let conn = ConnectionManager::new_lazy_with_config(client, connection_config(timeout))?;
        Ok(Self {
            conn,
            scripts: std::sync::Arc::new(Scripts {
                route: Script::new(scripts::ROUTE),
                take: Script::new(scripts::TAKE),
                mark_sent: Script::new(scripts::MARK_SENT),
                resolve: Script::new(scripts::RESOLVE),
                sweep: Script::new(scripts::SWEEP),
                release: Script::new(scripts::RELEASE),
                members_remove: Script::new(scripts::MEMBERS_REMOVE),
            }),
        })
    }

    /// Records a shard's devices as members of the pool (and forgets `removed` ones this shard
    /// owned), so that a command for an IMEI of no shard fails at once.
    pub(crate) async fn register_members(
        &self,
        keys: &PoolKeys,
        shard: u32,
        added: &[String],
        removed: &[String],
    ) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        for chunk in added.chunks(MEMBERS_CHUNK) {
            let pairs: Vec<(&str, u32)> = chunk.iter().map(|i| (i.as_str(), shard)).collect();
            let () = conn.hset_multiple(&keys.members, &pairs).await?;
        }
        for chunk in removed.chunks(MEMBERS_CHUNK) {
            let mut call = self.scripts.members_remove.key(&keys.members);
            call.arg(shard);
            for imei in chunk {
                call.arg(imei);
            }
            let _: i64 = call.invoke_async(&mut conn).await?;
        }
        Ok(())
    }

    /// Routes one entry: queued for its device, or failed at once; acked in the same script.
    /// Returns the status recorded (`None`: an id seen before, ignored).
    pub(crate) async fn route(
        &self,
        keys: &PoolKeys,
        entry_id: &str,
        routed: &Routed,
    ) -> RedisResult<Option<CommandStatus>> {
        let mut conn = self.conn.clone();
        let queue = if routed.reject.is_none() {
            keys.queue(&routed.imei)
        } else {
            // Never written: a rejected entry is only recorded.
            format!("{}:cmdqueue:-", keys.base)
        };
        let status: String = self
            .scripts
            .route
            .key(&keys.commands)
            .key(&keys.members)
            .key(queue)
            .key(keys.status(&routed.id))
            .key(&keys.responses)
            .key(&keys.deadlines)
            .arg(COMMANDS_GROUP)
            .arg(entry_id)
            .arg(&routed.id)
            .arg(&routed.imei)
            .arg(routed.codec)
            .arg(hex(&routed.payload))
            .arg(u64::try_from(routed.ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(retain_ms())
            .arg(keys.max_len)
            .arg(routed.text.as_deref().unwrap_or(""))
            .arg(routed.reject.map_or("", CommandReason::as_str))
            .arg(&keys.channel)
            .invoke_async(&mut conn)
            .await?;
        Ok(CommandStatus::parse(&status))
    }

    pub(crate) async fn take(
        &self,
        keys: &PoolKeys,
        imei: &str,
        owner: &str,
        lease: Duration,
    ) -> RedisResult<Taken> {
        let mut conn = self.conn.clone();
        let reply: Vec<String> = self
            .scripts
            .take
            .key(keys.queue(imei))
            .key(keys.inflight(imei))
            .arg(owner)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await?;
        let number = |s: Option<&String>| s.and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        Ok(match reply.first().map(String::as_str) {
            Some("busy") => Taken::Busy {
                id: reply.get(1).cloned().unwrap_or_default(),
                wait: Duration::from_millis(number(reply.get(2))),
            },
            Some("timeout") => Taken::TimedOut {
                id: reply.get(1).cloned().unwrap_or_default(),
            },
            Some("take") => {
                let id = reply.get(1).cloned().unwrap_or_default();
                match reply
                    .get(2)
                    .map(|b| serde_json::from_str::<QueuedCommand>(b))
                {
                    Some(Ok(command)) => Taken::Command {
                        command,
                        now_ms: number(reply.get(3)),
                    },
                    _ => Taken::Unreadable { id },
                }
            }
            _ => Taken::Empty,
        })
    }

    /// Records that the command went out; `false` when this listener no longer holds its lease.
    pub(crate) async fn mark_sent(
        &self,
        keys: &PoolKeys,
        imei: &str,
        id: &str,
        owner: &str,
        response_timeout: Duration,
    ) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let marked: i64 = self
            .scripts
            .mark_sent
            .key(keys.inflight(imei))
            .key(keys.status(id))
            .key(&keys.responses)
            .arg(id)
            .arg(owner)
            .arg(u64::try_from(response_timeout.as_millis()).unwrap_or(u64::MAX))
            .arg(keys.max_len)
            .arg(imei)
            .invoke_async(&mut conn)
            .await?;
        Ok(marked == 1)
    }

    /// Puts a command taken but never written back at the head of the device's queue.
    pub(crate) async fn release(
        &self,
        keys: &PoolKeys,
        imei: &str,
        id: &str,
        owner: &str,
    ) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let released: i64 = self
            .scripts
            .release
            .key(keys.inflight(imei))
            .key(keys.queue(imei))
            .arg(id)
            .arg(owner)
            .invoke_async(&mut conn)
            .await?;
        Ok(released == 1)
    }

    /// Records a final outcome if `id` is still the device's outstanding command; `false` when
    /// it was resolved already (by another listener, or an earlier call).
    pub(crate) async fn resolve(
        &self,
        keys: &PoolKeys,
        imei: &str,
        id: &str,
        outcome: &Outcome,
    ) -> RedisResult<bool> {
        let mut conn = self.conn.clone();
        let (text, hex_answer) = match outcome {
            Outcome::Answered(bytes) => (
                std::str::from_utf8(bytes).unwrap_or("").to_owned(),
                hex(bytes),
            ),
            _ => (String::new(), String::new()),
        };
        let resolved: i64 = self
            .scripts
            .resolve
            .key(keys.inflight(imei))
            .key(keys.status(id))
            .key(&keys.responses)
            .key(&keys.deadlines)
            .arg(id)
            .arg(imei)
            .arg(outcome.status().as_str())
            .arg(outcome.reason().map_or("", CommandReason::as_str))
            .arg(text)
            .arg(hex_answer)
            .arg(keys.max_len)
            .arg(retain_ms())
            .arg(&keys.channel)
            .invoke_async(&mut conn)
            .await?;
        Ok(resolved == 1)
    }

    /// The id of the device's outstanding command, if any (for an answer that arrives on a
    /// connection other than the one the command went out on).
    pub(crate) async fn outstanding(
        &self,
        keys: &PoolKeys,
        imei: &str,
    ) -> RedisResult<Option<String>> {
        let mut conn = self.conn.clone();
        conn.hget(keys.inflight(imei), "id").await
    }

    pub(crate) async fn sweep(&self, keys: &PoolKeys) -> RedisResult<Swept> {
        let mut conn = self.conn.clone();
        let (expired, timed_out, open): (u64, u64, i64) = self
            .scripts
            .sweep
            .key(&keys.deadlines)
            .key(&keys.responses)
            .arg(&keys.base)
            .arg(keys.max_len)
            .arg(BATCH)
            .arg(retain_ms())
            .arg(&keys.channel)
            .invoke_async(&mut conn)
            .await?;
        Ok(Swept {
            expired,
            timed_out,
            open,
        })
    }
}

// === Router ===

/// Reads the pool's command stream as the one consumer of [`COMMANDS_GROUP`], on its own
/// (blocking) connection, while it holds the pool's router lease.
///
/// NB: one router per pool, not every listener in the group: two consumers would route two
/// commands of one device concurrently, and the device could get them out of order.
pub(crate) struct Router {
    pub(crate) conn: ConnectionManager,
    pub(crate) store: CommandStore,
    pub(crate) keys: PoolKeys,
    pub(crate) consumer: String,
    pub(crate) lead: Script,
}

impl Router {
    /// Creates the group if it is missing (from the start of the stream: commands written
    /// before any listener ran are routed too).
    pub(crate) async fn ensure_group(&mut self) -> RedisResult<()> {
        let created: RedisResult<()> = self
            .conn
            .xgroup_create_mkstream(&self.keys.commands, COMMANDS_GROUP, "0")
            .await;
        match created {
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Takes or renews the router lease; `true` while this listener routes the pool.
    pub(crate) async fn lead(&mut self) -> RedisResult<bool> {
        let held: i64 = self
            .lead
            .key(&self.keys.router)
            .arg(&self.consumer)
            .arg(u64::try_from(ROUTER_LEASE.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn)
            .await?;
        Ok(held == 1)
    }

    /// Entries read by an earlier router and never routed (it died between the read and the
    /// ROUTE), oldest first; routing one twice is harmless (ROUTE ignores a known id).
    pub(crate) async fn claim(&mut self) -> RedisResult<Vec<StreamId>> {
        let mut all = Vec::new();
        let mut start = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = self
                .conn
                .xautoclaim_options(
                    &self.keys.commands,
                    COMMANDS_GROUP,
                    &self.consumer,
                    0,
                    &start,
                    StreamAutoClaimOptions::default().count(BATCH),
                )
                .await?;
            all.extend(reply.claimed);
            if reply.next_stream_id == "0-0" || all.len() > 100 * BATCH {
                return Ok(all);
            }
            start = reply.next_stream_id;
        }
    }

    /// New entries (waits up to [`ROUTER_BLOCK`]).
    pub(crate) async fn read(&mut self) -> RedisResult<Vec<StreamId>> {
        let options = StreamReadOptions::default()
            .group(COMMANDS_GROUP, &self.consumer)
            .count(BATCH)
            .block(usize::try_from(ROUTER_BLOCK.as_millis()).unwrap_or(1000));
        let reply: Option<StreamReadReply> = self
            .conn
            .xread_options(&[&self.keys.commands], &[">"], &options)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    pub(crate) fn is_missing_group(err: &RedisError) -> bool {
        err.code() == Some("NOGROUP")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SWEEP builds status, queue and lease keys from the key base in Lua: they must stay the
    /// names `redis_layout` gives.
    #[test]
    fn the_sweep_key_base_matches_the_layout() {
        let keys = PoolKeys::new("tg", "fleet", 10);
        assert_eq!(format!("{}:command:c1", keys.base), keys.status("c1"));
        assert_eq!(format!("{}:cmdqueue:1", keys.base), keys.queue("1"));
        assert_eq!(format!("{}:cmdinflight:1", keys.base), keys.inflight("1"));
        assert!(scripts::SWEEP.contains("':command:'"));
        assert!(scripts::SWEEP.contains("':cmdqueue:'"));
        assert!(scripts::SWEEP.contains("':cmdinflight:'"));
    }
}
