-- Finds the variant of a URL that a request selects, in one round trip.
-- KEYS[1] the URL's hash of variants
-- ARGV[1] a digest of the route's extra key parts; ARGV[2..] request header name/digest
-- pairs (lower-case names, SHA-1 of the values as key::selecting_value normalises them).
-- Returns {vary names or false, entry or false, variant field, soft-purge time or false}.
-- The variant field is the same SHA-1 the Rust side computes when it stores (key::variant).
local vary = redis.call('HGET', KEYS[1], 'vary')
if not vary then return {false, false, false, false} end
local headers = {}
for i = 2, #ARGV, 2 do headers[ARGV[i]] = ARGV[i + 1] end
local text = vary .. '\n' .. ARGV[1]
for name in string.gmatch(vary, '[^,]+') do
  text = text .. '\n' .. name .. '=' .. (headers[name] or '\0')
end
local field = 'e:' .. redis.sha1hex(text)
local found = redis.call('HMGET', KEYS[1], field, 'sp')
return {vary, found[1] or false, field, found[2] or false}
