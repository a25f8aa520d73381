-- Ends the old id of a cycle (`cycle_id`) made during an outage, when the
-- outage queue is written: 1 when Redis still held it, 0 when it was gone
-- (ended elsewhere meanwhile, or timed out). Taking it leaves a marker,
-- under the same hash tag, naming the new id: a retry of this replay after
-- a lost reply finds its own work, and answers 1 again.
-- KEYS[1] the old session hash, KEYS[2] its marker
-- ARGV[1] the new id's storage key, ARGV[2] the marker's lifetime (ms)
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
if redis.call('GET', KEYS[2]) == ARGV[1] then return 1 end
return 0
