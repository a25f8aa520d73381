-- Releases a fill lock if this holder still has it.
-- KEYS[1] the URL's hash; ARGV[1] the holder's token.
local held = redis.call('HGET', KEYS[1], 'lk')
if held and string.sub(held, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  return redis.call('HDEL', KEYS[1], 'lk')
end
return 0
