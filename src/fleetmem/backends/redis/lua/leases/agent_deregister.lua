-- ARGV: 1 id. Ends a live agent now (its record and generation stay). Returns 1 if it was live.
local id = ARGV[1]
local akey = P .. 'a:' .. id
local exp = redis.call('HGET', akey, 'e')
local now = now_ms()
if not exp or tonumber(exp) <= now then return 0 end
redis.call('HSET', akey, 'e', now)
redis.call('ZREM', P .. 'ai', id)
redis.call('ZREM', P .. 'ae', id)
return 1
