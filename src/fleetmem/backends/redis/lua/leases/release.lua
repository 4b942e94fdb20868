-- ARGV: 1 name, 2 token. Frees the lease if it is live with that token (it expires now; the
-- token stays) and tells the waiters of every process. Returns 1 if freed, else 0.
local lkey = P .. 'l:' .. ARGV[1]
local cur = redis.call('HMGET', lkey, 't', 'e')
local now = now_ms()
if cur[1] ~= ARGV[2] or not cur[2] or tonumber(cur[2]) <= now then return 0 end
redis.call('HSET', lkey, 'e', now)
redis.call('PUBLISH', CHANNEL, namespace() .. '\0' .. ARGV[1])
return 1
