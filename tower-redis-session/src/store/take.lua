-- Takes a session away from its id, for `cycle_id`: returns its fields and
-- deletes it, atomically. Returns nil when it is gone (destroyed, revoked,
-- cycled or expired meanwhile), so a cycle can never bring it back.
-- KEYS[1] the session hash; ARGV[1] absolute timeout (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local created = tonumber(redis.call('HGET', KEYS[1], '_c'))
if not created then return false end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
if created + tonumber(ARGV[1]) <= now then return false end
return fields
