-- Loads a session and refreshes its idle TTL in the same command.
-- KEYS[1] the session hash; ARGV[1] idle timeout (ms); ARGV[2] absolute timeout (ms)
-- Returns nil when the session does not exist or has outlived its absolute
-- timeout (then it is deleted), else HGETALL.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local created = tonumber(redis.call('HGET', KEYS[1], '_c'))
if not created then return false end
local deadline = created + tonumber(ARGV[2])
if deadline <= now then
  redis.call('DEL', KEYS[1])
  return false
end
redis.call('PEXPIRE', KEYS[1], math.min(tonumber(ARGV[1]), deadline - now))
return redis.call('HGETALL', KEYS[1])
