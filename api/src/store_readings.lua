-- trackgate store_readings: stores frames' records exactly once (see api/src/redis_layout.rs).
--
-- One call stores any number of frames for one readings partition, each frame from one device.
-- KEYS[1]: the partition's readings stream; then per frame f, KEYS[2f]: the device's dedup
-- window (a string) and KEYS[2f+1]: the device's dedup set of trackgate 0.1.0 (a sorted set,
-- read and kept up to date while a 0.1.0 listener may still serve the device: the upgrade path).
-- ARGV: maxlen, window (records), ttl_ms, legacy_grace_ms, then per frame: its record count n,
--       imei, codec, port, recv, protocol, and n times a fingerprint (8 bytes) and the 10 field
--       values, `ts` first.
-- The fingerprints of one frame are distinct (the caller drops repeats within a frame).
-- An empty codec means a frame whose empty values are left out of the entry (GT06: no
-- `codec`, `alt`, `priority`, `event`); with a codec (Teltonika) every value is present.
-- Returns, per frame, how many of its records were new (added to the stream), or the error
-- that stopped that frame.
--
-- Frames are stored in order, each as if it had been called alone: a device may have two frames
-- in one call (it reconnected while its first frame was on the way) and the second sees the
-- first's records as stored. A frame whose window Redis refuses (a key of another type, made
-- by hand) gets that error and the others go on; any other error fails the call, which the
-- listener then retries frame by frame (a frame stored before the error is then a resend).
--
-- Run by hand (any 8 characters make a fingerprint):
--   redis-cli --eval store_readings.lua 'trackgate:{fleet:1}:readings' \
--     'trackgate:{fleet:1}:dedup:356307042441013' 'trackgate:{fleet:1}:seen:356307042441013' , \
--     1000000 128 604800000 3600000 1 356307042441013 8 5027 1700000000000 teltonika \
--     fp000001 1700000000000 54.6872345 -3.1000000 120 90 7 42 1 0 '{}'
--
-- The window: a 16-byte header (the newest `ts` stored, as a double; the next slot; the slots
-- filled; the slot count; how many more writes until no fingerprint taken over from a 0.1.0 set
-- is left) and a ring of 8-byte fingerprints: 1,040 bytes at 128, 1,368 B per device by
-- MEMORY USAGE. A record newer than every record stored is new without a lookup: with a device
-- clock that runs forward, that is every record but resends, so the ring is read only for those.
-- Fingerprints taken over from a 0.1.0 set come without their `ts`, so while any is still in
-- the ring every record is looked up.
--
-- The upgrade from 0.1.0: while a 0.1.0 listener has written the device's set within
-- legacy_grace_ms, this script reads that set too and writes what 0.1.0 writes there, so a
-- device that moves between old and new listeners mid-rollout is stored once either way. Once
-- no 0.1.0 listener has written it for that long, its fingerprints move into the ring and the
-- set is deleted.
--
-- Cost is what this script is about (docs/benchmarks.md "Store"): one call carries many frames,
-- number arguments to redis.call are passed as strings (a Lua number is formatted with %.14g,
-- costly), the entry is one XADD with its fields spelled out, the stream is trimmed once per
-- call, and the window is read and written in place. The body runs on every call, so each
-- function below is a closure made per call, and each local it captures an allocation: the
-- frame loop is written out, and its helpers take their state as arguments.
local A = ARGV
local stream, maxlen, window, ttl = KEYS[1], A[1], tonumber(A[2]), A[3]
local HDR, W, FMT = 16, 8, '>dI2I2I2I2'

-- Writes fingerprints fps[from..to] into the ring of `dedup`, oldest first; returns the ring's
-- new head and count. The state goes in and out as arguments: a closure over per-frame locals
-- would cost an allocation per local and per call.
local function push(dedup, exists, head, count, fps, from, to)
  local k = to - from + 1
  if not exists then
    -- Created at its full size: grown by SETRANGE, Redis would double its allocation.
    redis.call('SET', dedup, string.rep('\0', HDR + window * W))
  end
  if k >= window then
    redis.call('SETRANGE', dedup, '16', table.concat(fps, '', to - window + 1, to))
    return 0, window
  end
  local first = window - head
  redis.call('SETRANGE', dedup, string.format('%d', HDR + head * W),
    table.concat(fps, '', from, from + math.min(k, first) - 1))
  if k > first then
    redis.call('SETRANGE', dedup, '16', table.concat(fps, '', from + first, to))
  end
  return (head + k) % window, math.min(count + k, window)
end

-- The first entry a call adds trims the stream (`MAXLEN ~`, whole nodes only); the rest do
-- not: once per call is enough for an approximate bound, and a trim per entry costs.
local trimmed = false
local function xadd(...)
  if trimmed then
    return redis.call('XADD', stream, '*', ...)
  end
  trimmed = true
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', ...)
end

local function hex(fp)
  return string.format('%08x%08x', struct.unpack('>I4I4', fp))
end

local stored, a = {}, 5
for f = 1, (#KEYS - 1) / 2 do
  local dedup, legacy = KEYS[2 * f], KEYS[2 * f + 1]
  local n = tonumber(A[a])
  local imei, codec, port, recv, protocol = A[a + 1], A[a + 2], A[a + 3], A[a + 4], A[a + 5]
  local first, last = a + 6, a + 5 + 11 * n
  a = last + 1
  -- The frame's own window is the one key another device's frame cannot share: if Redis
  -- refuses it (a key of another type, made by hand), this frame fails and the others go on.
  local h = redis.pcall('GETRANGE', dedup, '0', '15')
  if type(h) == 'table' then
    stored[f] = h
  else
    local hwm, head, count, slots, imported = -1, 0, 0, window, 0
    local exists, dirty, ring = #h == HDR, false, nil
    if exists then
      hwm, head, count, slots, imported = struct.unpack(FMT, h)
    end
    if count > 0 and slots ~= window then
      -- The window was resized: keep the newest fingerprints, oldest first, from slot 0.
      local old = redis.call('GETRANGE', dedup, '16', '-1')
      local ordered = string.sub(old, 1, count * W)
      if count == slots then
        ordered = string.sub(old, head * W + 1, slots * W) .. string.sub(old, 1, head * W)
      end
      count = math.min(count, window)
      imported = math.min(imported, count)
      head = count % window
      redis.call('SET', dedup, struct.pack(FMT, hwm, head, count, window, imported)
        .. string.sub(ordered, -count * W) .. string.rep('\0', (window - count) * W))
      dirty = true
    end

    -- A 0.1.0 listener sets its set's TTL to ttl_ms on every write; this script never does,
    -- so ttl_ms - PTTL is the time since a 0.1.0 listener last stored a record of this device.
    local dual = false
    local pttl = redis.call('PTTL', legacy)
    if pttl ~= -2 then
      if pttl >= 0 and tonumber(ttl) - pttl < tonumber(A[4]) then
        dual = true
      else
        local members = redis.call('ZRANGE', legacy, '0', '-1')
        local fps = {}
        for i, m in ipairs(members) do
          fps[i] = struct.pack('>I4I4', tonumber(string.sub(m, 1, 8), 16),
            tonumber(string.sub(m, 9, 16), 16))
        end
        if #fps > 0 then
          head, count = push(dedup, exists, head, count, fps, 1, #fps)
          exists, dirty = true, true
        end
        -- Until every slot now in the ring has been overwritten, a taken-over fingerprint
        -- may still be there.
        imported = count
        redis.call('DEL', legacy)
      end
    end

    local fps, k, top = {}, 0, hwm
    for r = first, last, 11 do
      local fp, ts = A[r], tonumber(A[r + 1])
      local fresh = ts > hwm and imported == 0
      if not fresh then
        -- Looked up in the ring: a match on a slot boundary is a record already stored.
        fresh = true
        if count > 0 then
          ring = ring or redis.call('GETRANGE', dedup, '16', '-1')
          local span, i = count * W, 1
          while true do
            local p = string.find(ring, fp, i, true)
            if not p or p > span then break end
            if p % W == 1 then
              fresh = false
              break
            end
            i = p + 1
          end
        end
      end
      if fresh and dual then
        fresh = not redis.call('ZSCORE', legacy, hex(fp))
      end
      if fresh then
        if codec ~= '' then
          xadd('imei', imei,
            'ts', A[r + 1], 'lat', A[r + 2], 'lon', A[r + 3], 'alt', A[r + 4], 'angle', A[r + 5],
            'sats', A[r + 6], 'speed', A[r + 7], 'priority', A[r + 8], 'event', A[r + 9],
            'io', A[r + 10], 'codec', codec, 'protocol', protocol, 'port', port, 'recv', recv)
        else
          -- NB: built here, not per call: only frames without a codec (GT06) need the names.
          local names = {'ts','lat','lon','alt','angle','sats','speed','priority','event','io'}
          local e = {'imei', imei}
          for j = 1, 10 do
            if A[r + j] ~= '' then
              e[#e + 1] = names[j]
              e[#e + 1] = A[r + j]
            end
          end
          e[#e + 1] = 'protocol'; e[#e + 1] = protocol
          e[#e + 1] = 'port'; e[#e + 1] = port
          e[#e + 1] = 'recv'; e[#e + 1] = recv
          xadd(unpack(e))
        end
        k = k + 1
        fps[k] = fp
        if ts > top then top = ts end
      end
    end

    if k > 0 then
      head, count = push(dedup, exists, head, count, fps, 1, k)
      dirty = true
    end
    if dirty then
      imported = math.max(imported - k, 0)
      redis.call('SETRANGE', dedup, '0', struct.pack(FMT, top, head, count, window, imported))
      redis.call('PEXPIRE', dedup, ttl)
    end
    if dual and k > 0 then
      -- Exactly what 0.1.0 writes, so a 0.1.0 listener sees these records as stored; the
      -- set's TTL is left alone (see above).
      redis.call('ZREMRANGEBYRANK', legacy, '0',
        string.format('%d', -(math.max(window - k, 0) + 1)))
      for i = 1, k do
        redis.call('ZADD', legacy, string.format('%d', tonumber(recv) * 1000 + i), hex(fps[i]))
      end
    end
    stored[f] = k
  end
end
return stored
