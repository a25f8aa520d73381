-- Stores one variant of a URL.
-- KEYS[1] the URL's hash; ARGV[1] vary names; ARGV[2] variant field;
-- ARGV[3] entry; ARGV[4] keep-for (ms); ARGV[5] most variants per URL;
-- ARGV[6] the token of the fill lock to release ('' for none).
-- Variants have no TTL of their own, so a URL that collects more than the
-- limit (a Vary on a header clients vary freely) starts over: memory stays
-- bounded whatever clients send. The URL's marks stay: the fill lock
-- (`lk`), a purge's tombstone (`pg`), which the fills that asked the origin
-- before the purge must still find, and the soft-purge mark (`sp`), which
-- only makes entries older than it stale (the new entry is newer).
-- The entry's response time (bytes 7..14, ms since the epoch, big-endian)
-- is replaced with Redis' own clock, the clock soft-purge marks are taken
-- from: instances whose clocks disagree then still agree on which entries
-- a soft purge made stale.
-- A partial entry (version 2) never replaces a fresh complete one (version
-- 1) of the same variant: a range request that raced a whole fill must not
-- leave the URL with less than it had. A stale or soft-purged one it does.
-- ARGV[7] how long ago (ms) the fill asked the origin, by the storing
-- instance's clock, with a margin for this write's own way here ('' for a
-- write that is no fill): a duration, which clocks that disagree on the
-- time still agree on. ARGV[8] how long a purge's tombstone lives (ms): a
-- fill without its lock that asked longer ago than that is dropped, as a
-- purge early in its question may have left a tombstone gone by now.
-- A fill that asked the origin before its URL was purged or soft-purged
-- (delete.lua leaves `pg`, soft_purge.lua `sp`, both in Redis' time, and
-- both drop the lock) has its entry dropped, not stored: the mark is newer
-- than its question. A fill that still holds its lock saw no purge since
-- it took it, and stores; one that took a lock and lost it is dropped
-- whenever a mark is there. Returns 1 when stored, else why it was not
-- (0, 2 or 3: below). The lock is read once, here, and released at the
-- end.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ago = ARGV[7] or ''
local ours = false
if ARGV[6] ~= '' or ago ~= '' then
  local marks = redis.call('HMGET', KEYS[1], 'lk', 'pg', 'sp')
  ours = ARGV[6] ~= '' and marks[1] and string.sub(marks[1], 1, #ARGV[6] + 1) == ARGV[6] .. ':'
  if not ours then
    -- Dropped, and why: 0 a purge or soft purge is newer than the
    -- question; 2 asked longer ago than a tombstone lives (ARGV[8], ms),
    -- so a purge made early in the question may have left one that is
    -- gone now; 3 took a lock and lost it (it outlived the lock) where
    -- the URL holds an older mark.
    local asked = ago ~= '' and now - tonumber(ago) or nil
    local function newer(mark)
      return mark and asked and (tonumber(mark) or asked) >= asked
    end
    if newer(marks[2]) or newer(marks[3]) then return 0 end
    if ago ~= '' and tonumber(ago) >= tonumber(ARGV[8]) then return 2 end
    if ARGV[6] ~= '' and (marks[2] or marks[3]) then return 3 end
  end
end
local entry = ARGV[3]
local function u64(s, at)
  local n = 0
  for i = at, at + 7 do n = n * 256 + string.byte(s, i) end
  return n
end
local keep_complete = false
if string.sub(entry, 1, 3) == 'TRC' and string.byte(entry, 4) == 2 then
  local old = redis.call('HGET', KEYS[1], ARGV[2])
  if old and #old >= 30 and string.sub(old, 1, 3) == 'TRC' and string.byte(old, 4) == 1 then
    local stored_at = u64(old, 7)
    local age = u64(old, 15) + math.floor(math.max(now - stored_at, 0) / 1000)
    local purged = tonumber(redis.call('HGET', KEYS[1], 'sp') or '-1')
    keep_complete = age < u64(old, 23) and purged < stored_at
  end
end
if not keep_complete then
  if string.sub(entry, 1, 3) == 'TRC' and #entry >= 14 then
    local stamp = now
    local bytes = {}
    for i = 8, 1, -1 do
      bytes[i] = string.char(stamp % 256)
      stamp = math.floor(stamp / 256)
    end
    entry = string.sub(entry, 1, 6) .. table.concat(bytes) .. string.sub(entry, 15)
  end
  if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[5]) then
    -- Starting over keeps the URL's marks: the fill lock (perhaps another
    -- instance's), a purge's tombstone and the soft-purge mark.
    -- (With the hash's TTL, when longer than the entry's: a lock's or a
    -- tombstone's lifetime.)
    local marks = redis.call('HMGET', KEYS[1], 'lk', 'pg', 'sp')
    local ttl = redis.call('PTTL', KEYS[1])
    redis.call('DEL', KEYS[1])
    local kept = false
    for i, name in ipairs({'lk', 'pg', 'sp'}) do
      if marks[i] then
        redis.call('HSET', KEYS[1], name, marks[i])
        kept = true
      end
    end
    if ttl > 0 and kept then
      redis.call('PEXPIRE', KEYS[1], ttl)
    end
  end
  redis.call('HSET', KEYS[1], 'vary', ARGV[1], ARGV[2], entry)
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
end
if ours then redis.call('HDEL', KEYS[1], 'lk') end
return 1
