-- Ends the old id of a cycle (`cycle_id`) made during an outage, when the
-- outage queue is written: {1, user} when Redis still held it (`user` the
-- one it held, whose index the id leaves, or nil), {0, nil} when it was
-- gone (ended elsewhere meanwhile, or timed out). Taking it leaves a
-- marker, under the same hash tag, naming the new id: a retry of this
-- replay after a lost reply finds its own work, and answers {1, nil}.
-- KEYS[1] the old session hash, KEYS[2] its marker
-- ARGV[1] the new id's storage key, ARGV[2] the marker's lifetime (ms)
local user = redis.call('HGET', KEYS[1], '_u')
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {1, user}
end
if redis.call('GET', KEYS[2]) == ARGV[1] then return {1, false} end
return {0, false}
