-- Decides a batch of requests, in order, each request all or nothing over
-- its policies. A batch of one is a single request's decision; a batch of
-- many is exactly what deciding them one after another would answer, in
-- one call.
--
-- KEYS     the distinct counters the batch touches (one hash tag)
-- ARGV[1 .. 3 * #KEYS]  per key, the policy it counts for: kind, a, b
--   kind 1 = GCRA:           a = emission interval (µs), b = burst tolerance (µs)
--   kind 2 = sliding window: a = limit,                  b = window (µs)
--   kind 3 = fixed window:   a = limit,                  b = window (µs)
-- then the number of groups, and per group of consecutive requests with the
-- same cost and counters: count, cost, n, and the indexes (into KEYS) of
-- the n counters.
--
-- Returns one string of space-separated integers: per request, allowed,
-- then per counter remaining, reset_us, retry_us.
-- A denied request changes no counter, so it consumes nothing from the
-- policies that would have allowed it. Time comes from the server, so
-- instances with skewed clocks agree. Every counter is read at most once
-- and written at most once per call.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local floor = math.floor

-- Per key index: GCRA theoretical arrival time, or window counts (current
-- and previous window, already shifted to the window `now` falls in).
local tat, cur, prev = {}, {}, {}
local kinds, as, bs = {}, {}, {}
local dirty = {}

for k = 1, #KEYS do
  local at = 3 * k - 2
  kinds[k] = tonumber(ARGV[at])
  as[k] = tonumber(ARGV[at + 1])
  bs[k] = tonumber(ARGV[at + 2])
end

local loaded = {}
local function load(k)
  loaded[k] = true
  local kind, b = kinds[k], bs[k]
  if kind == 1 then
    local v = tonumber(redis.call('GET', KEYS[k])) or now
    if v < now then v = now end
    tat[k] = v
  else
    local w = floor(now / b)
    local d = redis.call('HMGET', KEYS[k], 'w', 'c', 'p')
    local stored = tonumber(d[1])
    local c, p = 0, 0
    if stored == w then
      c = tonumber(d[2]) or 0
      p = tonumber(d[3]) or 0
    elseif stored == w - 1 then
      p = tonumber(d[2]) or 0
    end
    cur[k] = c
    prev[k] = p
  end
end

local reply = {}
local n_reply = 0
local ceil = math.ceil
local BIG = 99999999999999
local at = 3 * #KEYS + 1
for _ = 1, tonumber(ARGV[at]) do
  -- A group: `count` consecutive requests with the same cost and counters.
  local count = tonumber(ARGV[at + 1])
  local cost = tonumber(ARGV[at + 2])
  local n = tonumber(ARGV[at + 3])
  at = at + 3
  local ks = {}
  for i = 1, n do
    local k = tonumber(ARGV[at + i])
    ks[i] = k
    if not loaded[k] then load(k) end
  end
  at = at + n
  for _ = 1, count do
    local head = n_reply + 1
    n_reply = head
    local allowed = 1
    for i = 1, n do
      local k = ks[i]
      local kind, a, b = kinds[k], as[k], bs[k]
      local remaining, reset, retry
      if kind == 1 then
        local t0 = tat[k]
        local new_tat = t0 + cost * a
        local allow_at = new_tat - b
        if allow_at > now then
          retry = allow_at - now
          remaining = floor((b - (t0 - now)) / a)
          reset = t0 - now
        else
          retry = 0
          remaining = floor((b - (new_tat - now)) / a)
          reset = new_tat - now
        end
      else
        local c, p = cur[k], prev[k]
        local elapsed = now - floor(now / b) * b
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
      -- Kept below 10^14, where Lua would print numbers in exponent form.
      if remaining > BIG then remaining = BIG end
      if reset > BIG then reset = BIG end
      if retry > BIG then retry = BIG end
      if retry > 0 then allowed = 0 end
      reply[n_reply + 1] = floor(remaining)
      reply[n_reply + 2] = ceil(reset)
      reply[n_reply + 3] = ceil(retry)
      n_reply = n_reply + 3
    end
    reply[head] = allowed
    if allowed == 1 then
      -- Commit: every policy of the request counts it.
      for i = 1, n do
        local k = ks[i]
        if kinds[k] == 1 then
          tat[k] = tat[k] + cost * as[k]
        else
          cur[k] = cur[k] + cost
        end
        dirty[k] = true
      end
    end
  end
end

for k in pairs(dirty) do
  if kinds[k] == 1 then
    local v = tat[k]
    redis.call('SET', KEYS[k], string.format('%.0f', v), 'PX', math.ceil((v - now) / 1000) + 1)
  else
    local b = bs[k]
    redis.call('HSET', KEYS[k], 'w', string.format('%.0f', floor(now / b)), 'c', cur[k], 'p', prev[k])
    redis.call('PEXPIRE', KEYS[k], math.ceil(2 * b / 1000) + 1)
  end
end

-- One string of integers, not an array: far cheaper to send and to parse.
return table.concat(reply, ' ')
