-- ARGV: 1 queue, 2 id, 3 token, 4 result, 5 result TTL ms, 6 origin. If the claim holds: the
-- job is done, its result held for the TTL (the job record then expires natively), its dedupe
-- key free, an awaited result announced. Returns 1, or 0 (nothing changed).
use(ARGV[1])
local id = ARGV[2]
local j = JPFX .. id
local now = now_ms()
local h = redis.call('HMGET', j, unpack(HELD))
if not holds(h, ARGV[3], now) then return 0 end
unclaim(id, h, now)
local expires = now + tonumber(ARGV[5])
redis.call('HSET', j, 's', 'o', 'f', now, 'v', ARGV[4], 'h', expires)
redis.call('HDEL', j, 'p')
redis.call('PEXPIREAT', j, expires)
redis.call('ZREMRANGEBYSCORE', DONE, '-inf', ms(now))
redis.call('ZADD', DONE, expires, id)
free_key(h[8], id)
if h[9] then publish_result(id, ARGV[6]) end
return 1
