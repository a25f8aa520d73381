-- Leases: takes up to `count` units of one counter for an instance to spend
-- in process, or gives unused units back. The same counters and the same
-- arithmetic as decide.lua: a lease of k units is a request of cost k that
-- is allowed in part (as many units as fit, at least `min`).
--
-- KEYS[1]  the counter
-- ARGV     mode (1 = take, 2 = give back), kind, a, b, count, extra
--   kind 1 = GCRA:           a = emission interval (µs), b = burst tolerance (µs)
--   kind 2 = sliding window: a = limit,                  b = window (µs)
--   kind 3 = fixed window:   a = limit,                  b = window (µs)
--   take:      count = units wanted, extra = the fewest worth taking (the
--              request's cost); fewer fit: nothing is taken
--   give back: count = units unused, extra = the window index they were
--              taken in (windows; ignored for GCRA)
--
-- Returns integers: granted, remaining (after the lease), reset_us,
-- retry_us (> 0: denied), the window index the units belong to (0 for
-- GCRA). A give-back returns zeros.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local floor, ceil, format, pack, unpack = math.floor, math.ceil, string.format, struct.pack, struct.unpack
local mode, kind = tonumber(ARGV[1]), tonumber(ARGV[2])
local a, b = tonumber(ARGV[3]), tonumber(ARGV[4])
local count, extra = tonumber(ARGV[5]), tonumber(ARGV[6])
local key = KEYS[1]
local BIG = 99999999999999
local function clamp(v)
  if v < 0 then return 0 end
  if v > BIG then return BIG end
  return v
end
-- The counter's value: a key of another type is an empty counter (false),
-- as decide.lua reads it; any other error stands.
local function read()
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then
    if not string.find(v.err or '', 'WRONGTYPE', 1, true) then
      error(v.err or 'GET failed')
    end
    return false
  end
  return v
end

if kind == 1 then
  local stored = tonumber(read())
  local tat = stored or now
  if not (tat >= now and tat - now <= b + BIG) then tat = now end
  local function store(v)
    -- Rounded half to even, as decide.lua does.
    local r = floor(v + 0.5)
    if r - v == 0.5 and r % 2 == 1 then r = r - 1 end
    redis.call('SET', key, format('%d', r), 'PX', format('%d', ceil((v - now) / 1000) + 1))
  end
  if mode == 2 then
    if stored ~= nil then
      local back = tat - count * a
      if back <= now then
        redis.call('DEL', key)
      else
        store(back)
      end
    end
    return {0, 0, 0, 0, 0}
  end
  -- Relative to now (a sum of times near 1.8e15 µs, where a double's
  -- step is 0.25 µs, made a fresh counter's burst come out a hair under
  -- its whole number of units, and the lease one short). The quotient may
  -- still come out a hair off a whole number: set right by the test a
  -- batch decides GCRA with (decide.lua), (tat - now) + k * a - b <= 0.
  local ahead = tat - now
  local fits = floor((b - ahead) / a)
  if ahead + (fits + 1) * a - b <= 0 then
    fits = fits + 1
  elseif fits > 0 and ahead + fits * a - b > 0 then
    fits = fits - 1
  end
  local k = count
  if fits < k then k = fits end
  -- The units left, the time to reset and to retry from the same terms
  -- (relative to now): what a batch would tell.
  if k < extra then
    return {0, floor(clamp(fits)), ceil(clamp(ahead)), ceil(clamp(ahead + extra * a - b)), 0}
  end
  store(tat + k * a)
  return {k, floor(clamp(fits - k)), ceil(clamp(ahead + k * a)), 0, 0}
end

-- A window counter: the window index, its count and the previous window's,
-- packed as decide.lua packs them (struct '<ddd'); any other value is an
-- empty counter.
local w = floor(now / b)
local v = read()
local stored, sc, sp
if v and #v == 24 then
  stored, sc, sp = unpack('<ddd', v)
  -- Counts that are negative, above BIG (infinity) or not numbers (NaN):
  -- an empty counter too.
  if not (sc >= 0 and sp >= 0 and sc <= BIG and sp <= BIG) then stored = nil end
end

if mode == 2 then
  -- Only the window the units were taken in, or (sliding) that window
  -- while it is the previous one and still weighs on the current count.
  -- The counter keeps its TTL.
  if stored == extra then
    sc = math.max(sc - count, 0)
  elseif kind == 2 and stored == extra + 1 then
    sp = math.max(sp - count, 0)
  else
    return {0, 0, 0, 0, 0}
  end
  redis.call('SETRANGE', key, 8, pack('<dd', sc, sp))
  return {0, 0, 0, 0, 0}
end

local c, p = 0, 0
if stored == w then
  c, p = sc, sp
elseif stored == w - 1 then
  p = sc
end
local elapsed = now - w * b
local reset = b - elapsed
local used = c
if kind == 2 then used = p * (b - elapsed) / b + c end
local fits = floor(a - used)
local k = count
if fits < k then k = fits end
if k < extra then
  local retry
  if kind == 3 then
    retry = reset
  elseif a - c - extra >= 0 then
    retry = b - elapsed - (a - c - extra) * b / p
  elseif extra <= a then
    retry = reset + b * (1 - (a - extra) / c)
  else
    retry = reset + b
  end
  if retry < 1 then retry = 1 end
  return {0, floor(clamp(a - used)), ceil(clamp(reset)), ceil(clamp(retry)), w}
end
if stored == w then
  -- The window's first write gave the counter its TTL: kept.
  redis.call('SETRANGE', key, 8, pack('<dd', c + k, p))
else
  redis.call('SET', key, pack('<ddd', w, c + k, p), 'PX', format('%d', ceil(2 * b / 1000) + 1))
end
return {k, floor(clamp(a - used - k)), ceil(clamp(reset)), 0, w}
