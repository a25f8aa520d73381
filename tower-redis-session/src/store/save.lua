-- Applies one request's changes to a session hash, key by key.
--
-- KEYS[1] the session hash
-- ARGV[1] 'create' (a new session: write even if absent) or 'update'
--         (only if present: a destroyed or cycled session is not resurrected)
-- ARGV[2] idle timeout (ms), or '' to leave an updated session's TTL as it
--         is (a change made soon after this instance's last renewal)
-- ARGV[3] absolute timeout (ms)
-- ARGV[4] user id to set, or '' ARGV[5] created-at (ms) for 'create', or ''
-- ARGV[6] change time (ms), or '' for the server's clock
-- ARGV[7] number of set fields, then name, JSON value pairs
-- then the number of removed fields, then their names
--
-- Every field carries the time of its last change ('t:' fields, kept as
-- tombstones after removal; a name longer than 64 bytes by its SHA-1, an
-- 'h:' field, so that a tombstone's size does not follow its name's); a
-- change older than the stored one is skipped, so replaying writes made
-- during an outage never overwrites newer data.
-- Tombstones are bounded: once the hash holds MAX_FIELDS fields, a removal
-- leaves no tombstone, and drops the one its name had (an app that stores
-- entries under names its clients choose and removes them would otherwise
-- grow the hash, and every read of it, until the absolute timeout). Past
-- the bound, only an outage change to a removed entry older than its
-- removal can bring that entry back.
-- Returns 0 when the session is gone; when written, the key's TTL as set
-- (PTTL, at least 1) when every change was applied, or -1 when a newer
-- stamp kept one out. The PTTL is read last, after every write: on a
-- connection with client tracking, the key is then tracked again for it
-- (its own write took it out of the server's tracking table). One integer,
-- not a table: a table reply costs the server more than the read.
-- A session hash always holds '_c' (every create writes it first): its
-- absence is the session's.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
-- A queued change stamped by a clock ahead of Redis' is not in the future.
local at = math.min(tonumber(ARGV[6]) or now, now)
local created = tonumber(redis.call('HGET', key, '_c'))
if not created then
  if ARGV[1] ~= 'create' then return 0 end
  created = tonumber(ARGV[5]) or now
  redis.call('HSET', key, '_c', created)
end
local deadline = created + tonumber(ARGV[3])
if deadline <= now then
  redis.call('DEL', key)
  return 0
end
local MAX_FIELDS = 2048
local function stamp_field(name)
  if #name <= 64 then return 't:' .. name end
  return 'h:' .. redis.sha1hex(name)
end
local applied = 1
local i = 7
local sets = tonumber(ARGV[i])
i = i + 1
for _ = 1, sets do
  local name, value = ARGV[i], ARGV[i + 1]
  i = i + 2
  local field = stamp_field(name)
  local stored = tonumber(redis.call('HGET', key, field))
  if not stored or stored <= at then
    redis.call('HSET', key, 'd:' .. name, value, field, at)
  else
    applied = 0
  end
end
local removals = tonumber(ARGV[i])
i = i + 1
for _ = 1, removals do
  local name = ARGV[i]
  i = i + 1
  local field = stamp_field(name)
  local stored = tonumber(redis.call('HGET', key, field))
  if not stored or stored <= at then
    redis.call('HDEL', key, 'd:' .. name)
    if redis.call('HLEN', key) < MAX_FIELDS then
      redis.call('HSET', key, field, at)
    elseif stored then
      redis.call('HDEL', key, field)
    end
  else
    applied = 0
  end
end
if ARGV[4] ~= '' then redis.call('HSET', key, '_u', ARGV[4]) end
-- (A new session always gets its TTL: a create always sends ARGV[2].)
if ARGV[2] ~= '' then
  redis.call('PEXPIRE', key, math.min(tonumber(ARGV[2]), deadline - now))
end
-- At least 1: a TTL of a few ms can run out during the script where the
-- server's clock is not frozen for it (before Redis 7), and 0 means gone.
local ttl = math.max(redis.call('PTTL', key), 1)
if applied == 0 then return -1 end
return ttl
