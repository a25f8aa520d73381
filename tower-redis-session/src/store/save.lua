-- Applies one request's changes to a session hash, key by key.
--
-- KEYS[1] the session hash
-- ARGV[1] 'create' (a new session: write even if absent) or 'update'
--         (only if present: a destroyed or cycled session is not resurrected)
-- ARGV[2] idle timeout (ms)     ARGV[3] absolute timeout (ms)
-- ARGV[4] user id to set, or '' ARGV[5] created-at (ms) for 'create', or ''
-- ARGV[6] change time (ms), or '' for the server's clock
-- ARGV[7] number of set fields, then name, JSON value pairs
-- then the number of removed fields, then their names
--
-- Every field carries the time of its last change ('t:' fields, kept as
-- tombstones after removal); a change older than the stored one is skipped,
-- so replaying writes made during an outage never overwrites newer data.
-- Returns 1 when written, 0 when the session is gone.
--
-- Written for the server's time per call: one HMGET reads the creation
-- time and every stamp the changes need, one HSET writes every field
-- (one HDEL removes), whatever the number of changes. The stamps are all
-- read before anything is written; the names of one call are distinct
-- (the sets and the removals of one request), so each check sees what
-- checking them one after another would have seen.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
-- A queued change stamped by a clock ahead of Redis' is not in the future.
local at = math.min(tonumber(ARGV[6]) or now, now)
local sets = tonumber(ARGV[7])
local first_removal = 9 + 2 * sets
local removals = tonumber(ARGV[first_removal - 1])

-- At most this many arguments go through one `unpack`, within the Lua
-- stack whatever the number of changes (even: HSET takes pairs).
local SLICE = 1000
local unpack, min = unpack, math.min

-- `_c`, then the stamp of each set field, then of each removed one.
local fields = { '_c' }
for j = 1, sets do
  fields[j + 1] = 't:' .. ARGV[6 + 2 * j]
end
for j = 1, removals do
  fields[sets + 1 + j] = 't:' .. ARGV[first_removal + j - 1]
end
local stored = {}
for from = 1, #fields, SLICE do
  local part = redis.call('HMGET', key, unpack(fields, from, min(from + SLICE - 1, #fields)))
  for i = 1, #part do
    stored[from + i - 1] = part[i]
  end
end

-- Every session hash holds `_c`: only a hash without it is looked for.
local exists = stored[1] ~= false or redis.call('EXISTS', key) == 1
if not exists and ARGV[1] ~= 'create' then return 0 end
local created
local writes = {}
if exists then
  created = tonumber(stored[1]) or now
else
  created = tonumber(ARGV[5]) or now
  writes[1] = '_c'
  writes[2] = created
end
local deadline = created + tonumber(ARGV[3])
if deadline <= now then
  redis.call('DEL', key)
  return 0
end

for j = 1, sets do
  local stamp = tonumber(stored[j + 1])
  if not stamp or stamp <= at then
    local name = ARGV[6 + 2 * j]
    local n = #writes
    writes[n + 1] = 'd:' .. name
    writes[n + 2] = ARGV[7 + 2 * j]
    writes[n + 3] = 't:' .. name
    writes[n + 4] = at
  end
end
local deletes = {}
for j = 1, removals do
  local stamp = tonumber(stored[sets + 1 + j])
  if not stamp or stamp <= at then
    local name = ARGV[first_removal + j - 1]
    deletes[#deletes + 1] = 'd:' .. name
    local n = #writes
    writes[n + 1] = 't:' .. name
    writes[n + 2] = at
  end
end
if ARGV[4] ~= '' then
  local n = #writes
  writes[n + 1] = '_u'
  writes[n + 2] = ARGV[4]
end
for from = 1, #writes, SLICE do
  redis.call('HSET', key, unpack(writes, from, min(from + SLICE - 1, #writes)))
end
for from = 1, #deletes, SLICE do
  redis.call('HDEL', key, unpack(deletes, from, min(from + SLICE - 1, #deletes)))
end
redis.call('PEXPIRE', key, math.min(tonumber(ARGV[2]), deadline - now))
return 1
