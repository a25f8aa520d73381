-- Decides a batch of requests, in order, each request all or nothing over
-- its policies. A batch of one is a single request's decision; a batch of
-- many is exactly what deciding them one after another would answer, in
-- one call.
--
-- KEYS     the distinct counters the batch touches (one hash tag)
-- ARGV[1]  the numbers, packed as little-endian doubles (struct '<d'):
--   per key, the policy it counts for: kind, a, b
--     kind 1 = GCRA:           a = emission interval (µs), b = burst tolerance (µs)
--     kind 2 = sliding window: a = limit,                  b = window (µs)
--     kind 3 = fixed window:   a = limit,                  b = window (µs)
--   then the number of groups, and per group of consecutive requests with
--   the same cost and counters: count, cost, n, and the indexes (into
--   KEYS) of the n counters.
--
-- Counters: a GCRA counter is a string, the theoretical arrival time in µs
-- as a decimal integer, which expires once it is in the past. A window
-- counter is a string of three little-endian doubles (struct '<ddd'): the
-- window index (server time / window), the count in that window, and the
-- count of the window before it. It expires two windows after its window
-- began: its TTL is set when a window's first request writes it, and kept
-- (KEEPTTL) by the others. A value of another shape (or a key of another
-- type, which MGET reads as nil) counts as an empty counter and is
-- overwritten.
--
-- Returns one string of little-endian doubles (struct '<d'), a flat list of
-- integers: per request, allowed, then per counter remaining, reset_us,
-- retry_us. Every one is below 2^53, so exact as a double.
-- A denied request changes no counter, so it consumes nothing from the
-- policies that would have allowed it. Time comes from the server, so
-- instances with skewed clocks agree. Every counter is read once (one MGET
-- for all of them) and written at most once per call.
--
-- Written for the server's time per call, which decides how many decisions
-- one Redis core makes (each redis.call costs about as much as all the
-- arithmetic of a request): binary arguments (no decimal parsing), every
-- counter read in one MGET and written in one SET (a window's TTL kept,
-- not printed again), no per-key tables for a lone request, integers
-- formatted with %d (not Redis's %.17g for Lua numbers), and the reply
-- packed in binary: no number of it is formatted here, nor parsed one by
-- one by the client.
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local floor, ceil, unpack, pack, format, spread = math.floor, math.ceil, struct.unpack, struct.pack, string.format, unpack
local data = ARGV[1]
local nk = #KEYS
-- Kept below 10^14 (as they always were), far below 2^53: every number of
-- the reply is an integer that a double holds exactly.
local BIG = 99999999999999

-- One request on one GCRA counter (a lone request of a one-policy layer,
-- the most common call): the arithmetic of judge() below, inline, with no
-- function or table made. Its
-- numbers are exactly 8 doubles: kind, a, b, 1 group, count 1, cost, n 1,
-- counter 1.
if nk == 1 and #data == 64 then
  local kind, a, b, _, count, cost = unpack('<dddddd', data)
  if kind == 1 and count == 1 then
    local tat = tonumber(redis.call('GET', KEYS[1])) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * a
    local allow_at = new_tat - b
    local remaining, reset, retry
    if allow_at > now then
      retry = allow_at - now
      remaining = floor((b - (tat - now)) / a)
      reset = tat - now
    else
      retry = 0
      remaining = floor((b - (new_tat - now)) / a)
      reset = new_tat - now
      local r = floor(new_tat + 0.5)
      if r - new_tat == 0.5 and r % 2 == 1 then r = r - 1 end
      redis.call('SET', KEYS[1], format('%d', r), 'PX', format('%d', ceil((new_tat - now) / 1000) + 1))
    end
    if remaining < 0 then remaining = 0 end
    if remaining > BIG then remaining = BIG end
    if reset > BIG then reset = BIG end
    if retry > BIG then retry = BIG end
    return pack('<dddd', retry > 0 and 0 or 1, floor(remaining), ceil(reset), ceil(retry))
  end
end

-- One policy's counter as read: the GCRA theoretical arrival time (never
-- before now), or the window's count and the previous window's (shifted to
-- the window `now` falls in), and whether the stored window is this one.
local function state(kind, b, v)
  if kind == 1 then
    local tat = tonumber(v) or now
    if tat < now then tat = now end
    return tat, 0, false
  end
  if v and #v == 24 then
    local w = floor(now / b)
    local stored, c, p = unpack('<ddd', v)
    if stored == w then return c, p, true end
    if stored == w - 1 then return 0, c, false end
  end
  return 0, 0, false
end

-- One policy's answer to a request of `cost` on the counter (s1, s2) from
-- state(): remaining, reset_us, retry_us (0: this policy allows it),
-- clamped to [0, BIG] and whole.
local function judge(kind, a, b, s1, s2, cost)
  local remaining, reset, retry
  if kind == 1 then
    local new_tat = s1 + cost * a
    local allow_at = new_tat - b
    if allow_at > now then
      retry = allow_at - now
      remaining = (b - (s1 - now)) / a
      reset = s1 - now
    else
      retry = 0
      remaining = (b - (new_tat - now)) / a
      reset = new_tat - now
    end
  else
    local elapsed = now - floor(now / b) * b
    reset = b - elapsed
    local used = s1
    if kind == 2 then used = s2 * (b - elapsed) / b + s1 end
    if used + cost > a then
      if kind == 3 then
        retry = reset
      elseif a - s1 - cost >= 0 then
        retry = b - elapsed - (a - s1 - cost) * b / s2
      elseif cost <= a then
        retry = reset + b * (1 - (a - cost) / s1)
      else
        retry = reset + b
      end
      if retry < 1 then retry = 1 end
      remaining = a - used
    else
      retry = 0
      remaining = a - used - cost
    end
  end
  if remaining < 0 then remaining = 0 end
  if remaining > BIG then remaining = BIG end
  if reset > BIG then reset = BIG end
  if retry > BIG then retry = BIG end
  return floor(remaining), ceil(reset), ceil(retry)
end

-- Writes a counter the call changed: s1 (and s2) are its new state, `same`
-- whether its stored window is the current one.
local function store(key, kind, b, s1, s2, same)
  if kind == 1 then
    -- Rounded half to even, as '%.0f' would, but printed as an integer.
    local r = floor(s1 + 0.5)
    if r - s1 == 0.5 and r % 2 == 1 then r = r - 1 end
    redis.call('SET', key, format('%d', r), 'PX', format('%d', ceil((s1 - now) / 1000) + 1))
  elseif same then
    redis.call('SET', key, pack('<ddd', floor(now / b), s1, s2), 'KEEPTTL')
  else
    redis.call('SET', key, pack('<ddd', floor(now / b), s1, s2), 'PX', format('%d', ceil(2 * b / 1000) + 1))
  end
end

-- A lone request on any counters (a batch of one: the call of every
-- request that finds no batch forming): its numbers are kind, a, b per
-- key, 1 group, count 1, its cost, n = the number of keys, and the n
-- indexes. One table, for the reply and the counters' new states.
if #data == 32 * nk + 32 then
  local groups, count, cost, n = unpack('<dddd', data, 24 * nk + 1)
  if groups == 1 and count == 1 and n == nk then
    if nk == 1 then
      local kind, a, b = unpack('<ddd', data)
      local s1, s2, same = state(kind, b, redis.call('GET', KEYS[1]))
      local remaining, reset, retry = judge(kind, a, b, s1, s2, cost)
      if retry == 0 then
        if kind == 1 then s1 = s1 + cost * a else s1 = s1 + cost end
        store(KEYS[1], kind, b, s1, s2, same)
      end
      return pack('<dddd', retry > 0 and 0 or 1, remaining, reset, retry)
    end
    local vals = redis.call('MGET', spread(KEYS))
    -- The reply's numbers, then per key its new state (s1, s2, same).
    local out = {1}
    local top = 3 * n + 1
    local pos = 24 * nk + 33
    for i = 1, n do
      local k
      k, pos = unpack('<d', data, pos)
      local kind, a, b = unpack('<ddd', data, 24 * k - 23)
      local s1, s2, same = state(kind, b, vals[k])
      local remaining, reset, retry = judge(kind, a, b, s1, s2, cost)
      if retry > 0 then out[1] = 0 end
      out[3 * i - 1] = remaining
      out[3 * i] = reset
      out[3 * i + 1] = retry
      if kind == 1 then s1 = s1 + cost * a else s1 = s1 + cost end
      out[top + 3 * k - 2] = s1
      out[top + 3 * k - 1] = s2
      out[top + 3 * k] = same
    end
    if out[1] == 1 then
      for k = 1, nk do
        local kind, _, b = unpack('<ddd', data, 24 * k - 23)
        store(KEYS[k], kind, b, out[top + 3 * k - 2], out[top + 3 * k - 1], out[top + 3 * k])
      end
    end
    return pack('<' .. string.rep('d', top), spread(out, 1, top))
  end
end

-- A batch. Per key: the policy (kind, a, b), and its state from state().
local vals
if nk <= 512 then
  vals = redis.call('MGET', spread(KEYS))
else
  -- A few hundred arguments at a time, within the Lua stack.
  vals = {}
  for from = 1, nk, 512 do
    local to = from + 511
    if to > nk then to = nk end
    local part = redis.call('MGET', spread(KEYS, from, to))
    for i = 1, #part do vals[from + i - 1] = part[i] end
  end
end
local kinds, as, bs, s1, s2, same, dirty = {}, {}, {}, {}, {}, {}, {}
local pos = 1
for k = 1, nk do
  local kind, a, b
  kind, a, b, pos = unpack('<ddd', data, pos)
  kinds[k] = kind
  as[k] = a
  bs[k] = b
  s1[k], s2[k], same[k] = state(kind, b, vals[k])
end

local reply = {}
local n_reply = 0
local ks = {}
local groups
groups, pos = unpack('<d', data, pos)
for _ = 1, groups do
  -- A group: `count` consecutive requests with the same cost and counters.
  local count, cost, n
  count, cost, n, pos = unpack('<ddd', data, pos)
  for i = 1, n do
    ks[i], pos = unpack('<d', data, pos)
  end
  for _ = 1, count do
    local head = n_reply + 1
    n_reply = head
    local allowed = 1
    for i = 1, n do
      local k = ks[i]
      local remaining, reset, retry = judge(kinds[k], as[k], bs[k], s1[k], s2[k], cost)
      if retry > 0 then allowed = 0 end
      reply[n_reply + 1] = remaining
      reply[n_reply + 2] = reset
      reply[n_reply + 3] = retry
      n_reply = n_reply + 3
    end
    reply[head] = allowed
    if allowed == 1 then
      -- Commit: every policy of the request counts it.
      for i = 1, n do
        local k = ks[i]
        if kinds[k] == 1 then
          s1[k] = s1[k] + cost * as[k]
        else
          s1[k] = s1[k] + cost
        end
        dirty[k] = true
      end
    end
  end
end

for k = 1, nk do
  if dirty[k] then
    store(KEYS[k], kinds[k], bs[k], s1[k], s2[k], same[k])
  end
end

-- Packed in slices of at most SLICE numbers: one pack per slice, within
-- the Lua stack whatever the batch.
local SLICE = 64
local full = '<' .. string.rep('d', SLICE)
local parts = {}
for from = 1, n_reply, SLICE do
  local to = from + SLICE - 1
  if to <= n_reply then
    parts[#parts + 1] = pack(full, spread(reply, from, to))
  else
    parts[#parts + 1] = pack('<' .. string.rep('d', n_reply - from + 1), spread(reply, from, n_reply))
  end
end
return table.concat(parts)
