-- Marks every entry of a URL stored before now as stale (soft purge): they
-- may still be served stale-while-revalidate while a refresh happens.
-- KEYS[1] the URL's hash; ARGV[1] the field of a data value's entry, or ''
-- for an HTTP URL. The mark is Redis' own time (ms since the epoch),
-- the clock every entry's response time is stamped with when stored
-- (put.lua), never an instance's clock. The fill lock goes with it, so
-- that a fill that asked the origin before the mark does not store a
-- response that would look newer than it (put.lua).
-- A data value is read with one HGET of its entry, without the mark, so
-- the mark is also written into that entry: its freshness lifetime
-- (bytes 23..30, u64 seconds, big-endian) becomes what a reader that
-- applies the mark computes (Entry::mark_stale_at): the entry's age at the
-- mark, when the entry was stored before it and that is shorter.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
-- A tombstone (delete.lua) has nothing to mark.
if redis.call('HLEN', KEYS[1]) == 1 and redis.call('HEXISTS', KEYS[1], 'pg') == 1 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'sp', now)
redis.call('HDEL', KEYS[1], 'lk')
if ARGV[1] and ARGV[1] ~= '' then
  local entry = redis.call('HGET', KEYS[1], ARGV[1])
  if entry and #entry >= 30 and string.sub(entry, 1, 3) == 'TRC' then
    local function read(at)
      local n = 0
      for i = at, at + 7 do n = n * 256 + string.byte(entry, i) end
      return n
    end
    local stored = read(7)
    if now >= stored then
      local age = read(15) + math.floor((now - stored) / 1000)
      if age < read(23) then
        local bytes = {}
        for i = 8, 1, -1 do
          bytes[i] = string.char(age % 256)
          age = math.floor(age / 256)
        end
        redis.call('HSET', KEYS[1], ARGV[1],
          string.sub(entry, 1, 22) .. table.concat(bytes) .. string.sub(entry, 31))
      end
    end
  end
end
return 1
