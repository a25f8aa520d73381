-- Takes a session away from its id, for `cycle_id`: returns its fields and
-- deletes it, atomically. Returns nil when it is gone (destroyed, revoked,
-- cycled or expired meanwhile), so a cycle can never bring it back.
-- Taking it leaves the marker `end_cycled.lua` leaves, naming the new id:
-- when the cycle's second step (writing the new id) fails, or its reply
-- is lost, the whole cycle is queued, and its replay finds the old id
-- taken by this very cycle (not ended by another request) and writes the
-- new one.
-- KEYS[1] the session hash, KEYS[2] its marker
-- ARGV[1] absolute timeout (ms), ARGV[2] the new id's storage key,
-- ARGV[3] the marker's lifetime (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local created = tonumber(redis.call('HGET', KEYS[1], '_c'))
if not created then return false end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
if created + tonumber(ARGV[1]) <= now then return false end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return fields
