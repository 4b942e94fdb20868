-- ARGV: 1 name, 2 token, 3 the releasing connector's id. Frees the lease if it is live with
-- that token (it expires now; the token stays) and tells the waiters of every process:
-- "<ns>\0<name>\0<connector id>" (the releasing connector woke its own waiters already and
-- skips its own message). Returns 1 if freed, else 0.
local lkey = P .. 'l:' .. ARGV[1]
local cur = redis.call('HMGET', lkey, 't', 'e')
local now = now_ms()
if cur[1] ~= ARGV[2] or not cur[2] or tonumber(cur[2]) <= now then return 0 end
redis.call('HSET', lkey, 'e', now)
redis.call('PUBLISH', CHANNEL, namespace() .. '\0' .. ARGV[1] .. '\0' .. ARGV[3])
return 1
