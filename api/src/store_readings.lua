-- trackgate store_readings: stores one frame's records exactly once (see api/src/redis_layout.rs).
--
-- KEYS[1]: the partition's readings stream; KEYS[2]: the device's recent-fingerprint set.
-- ARGV: maxlen, window (records), ttl_ms, imei, codec, port, recv, protocol,
--       then per record: fingerprint and the 10 field values.
-- An empty value (codec, protocol or a record field) leaves that field out of the entry:
-- Teltonika entries have no `protocol`, GT06 entries no `codec`, `alt`, `priority`, `event`.
-- Returns how many records were new (added to the stream).
--
-- Run by hand:
--   redis-cli --eval store_readings.lua 'trackgate:{fleet:1}:readings' \
--     'trackgate:{fleet:1}:seen:356307042441013' , 1000000 128 604800000 356307042441013 \
--     8 5027 1700000000000 '' 00000000000000ab 1700000000000 54.6872345 -3.1000000 120 90 7 42 1 0 '{}'
local names = {'ts','lat','lon','alt','angle','sats','speed','priority','event','io'}
local new, pending = {}, {}
for a = 9, #ARGV, 11 do
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
    if ARGV[a + j] ~= '' then
      e[#e + 1] = names[j]
      e[#e + 1] = ARGV[a + j]
    end
  end
  if ARGV[5] ~= '' then e[#e + 1] = 'codec'; e[#e + 1] = ARGV[5] end
  if ARGV[8] ~= '' then e[#e + 1] = 'protocol'; e[#e + 1] = ARGV[8] end
  e[#e + 1] = 'port'; e[#e + 1] = ARGV[6]
  e[#e + 1] = 'recv'; e[#e + 1] = ARGV[7]
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(e))
  redis.call('ZADD', KEYS[2], string.format('%d', tonumber(ARGV[7]) * 1000 + seq), ARGV[a])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return #new
