-- Deletes every variant of a URL (a hard purge, or an invalidation) and
-- leaves a tombstone in its place: a hash holding only `pg`, the time of
-- the deletion (Redis' clock), that lives twelve fill lock lifetimes
-- (ARGV[1], ms; put.lua drops a fill that asked longer ago than that). A
-- fill that asked the origin before the deletion, with its lock (lost
-- with the hash) or without one, finds the tombstone newer
-- than its question (put.lua) and drops its entry instead of bringing
-- back what was just deleted. Lookups read the tombstone as no entry, and
-- a new fill takes the lock in it as usual.
-- Where a tombstone is left, by ARGV[2]:
-- 'stored' where the URL had anything (an entry, a lock, a tombstone): an
--   invalidation, which a client's unsafe request makes, writes nothing to
--   Redis for a URL with nothing;
-- 'always' also where it had nothing (a purge of that one URL, which a
--   fill on some instance may be asking the origin for);
-- 'locked' only where a fill lock or a tombstone is (the deletion of a
--   value that does not decode: a fill of a value that does may store).
-- A tombstone already there is renewed: a fill that lost its lock to the
-- first deletion still finds it after a second one.
-- KEYS[1] the URL's hash. Returns 1 when the URL had an entry or a lock.
local fields = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], 'pg')
local keep = 1
if ARGV[2] == 'stored' then
  keep = redis.call('EXISTS', KEYS[1])
elseif ARGV[2] ~= 'always' then
  keep = redis.call('HEXISTS', KEYS[1], 'lk') + redis.call('HEXISTS', KEYS[1], 'pg')
end
redis.call('DEL', KEYS[1])
if keep == 0 then
  if fields > 0 then return 1 end
  return 0
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'pg', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if fields > 0 then return 1 end
return 0
