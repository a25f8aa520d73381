-- Deletes every variant of a URL (a hard purge, or an invalidation) and
-- leaves a tombstone in its place: a hash holding only `pg`, the time of
-- the deletion, that lives as long as a fill lock can (ARGV[1], ms). A
-- fill that asked the origin before the deletion lost its lock with the
-- hash; put.lua, finding the tombstone and not its lock, drops its entry
-- instead of bringing back what was just deleted. Lookups read the
-- tombstone as no entry, and a new fill takes the lock in it as usual.
-- A URL with neither a fill lock nor a tombstone has no fill under way to
-- outlive: it is deleted and nothing is left. A tombstone already there is
-- kept and renewed: a fill that lost its lock to the first deletion still
-- finds it after a second one.
-- KEYS[1] the URL's hash. Returns 1 when the URL had an entry or a lock.
local fields = redis.call('HLEN', KEYS[1]) - redis.call('HEXISTS', KEYS[1], 'pg')
local keep = redis.call('HEXISTS', KEYS[1], 'lk') + redis.call('HEXISTS', KEYS[1], 'pg')
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
