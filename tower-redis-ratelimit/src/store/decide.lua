-- Decides every policy of one request together, all or nothing.
--
-- KEYS[i]  the counter of policy i (all keys share one hash tag)
-- ARGV[1]  the request's cost
-- ARGV[2 + 3(i-1) ..] per policy: kind, a, b
--   kind 1 = GCRA:           a = emission interval (µs), b = burst tolerance (µs)
--   kind 2 = sliding window: a = limit,                  b = window (µs)
--   kind 3 = fixed window:   a = limit,                  b = window (µs)
--
-- Returns {allowed, remaining_1, reset_us_1, retry_us_1, remaining_2, ...}.
-- Nothing is written unless every policy allows the request, so a request
-- denied by one policy consumes nothing from the others. Time comes from
-- the server, so instances with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local allowed = 1
local out = {}
local writes = {}

for i = 1, #KEYS do
  local base = 2 + (i - 1) * 3
  local kind = tonumber(ARGV[base])
  local a = tonumber(ARGV[base + 1])
  local b = tonumber(ARGV[base + 2])
  local remaining, reset, retry = 0, 0, 0
  if kind == 1 then
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    local new_tat = tat + cost * a
    local allow_at = new_tat - b
    if allow_at > now then
      retry = allow_at - now
      remaining = math.floor((b - (tat - now)) / a)
      reset = tat - now
    else
      remaining = math.floor((b - (new_tat - now)) / a)
      reset = new_tat - now
      writes[i] = {1, new_tat}
    end
  else
    local w = math.floor(now / b)
    local d = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
    local stored = tonumber(d[1])
    local cur, prev = 0, 0
    if stored == w then
      cur = tonumber(d[2]) or 0
      prev = tonumber(d[3]) or 0
    elseif stored == w - 1 then
      prev = tonumber(d[2]) or 0
    end
    local elapsed = now - w * b
    reset = b - elapsed
    local used = cur
    if kind == 2 then used = prev * (b - elapsed) / b + cur end
    if used + cost > a then
      if kind == 3 then
        retry = reset
      elseif a - cur - cost >= 0 then
        retry = b - elapsed - (a - cur - cost) * b / prev
      elseif cost <= a then
        retry = reset + b * (1 - (a - cost) / cur)
      else
        retry = reset + b
      end
      if retry < 1 then retry = 1 end
      remaining = a - used
    else
      remaining = a - used - cost
      writes[i] = {kind, w, cur + cost, prev, b}
    end
  end
  if remaining < 0 then remaining = 0 end
  if retry > 0 then allowed = 0 end
  out[i] = {math.floor(remaining), math.ceil(reset), math.ceil(retry)}
end

if allowed == 1 then
  for i = 1, #KEYS do
    local wr = writes[i]
    if wr[1] == 1 then
      redis.call('SET', KEYS[i], string.format('%.0f', wr[2]), 'PX', math.ceil((wr[2] - now) / 1000) + 1)
    else
      redis.call('HSET', KEYS[i], 'w', string.format('%.0f', wr[2]), 'c', wr[3], 'p', wr[4])
      redis.call('PEXPIRE', KEYS[i], math.ceil(2 * wr[5] / 1000) + 1)
    end
  end
end

local reply = {allowed}
for i = 1, #KEYS do
  reply[#reply + 1] = out[i][1]
  reply[#reply + 1] = out[i][2]
  reply[#reply + 1] = out[i][3]
end
return reply
