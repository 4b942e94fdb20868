-- ARGV: 1 name, 2 token, 3 ttl_ms ("" = the TTL last granted or renewed). Extends the lease if
-- it is live with that token. Returns {owner, acquired ms, expires ms}, or nil (lost).
local lkey = P .. 'l:' .. ARGV[1]
local cur = redis.call('HMGET', lkey, 't', 'e', 'd', 'o', 'a')
local now = now_ms()
if cur[1] ~= ARGV[2] or not cur[2] or tonumber(cur[2]) <= now then return nil end
local ttl = ARGV[3]
if ttl == '' then ttl = cur[3] end
local exp = now + tonumber(ttl)
redis.call('HSET', lkey, 'e', exp, 'd', ttl)
return {cur[4], tonumber(cur[5]), exp}
