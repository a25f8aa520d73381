-- Decides a batch of requests, in order, each request all or nothing over
-- its policies. A batch of one is a single request's decision; a batch of
-- many answers what deciding them one after another at the same instant
-- would, in one call (for GCRA, by whole units: see the batch below).
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
-- began: its TTL is set when a window's first request writes it (SET PX),
-- and the others rewrite its two counts in place (SETRANGE), which keeps
-- it. A value of another shape, or a key of another type (which MGET reads
-- as nil; the one-GCRA-counter path calls GET with pcall and takes
-- WRONGTYPE for nil, any other error stands), counts as an empty counter
-- and is overwritten; so do a window's counts that are negative, above
-- BIG (infinity included) or not numbers (NaN, which no comparison
-- admits), and a GCRA time that is not a number (`tonumber` reads 'nan')
-- or lies further ahead than the policy's burst tolerance plus BIG µs
-- ('inf', '1e300': this script never writes one, and a denial writes
-- nothing, so such a time would deny the key for good).
--
-- Returns one string of little-endian doubles (struct '<d'). For a lone
-- request, a flat list of integers: allowed, then per counter remaining,
-- reset_us, retry_us; every one is below 2^53, so exact as a double. For a
-- batch, what the client needs to work those out (see the batch's reply
-- below).
-- A denied request changes no counter, so it consumes nothing from the
-- policies that would have allowed it. Time comes from the server, so
-- instances with skewed clocks agree. Every counter is read once (one MGET
-- for all of them) and written at most once per call.
--
-- Written for the server's time per call, which decides how many decisions
-- one Redis core makes. At low load a call is a lone request, and there
-- each redis.call, each table and each function made costs about as much
-- as the arithmetic of a policy. So: binary arguments (no decimal
-- parsing); every counter read in one MGET and written in one command (a
-- window's counts rewritten in place, its TTL not printed again); the
-- arithmetic inline in each of the three paths below (one GCRA counter, a
-- lone request, a batch), written out rather than put in functions, which
-- cost a stacked-policy request about 1 µs of the server's time in
-- measurements; integers formatted with %d (not Redis's %.17g for Lua
-- numbers); the reply packed in binary: no number of it is formatted
-- here, nor parsed one by one by the client; and a batch's reply without
-- numbers per request (the client works them out).
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local floor, ceil, unpack, pack, format, spread = math.floor, math.ceil, struct.unpack, struct.pack, string.format, unpack
local data = ARGV[1]
local nk = #KEYS
-- Kept below 10^14 (as they always were), far below 2^53: every number of
-- the reply is an integer that a double holds exactly.
local BIG = 99999999999999

-- One request on one GCRA counter (a lone request of a one-policy layer,
-- the most common call): the arithmetic below, with no table made. Its
-- numbers are exactly 8 doubles: kind, a, b, 1 group, count 1, cost, n 1,
-- counter 1.
if nk == 1 and #data == 64 then
  local kind, a, b, _, count, cost = unpack('<dddddd', data)
  if kind == 1 and count == 1 then
    local v = redis.pcall('GET', KEYS[1])
    if type(v) == 'table' then
      if not string.find(v.err or '', 'WRONGTYPE', 1, true) then return v end
      v = false
    end
    local tat = tonumber(v) or now
    if not (tat >= now and tat - now <= b + BIG) then tat = now end
    -- The batch's test and arithmetic with no unit allowed before it
    -- (see the batch below): relative to `now`, in whole units.
    local ahead = tat - now
    local fit = floor((b - ahead) / a)
    if ahead + (fit + 1) * a - b <= 0 then
      fit = fit + 1
    elseif ahead + fit * a - b > 0 then
      fit = fit - 1
    end
    local after = ahead + cost * a
    local remaining, reset, retry
    if after - b > 0 then
      retry = after - b
      remaining = fit
      reset = ahead
    else
      retry = 0
      remaining = fit - cost
      reset = after
      local new_tat = tat + cost * a
      local r = floor(new_tat + 0.5)
      if r - new_tat == 0.5 and r % 2 == 1 then r = r - 1 end
      redis.call('SET', KEYS[1], format('%d', r), 'PX', format('%d', ceil(after / 1000) + 1))
    end
    if remaining < 0 then remaining = 0 end
    if remaining > BIG then remaining = BIG end
    if reset > BIG then reset = BIG end
    if retry > BIG then retry = BIG end
    return pack('<dddd', retry > 0 and 0 or 1, floor(remaining), ceil(reset), ceil(retry))
  end
end

-- A lone request (a batch of one: the call of every request that finds no
-- batch forming, so the one every request makes at low load), on any
-- number of counters. Its numbers are kind, a, b per key, then 1 group,
-- count 1, its cost, n = the number of keys, and the n indexes. The
-- arithmetic of a policy (as the client's `Algorithm::decide` has it),
-- inline, with one table (the reply's) and
-- no function made or called: at this size those cost as much as the
-- arithmetic itself. At most 64 counters, so that its reply fits the Lua
-- stack in one pack.
if nk > 0 and nk <= 64 and #data == 32 * nk + 32 then
  local groups, count, cost, n = unpack('<dddd', data, 24 * nk + 1)
  if groups == 1 and count == 1 and n == nk then
    local vals = redis.call('MGET', spread(KEYS))
    local out = {1}
    local pos = 24 * nk + 33
    for i = 1, n do
      local k
      k, pos = unpack('<d', data, pos)
      local kind, a, b = unpack('<ddd', data, 24 * k - 23)
      local v = vals[k]
      local remaining, reset, retry
      if kind == 1 then
        local tat = tonumber(v) or now
        if not (tat >= now and tat - now <= b + BIG) then tat = now end
        -- As the one-counter path above.
        local ahead = tat - now
        local fit = floor((b - ahead) / a)
        if ahead + (fit + 1) * a - b <= 0 then
          fit = fit + 1
        elseif ahead + fit * a - b > 0 then
          fit = fit - 1
        end
        local after = ahead + cost * a
        if after - b > 0 then
          retry = after - b
          remaining = fit
          reset = ahead
        else
          retry = 0
          remaining = fit - cost
          reset = after
        end
      else
        local w = floor(now / b)
        local c, p = 0, 0
        if v and #v == 24 then
          local stored, sc, sp = unpack('<ddd', v)
          if not (sc >= 0 and sp >= 0 and sc <= BIG and sp <= BIG) then stored = nil end
          if stored == w then
            c, p = sc, sp
          elseif stored == w - 1 then
            p = sc
          end
        end
        local elapsed = now - w * b
        reset = b - elapsed
        local used = c
        if kind == 2 then used = p * (b - elapsed) / b + c end
        if used + cost > a then
          if kind == 3 then
            retry = reset
          elseif a - c - cost >= 0 then
            retry = b - elapsed - (a - c - cost) * b / p
          elseif cost <= a then
            retry = reset + b * (1 - (a - cost) / c)
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
      if retry > 0 then out[1] = 0 end
      out[3 * i - 1] = floor(remaining)
      out[3 * i] = ceil(reset)
      out[3 * i + 1] = ceil(retry)
    end
    if out[1] == 1 then
      -- Allowed by every policy: each counter counts it, from what was
      -- read (read again here rather than kept in tables).
      for k = 1, nk do
        local kind, a, b = unpack('<ddd', data, 24 * k - 23)
        local v = vals[k]
        if kind == 1 then
          local tat = tonumber(v) or now
          if not (tat >= now and tat - now <= b + BIG) then tat = now end
          tat = tat + cost * a
          -- Rounded half to even, as '%.0f' would, but printed as an integer.
          local r = floor(tat + 0.5)
          if r - tat == 0.5 and r % 2 == 1 then r = r - 1 end
          redis.call('SET', KEYS[k], format('%d', r), 'PX', format('%d', ceil((tat - now) / 1000) + 1))
        else
          local w = floor(now / b)
          local stored, c, p = nil, 0, 0
          if v and #v == 24 then
            stored, c, p = unpack('<ddd', v)
            if not (c >= 0 and p >= 0 and c <= BIG and p <= BIG) then stored, c, p = nil, 0, 0 end
          end
          if stored == w then
            -- The window's first write gave the counter its TTL: kept.
            redis.call('SETRANGE', KEYS[k], 8, pack('<dd', c + cost, p))
          else
            if stored ~= w - 1 then c = 0 end
            redis.call('SET', KEYS[k], pack('<ddd', w, cost, c), 'PX', format('%d', ceil(2 * b / 1000) + 1))
          end
        end
      end
    end
    return pack('<' .. string.rep('d', 3 * n + 1), spread(out))
  end
end

-- A batch. Per key: the policy (kind, a, b), and its state: the GCRA
-- theoretical arrival time in s1 (never before `now`) and the units the
-- batch has allowed on it in s2, or the window counts (current, previous,
-- already shifted to the window `now` falls in) in s1 and s2, and whether
-- the stored window is the current one (its TTL is then kept).
--
-- A GCRA request is allowed when (s1 - now) + (s2 + cost) * a - b <= 0:
-- one product of whole units by the interval, not a time moved by a sum
-- of intervals. Every request of a batch has the same `now`, so the last
-- request of a burst on a fresh counter lands exactly on the boundary
-- ((s2 + cost) * a equals b, the same product); times of about 1.8e15 µs,
-- where a double's step is 0.25 µs, summed interval by interval, came out
-- a fraction of a µs past it for about a third of the quotas, and that
-- request was denied. The lone paths above make the same test with no
-- unit allowed before the request, so a request is told the same units
-- left whether it came alone or in a batch.
local kinds, as, bs, s1, s2, same, dirty = {}, {}, {}, {}, {}, {}, {}
local vals
if nk == 0 then
  vals = {}
elseif nk <= 512 then
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
local pos = 1
for k = 1, nk do
  local kind, a, b
  kind, a, b, pos = unpack('<ddd', data, pos)
  kinds[k] = kind
  as[k] = a
  bs[k] = b
  local v = vals[k]
  if kind == 1 then
    local t0 = tonumber(v) or now
    if not (t0 >= now and t0 - now <= b + BIG) then t0 = now end
    s1[k] = t0
    s2[k] = 0
  else
    local w = floor(now / b)
    local c, p = 0, 0
    same[k] = false
    if v and #v == 24 then
      local stored, sc, sp = unpack('<ddd', v)
      if not (sc >= 0 and sp >= 0 and sc <= BIG and sp <= BIG) then stored = nil end
      if stored == w then
        c, p = sc, sp
        same[k] = true
      elseif stored == w - 1 then
        p = sc
      end
    end
    s1[k] = c
    s2[k] = p
  end
end

-- The reply of a batch: the marker -1 (no lone reply starts with it), the
-- server's time, per counter its state before the batch (a GCRA time and
-- 0, or a window's current and previous counts), then per group how many
-- of its requests were allowed: the first ones, since a denied request
-- changes nothing and the identical requests after it are denied too. The
-- client works out each request's numbers from these with this script's
-- arithmetic (`Algorithm::decide`, and `decide_gcra_in_batch` for a GCRA
-- counter, whose s2 starts at 0 units), so none is computed or packed here per
-- request: under load, that was most of a batch's time.
local reply = {-1, now}
for k = 1, nk do
  reply[2 * k + 1] = s1[k]
  reply[2 * k + 2] = s2[k]
end
local n_reply = 2 * nk + 2
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
  local allowed = 0
  while allowed < count do
    -- Allowed when every policy allows it (GCRA's test by whole units,
    -- above; a window's used + cost > limit, as in the paths above,
    -- denies).
    local ok = true
    for i = 1, n do
      local k = ks[i]
      local a, b = as[k], bs[k]
      if kinds[k] == 1 then
        if (s1[k] - now) + (s2[k] + cost) * a - b > 0 then
          ok = false
          break
        end
      else
        local used = s1[k]
        if kinds[k] == 2 then
          local elapsed = now - floor(now / b) * b
          used = s2[k] * (b - elapsed) / b + used
        end
        if used + cost > a then
          ok = false
          break
        end
      end
    end
    if not ok then break end
    allowed = allowed + 1
    -- Commit: every policy of the request counts it.
    for i = 1, n do
      local k = ks[i]
      if kinds[k] == 1 then
        s2[k] = s2[k] + cost
      else
        s1[k] = s1[k] + cost
      end
      dirty[k] = true
    end
  end
  n_reply = n_reply + 1
  reply[n_reply] = allowed
end

for k = 1, nk do
  if dirty[k] then
    if kinds[k] == 1 then
      local v = s1[k] + s2[k] * as[k]
      -- Rounded half to even, as '%.0f' would, but printed as an integer.
      local r = floor(v + 0.5)
      if r - v == 0.5 and r % 2 == 1 then r = r - 1 end
      redis.call('SET', KEYS[k], format('%d', r), 'PX', format('%d', ceil((v - now) / 1000) + 1))
    else
      local b = bs[k]
      if same[k] then
        -- The window's first write gave the counter its TTL: kept.
        redis.call('SETRANGE', KEYS[k], 8, pack('<dd', s1[k], s2[k]))
      else
        redis.call('SET', KEYS[k], pack('<ddd', floor(now / b), s1[k], s2[k]), 'PX', format('%d', ceil(2 * b / 1000) + 1))
      end
    end
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
