//! The command path's Lua scripts: each moves a command through one transition atomically.
//! Their declared keys share the pool's hash tag (see `store`).

pub(super) const ROUTE: &str = r"
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
if reason == '' and redis.call('HEXISTS', KEYS[2], ARGV[4]) == 0
    and redis.call('HEXISTS', KEYS[2], '*') == 0 then
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

pub(super) const TAKE: &str = r"
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

pub(super) const MARK_SENT: &str = r"
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

pub(super) const RESOLVE: &str = r"
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
if ARGV[3] == 'answered' then
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

pub(super) const SWEEP: &str = r"
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

pub(super) const RELEASE: &str = r"
-- KEYS: device lease, device queue. ARGV: id, owner.
-- A command taken but not written (its session closed first) goes back to the head at once.
local f = redis.call('HMGET', KEYS[1], 'id', 'owner', 'sent', 'body')
if f[1] ~= ARGV[1] or f[2] ~= ARGV[2] or f[3] ~= '0' then return 0 end
redis.call('LPUSH', KEYS[2], f[4])
redis.call('DEL', KEYS[1])
return 1
";

pub(super) const MEMBERS_REMOVE: &str = r"
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

pub(super) const LEAD: &str = r"
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
