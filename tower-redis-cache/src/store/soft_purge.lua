-- Marks every entry of a URL stored before now as stale (soft purge): they
-- may still be served stale-while-revalidate while a refresh happens.
-- KEYS[1] the URL's hash; ARGV[1] the purge time (ms since the epoch).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sp', ARGV[1])
return 1
