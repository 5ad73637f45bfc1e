//! The command path's Redis side: the scripts that move a command through its states, the
//! router (consumer group on the command stream), the wake-up subscription and the sweeper.
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

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisError, RedisResult, Script, Value};
use trackgate_api::redis_layout::{
    self as layout, COMMAND_STATUS_RETENTION_SECONDS, COMMANDS_GROUP, CommandReason, CommandStatus,
    DEFAULT_COMMAND_TTL_SECONDS, MAX_COMMAND_BYTES, MAX_COMMAND_ID_LEN, MAX_COMMAND_TTL_SECONDS,
    command_field as field,
};
use trackgate_protocol::Imei;

const ROUTE: &str = r"
-- KEYS: commands stream, members, device queue, status hash, responses, deadlines.
-- ARGV: group, entry id, id, imei, codec, payload hex, ttl ms, retain ms, maxlen,
--       command text (or ''), reject reason (or ''), ready channel.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 'duplicate'
end
local reason = ARGV[11]
if reason == '' and redis.call('HEXISTS', KEYS[2], ARGV[4]) == 0 then
  reason = 'unknown_imei'
end
local status = 'queued'
if reason ~= '' then status = 'failed' end
local expires = string.format('%d', now + tonumber(ARGV[7]))
local nows = string.format('%d', now)
redis.call('HSET', KEYS[4], 'id', ARGV[3], 'imei', ARGV[4], 'codec', ARGV[5], 'status', status,
  'created', nows, 'expires', expires, 'ts', nows)
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[4], 'command', ARGV[10])
else
  redis.call('HSET', KEYS[4], 'payload', ARGV[6])
end
local entry = {'id', ARGV[3], 'imei', ARGV[4], 'status', status}
if reason ~= '' then
  redis.call('HSET', KEYS[4], 'reason', reason)
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
  entry[#entry + 1] = 'reason'; entry[#entry + 1] = reason
else
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[7]) + tonumber(ARGV[8]))
  redis.call('RPUSH', KEYS[3], cjson.encode({id = ARGV[3], codec = tonumber(ARGV[5]),
    payload = ARGV[6], expires = expires}))
  redis.call('ZADD', KEYS[6], expires, ARGV[3])
end
entry[#entry + 1] = 'ts'; entry[#entry + 1] = nows
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[9], '*', unpack(entry))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if status == 'queued' then redis.call('PUBLISH', ARGV[12], ARGV[4]) end
return status
";

const TAKE: &str = r"
-- KEYS: device queue, device lease. ARGV: owner, lease ms.
-- Returns {'empty'} | {'busy', id, wait ms} | {'timeout', id} | {'take', id, body, now}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 1 then
  local f = redis.call('HMGET', KEYS[2], 'id', 'deadline', 'sent', 'body')
  local wait = tonumber(f[2]) - now
  if wait > 0 then return {'busy', f[1], string.format('%d', wait)} end
  if f[3] == '1' then return {'timeout', f[1]} end
  -- Taken but never confirmed written: its taker died first. Back to the head of the queue.
  redis.call('LPUSH', KEYS[1], f[4])
  redis.call('DEL', KEYS[2])
end
local body = redis.call('LPOP', KEYS[1])
if not body then return {'empty'} end
local id = cjson.decode(body).id
redis.call('HSET', KEYS[2], 'id', id, 'body', body, 'owner', ARGV[1],
  'deadline', string.format('%d', now + tonumber(ARGV[2])), 'sent', '0')
return {'take', id, body, string.format('%d', now)}
";

const MARK_SENT: &str = r"
-- KEYS: device lease, status hash, responses. ARGV: id, owner, response timeout ms, maxlen, imei.
local f = redis.call('HMGET', KEYS[1], 'id', 'owner')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nows = string.format('%d', now)
redis.call('HSET', KEYS[1], 'sent', '1', 'deadline', string.format('%d', now + tonumber(ARGV[3])))
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'status', 'sent', 'sent_at', nows, 'ts', nows)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'imei', ARGV[5],
  'status', 'sent', 'ts', nows)
return 1
";

const RESOLVE: &str = r"
-- KEYS: device lease, status hash, responses, deadlines.
-- ARGV: id, imei, status, reason, answer, answer hex, maxlen, retain ms, ready channel.
-- Compare-and-delete on the lease's id: a command is resolved, and recorded, once.
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local nows = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[1])
local entry = {'id', ARGV[1], 'imei', ARGV[2], 'status', ARGV[3]}
if ARGV[4] ~= '' then entry[#entry + 1] = 'reason'; entry[#entry + 1] = ARGV[4] end
if ARGV[6] ~= '' then
  if ARGV[5] ~= '' then entry[#entry + 1] = 'answer'; entry[#entry + 1] = ARGV[5] end
  entry[#entry + 1] = 'answer_hex'; entry[#entry + 1] = ARGV[6]
end
entry[#entry + 1] = 'ts'; entry[#entry + 1] = nows
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], unpack(entry))
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', unpack(entry))
redis.call('PUBLISH', ARGV[9], ARGV[2])
return 1
";

const SWEEP: &str = r"
-- KEYS: deadlines, responses. ARGV: key base '<prefix>:{<pool>}', maxlen, limit, retain ms,
-- ready channel. Returns {expired, timed out, commands still open}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nows = string.format('%d', now)
local expired, timed_out = 0, 0
local function record(skey, id, imei, status, reason)
  local entry = {'id', id, 'imei', imei, 'status', status, 'reason', reason, 'ts', nows}
  if redis.call('EXISTS', skey) == 1 then
    redis.call('HSET', skey, unpack(entry))
    redis.call('PEXPIRE', skey, ARGV[4])
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(entry))
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local skey = ARGV[1] .. ':command:' .. id
  local imei = redis.call('HGET', skey, 'imei')
  local done = true
  if imei then
    local queue = ARGV[1] .. ':cmdqueue:' .. imei
    local queued = false
    for _, body in ipairs(redis.call('LRANGE', queue, 0, -1)) do
      if cjson.decode(body).id == id then
        redis.call('LREM', queue, 1, body)
        queued = true
        break
      end
    end
    if queued then
      record(skey, id, imei, 'expired', 'ttl')
      expired = expired + 1
    else
      local lease = ARGV[1] .. ':cmdinflight:' .. imei
      local f = redis.call('HMGET', lease, 'id', 'deadline', 'sent')
      if f[1] == id then
        if tonumber(f[2]) <= now then
          -- Its taker died and the device never came back to take the next one.
          redis.call('DEL', lease)
          if f[3] == '1' then
            record(skey, id, imei, 'failed', 'timeout')
            timed_out = timed_out + 1
          else
            record(skey, id, imei, 'expired', 'ttl')
            expired = expired + 1
          end
          redis.call('PUBLISH', ARGV[5], imei)
        else
          -- Still leased: look again when the lease ends.
          redis.call('ZADD', KEYS[1], f[2], id)
          done = false
        end
      end
    end
  end
  if done then redis.call('ZREM', KEYS[1], id) end
end
return {expired, timed_out, redis.call('ZCARD', KEYS[1])}
";

const RELEASE: &str = r"
-- KEYS: device lease, device queue. ARGV: id, owner.
-- A command taken but not written (its session closed first) goes back to the head at once.
local f = redis.call('HMGET', KEYS[1], 'id', 'owner', 'sent', 'body')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] or f[3] ~= '0' then return 0 end
redis.call('LPUSH', KEYS[2], f[4])
redis.call('DEL', KEYS[1])
return 1
";

const MEMBERS_REMOVE: &str = r"
-- KEYS: members. ARGV: shard, then IMEIs: each removed only if this shard still owns it, so a
-- device moved to another shard is not removed by its old shard's reload.
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
";

const LEAD: &str = r"
-- KEYS: router lease. ARGV: owner, lease ms. Takes or renews the lease; 1 when held.
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

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

// === Entries ===

/// A command-stream entry, checked: what ROUTE gets.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Routed {
    pub(crate) id: String,
    pub(crate) imei: String,
    pub(crate) codec: u8,
    pub(crate) payload: Vec<u8>,
    pub(crate) text: Option<String>,
    pub(crate) ttl: Duration,
    /// Set when the entry cannot be sent: it is recorded `failed` with this reason.
    pub(crate) reject: Option<CommandReason>,
}

/// Reads one entry of the command stream. Never fails: a bad entry becomes a `failed` command
/// with a reason, so its producer learns why.
pub(crate) fn parse_entry(entry_id: &str, fields: &HashMap<String, Value>) -> Routed {
    let get = |name: &str| -> Option<String> {
        match fields.get(name)? {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut reject = None;
    let mut bad = |reason| {
        reject.get_or_insert(reason);
    };
    let id = match get(field::ID) {
        Some(id) if is_valid_id(&id) => id,
        Some(_) => {
            bad(CommandReason::Malformed);
            entry_id.to_owned()
        }
        None => entry_id.to_owned(),
    };
    let imei = get(field::IMEI).unwrap_or_default();
    if Imei::parse(&imei).is_err() {
        bad(CommandReason::Malformed);
    }
    let codec = match get(field::CODEC).as_deref().map(str::trim) {
        None | Some("" | "12") => 12,
        Some("14") => 14,
        Some(_) => {
            bad(CommandReason::Malformed);
            12
        }
    };
    let ttl = match get(field::TTL).map(|s| s.trim().parse::<u64>()) {
        None => DEFAULT_COMMAND_TTL_SECONDS,
        Some(Ok(s)) if (1..=MAX_COMMAND_TTL_SECONDS).contains(&s) => s,
        Some(_) => {
            bad(CommandReason::Malformed);
            DEFAULT_COMMAND_TTL_SECONDS
        }
    };
    let (payload, text) = match (get(field::COMMAND), get(field::PAYLOAD)) {
        (Some(text), None) if !text.is_empty() => (text.clone().into_bytes(), Some(text)),
        (None, Some(hex)) => match from_hex(&hex) {
            Some(bytes) if !bytes.is_empty() => (bytes, None),
            _ => {
                bad(CommandReason::Malformed);
                (Vec::new(), None)
            }
        },
        _ => {
            bad(CommandReason::Malformed);
            (Vec::new(), None)
        }
    };
    if payload.len() > MAX_COMMAND_BYTES {
        bad(CommandReason::TooLarge);
    }
    Routed {
        id,
        imei,
        codec,
        payload,
        text,
        ttl: Duration::from_secs(ttl),
        reject,
    }
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_COMMAND_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
}

/// A command taken from a device's queue (the JSON body ROUTE wrote).
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct QueuedCommand {
    pub(crate) id: String,
    pub(crate) codec: u8,
    /// Hex.
    payload: String,
    /// Ms since the epoch (Redis time).
    expires: String,
}

impl QueuedCommand {
    pub(crate) fn payload(&self) -> Option<Vec<u8>> {
        from_hex(&self.payload)
    }

    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        self.expires.parse::<u64>().map_or(true, |e| e <= now_ms)
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
    Script::new(LEAD)
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
                route: Script::new(ROUTE),
                take: Script::new(TAKE),
                mark_sent: Script::new(MARK_SENT),
                resolve: Script::new(RESOLVE),
                sweep: Script::new(SWEEP),
                release: Script::new(RELEASE),
                members_remove: Script::new(MEMBERS_REMOVE),
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
                // NB: an empty answer still gets a non-empty marker so the script records it.
                if bytes.is_empty() {
                    "-".to_owned()
                } else {
                    hex(bytes)
                },
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

// === Hex ===

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    crate::session::hex(bytes)
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Routed {
        let map = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::BulkString(v.as_bytes().to_vec())))
            .collect();
        parse_entry("1-0", &map)
    }

    #[test]
    fn a_text_command_defaults_to_codec_12_and_an_hour() {
        let r = entry(&[
            ("id", "c1"),
            ("imei", "356307042441013"),
            ("command", "getinfo"),
        ]);
        assert_eq!(r.reject, None);
        assert_eq!((r.codec, r.ttl), (12, Duration::from_secs(3600)));
        assert_eq!(r.payload, b"getinfo");
        assert_eq!(r.text.as_deref(), Some("getinfo"));
    }

    #[test]
    fn a_raw_payload_and_codec_14() {
        let r = entry(&[
            ("imei", "356307042441013"),
            ("payload", "0303AB"),
            ("codec", "14"),
            ("ttl", "60"),
        ]);
        assert_eq!(r.reject, None);
        assert_eq!(r.id, "1-0", "the entry id stands in for a missing id");
        assert_eq!((r.codec, r.payload.as_slice()), (14, &[3u8, 3, 0xAB][..]));
    }

    #[test]
    fn bad_entries_get_a_reason() {
        let imei = ("imei", "356307042441013");
        let cases: [(&[(&str, &str)], CommandReason); 7] = [
            (
                &[("imei", "12"), ("command", "getver")],
                CommandReason::Malformed,
            ),
            (&[imei], CommandReason::Malformed),
            (
                &[imei, ("command", "a"), ("payload", "00")],
                CommandReason::Malformed,
            ),
            (&[imei, ("payload", "0g")], CommandReason::Malformed),
            (
                &[imei, ("command", "a"), ("codec", "13")],
                CommandReason::Malformed,
            ),
            (
                &[imei, ("command", "a"), ("ttl", "0")],
                CommandReason::Malformed,
            ),
            (
                &[imei, ("id", "a{b}"), ("command", "a")],
                CommandReason::Malformed,
            ),
        ];
        for (fields, reason) in cases {
            assert_eq!(entry(fields).reject, Some(reason), "{fields:?}");
        }
        let big = "x".repeat(MAX_COMMAND_BYTES + 1);
        assert_eq!(
            entry(&[imei, ("command", &big)]).reject,
            Some(CommandReason::TooLarge)
        );
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(from_hex("00ab0F"), Some(vec![0, 0xab, 0x0f]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(hex(&[1, 0xfe]), "01fe");
    }
}
