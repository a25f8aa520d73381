-- Records a URL under a tag or a path prefix, and tells a fill whether a
-- purge of that tag or prefix came after its question.
-- KEYS[1] the index (a sorted set: URL -> when its entry expires, ms; and
-- the member "\0purged", the mark of the newest purge through the index,
-- scored minus its time in µs, Redis' clock);
-- ARGV[1] the URL; ARGV[2] how long its entry is kept (ms);
-- ARGV[3] when the fill's lock was granted (µs, Redis' clock: it asked the
-- origin no earlier), or '' ; ARGV[4] how long ago the fill asked, with a
-- margin for its write's way here (ms), for a fill without a lock, or '';
-- both '' for a write that is no fill; ARGV[5] how long a purge's mark
-- lives (a tombstone's life, ms); ARGV[6] the token of the fill's lock,
-- or ''.
-- KEYS[2] (not on a Redis Cluster, where it may live on another node) the
-- URL's hash, whose store follows this record in the same pipeline.
-- A purge by tag (or of everything) removes the entries its index names; a
-- fill of a URL not stored yet is not named, so the purge leaves the mark,
-- and a fill that asked before it learns here that it must not keep its
-- answer (returns 0; 1 otherwise; a mark in the same µs as the lock
-- counts as newer). With KEYS[2], the URL is given the
-- tombstone the purge would have left (its time now, the fill's lock
-- gone), so the store after this drops the answer before anyone sees it;
-- without,
-- the instance deletes what it stored. Members whose entries have expired
-- are pruned on the way (the mark's negative score is not among them, and
-- goes once its life is over), so an index holds about as many members as
-- there are live entries under it, and a purge costs O(entries under the
-- tag or prefix).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local keep = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, now)
local purged = false
local mark = redis.call('ZSCORE', KEYS[1], '\0purged')
if mark then
  local at = -tonumber(mark)
  local asked = nil
  if (ARGV[3] or '') ~= '' then
    asked = tonumber(ARGV[3])
  elseif (ARGV[4] or '') ~= '' then
    asked = now_us - tonumber(ARGV[4]) * 1000
  end
  if at + tonumber(ARGV[5] or '0') * 1000 <= now_us then
    redis.call('ZREM', KEYS[1], '\0purged')
  elseif asked and at >= asked then
    purged = true
    if KEYS[2] then
      redis.call('HSET', KEYS[2], 'pg', now)
      -- The fill's own lock goes (another fill's, begun since, stays).
      local lock = redis.call('HGET', KEYS[2], 'lk')
      if ARGV[6] ~= '' and lock and string.sub(lock, 1, #ARGV[6] + 1) == ARGV[6] .. ':' then
        redis.call('HDEL', KEYS[2], 'lk')
      end
      if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[5]) then
        redis.call('PEXPIRE', KEYS[2], ARGV[5])
      end
    end
  end
end
redis.call('ZADD', KEYS[1], 'GT', now + keep, ARGV[1])
if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
if purged then return 0 end
return 1
