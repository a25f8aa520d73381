-- Takes the fill lock of a URL: a field of the URL's own hash, so that the
-- check and the lock are atomic and live on the entry's cluster slot.
-- KEYS[1] the URL's hash; ARGV[1] token; ARGV[2] lock TTL (ms);
-- ARGV[3] the variant field the request selects ('' when unknown);
-- ARGV[4] 'fill' (a miss: report an entry stored meanwhile) or 'refresh'
-- (a stale entry: report it replaced since, i.e. the variant's stored
-- response time, bytes 7..14 of the entry, is later than ARGV[5], the
-- stale entry's, both 8-byte big-endian so they compare as strings).
-- Returns 'acquired:<µs>' (with Redis' time in µs: the fill asks the
-- origin no earlier than that), 'held' (someone else holds a live lock) or
-- 'filled'.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[4] == 'fill' then
  local probe = ARGV[3]
  if probe == '' then probe = 'vary' end
  if redis.call('HEXISTS', KEYS[1], probe) == 1 then return 'filled' end
elseif ARGV[3] ~= '' then
  local entry = redis.call('HGET', KEYS[1], ARGV[3])
  if entry and string.sub(entry, 7, 14) > ARGV[5] then return 'filled' end
end
local held = redis.call('HGET', KEYS[1], 'lk')
if held then
  local expires = tonumber(string.match(held, ':(%d+)$'))
  if expires and expires > now then return 'held' end
end
redis.call('HSET', KEYS[1], 'lk', ARGV[1] .. ':' .. (now + tonumber(ARGV[2])))
-- A lock taken in a tombstone (delete.lua) outlives it.
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 'acquired:' .. string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
