-- Marks every entry of a URL stored before now as stale (soft purge): they
-- may still be served stale-while-revalidate while a refresh happens.
-- KEYS[1] the URL's hash. The mark is Redis' own time (ms since the epoch),
-- the clock every entry's response time is stamped with when stored
-- (put.lua), never an instance's clock. The fill lock goes with it, so
-- that a fill that asked the origin before the mark does not store a
-- response that would look newer than it (put.lua).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
-- A tombstone (delete.lua) has nothing to mark.
if redis.call('HLEN', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'pg') == 1 then
  return 0
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'sp', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('HDEL', KEYS[1], 'lk')
return 1
