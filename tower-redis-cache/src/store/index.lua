-- Records a URL under a tag or a path prefix.
-- KEYS[1] the index (a sorted set: URL -> when its entry expires, ms);
-- ARGV[1] the URL; ARGV[2] how long its entry is kept (ms).
-- Members whose entries have expired are pruned on the way, so an index
-- holds about as many members as there are live entries under it, and a
-- purge costs O(entries under the tag or prefix).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], 'GT', now + keep, ARGV[1])
if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
return 1
