-- Stores one variant of a URL.
-- KEYS[1] the URL's hash; ARGV[1] vary names; ARGV[2] variant field;
-- ARGV[3] entry; ARGV[4] keep-for (ms); ARGV[5] most variants per URL;
-- ARGV[6] the token of the fill lock to release ('' for none).
-- Variants have no TTL of their own, so a URL that collects more than the
-- limit (a Vary on a header clients vary freely) starts over: memory stays
-- bounded whatever clients send. A soft-purge mark (`sp`) stays: it only
-- makes entries older than it stale, and the new entry is newer.
-- The entry's response time (bytes 7..14, ms since the epoch, big-endian)
-- is replaced with Redis' own clock, the clock soft-purge marks are taken
-- from: instances whose clocks disagree then still agree on which entries
-- a soft purge made stale.
local entry = ARGV[3]
if string.sub(entry, 1, 3) == 'TRC' and #entry >= 14 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local bytes = {}
  for i = 8, 1, -1 do
    bytes[i] = string.char(now % 256)
    now = math.floor(now / 256)
  end
  entry = string.sub(entry, 1, 6) .. table.concat(bytes) .. string.sub(entry, 15)
end
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[5]) then redis.call('DEL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'vary', ARGV[1], ARGV[2], entry)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if ARGV[6] ~= '' then
  local held = redis.call('HGET', KEYS[1], 'lk')
  if held and string.sub(held, 1, #ARGV[6] + 1) == ARGV[6] .. ':' then
    redis.call('HDEL', KEYS[1], 'lk')
  end
end
return 1
