-- ARGV: 1 id, 2 info, 3 ttl_ms. A live agent gets the new info and TTL and keeps its
-- generation and registration time; an absent or gone one gets the next generation.
-- Returns {generation, registered ms, last seen ms, expires ms}.
local id = ARGV[1]
local akey = P .. 'a:' .. id
local now = now_ms()
local cur = redis.call('HMGET', akey, 'g', 'r', 'e')
local exp = now + tonumber(ARGV[3])
local gen, reg
if cur[3] and tonumber(cur[3]) > now then
  gen, reg = tonumber(cur[1]), tonumber(cur[2])
  redis.call('HSET', akey, 'i', ARGV[2], 's', now, 'e', exp, 'd', ARGV[3])
else
  gen, reg = redis.call('HINCRBY', akey, 'g', 1), now
  redis.call('HSET', akey, 'i', ARGV[2], 'r', now, 's', now, 'e', exp, 'd', ARGV[3])
  redis.call('ZADD', P .. 'ai', 0, id)
end
redis.call('ZADD', P .. 'ae', exp, id)
return {gen, reg, now, exp}
