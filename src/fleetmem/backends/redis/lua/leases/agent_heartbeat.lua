-- ARGV: 1 id, 2 ttl_ms ("" = the last TTL), 3 info ("" = keep it). Extends a live agent.
-- Returns {info, generation, registered ms, last seen ms, expires ms}, or nil (gone: a late
-- heartbeat never revives an agent).
local id = ARGV[1]
local akey = P .. 'a:' .. id
local cur = redis.call('HMGET', akey, 'i', 'g', 'r', 'e', 'd')
local now = now_ms()
if not cur[4] or tonumber(cur[4]) <= now then return nil end
local ttl, info = ARGV[2], ARGV[3]
if ttl == '' then ttl = cur[5] end
if info == '' then info = cur[1] end
local exp = now + tonumber(ttl)
redis.call('HSET', akey, 'i', info, 's', now, 'e', exp, 'd', ttl)
redis.call('ZADD', P .. 'ae', exp, id)
return {info, tonumber(cur[2]), tonumber(cur[3]), now, exp}
