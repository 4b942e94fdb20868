-- ARGV: 1 name, 2 owner, 3 ttl_ms. Grants the lease if it is not live. Returns
-- {1, token, acquired ms, expires ms}, or {0, ms left of the live lease}.
local lkey = P .. 'l:' .. ARGV[1]
local now = now_ms()
local exp = redis.call('HGET', lkey, 'e')
if exp and tonumber(exp) > now then return {0, tonumber(exp) - now} end
local token = redis.call('HINCRBY', lkey, 't', 1)
exp = now + tonumber(ARGV[3])
redis.call('HSET', lkey, 'o', ARGV[2], 'a', now, 'e', exp, 'd', ARGV[3])
return {1, token, now, exp}
