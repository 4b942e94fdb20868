-- ARGV: 1 queue, 2 id, 3 token, 4 retry ms, 5 "1" with an error / "0" without, 6 error,
-- 7 origin. If the claim holds: the error becomes last_error (none clears it); the job is dead
-- if its attempts reached max attempts (dedupe key freed, awaited result announced), else
-- waiting again until now + retry ms (announced to claimers when that is now). Returns 0
-- (nothing changed), 1 (waiting, delayed), 2 (ready now) or 3 (dead).
use(ARGV[1])
local id = ARGV[2]
local j = JPFX .. id
local now = now_ms()
local h = redis.call('HMGET', j, unpack(HELD))
if not holds(h, ARGV[3], now) then return 0 end
local code = unclaim(id, h, now)
if ARGV[5] == '1' then
  redis.call('HSET', j, 'x', ARGV[6])
else
  redis.call('HDEL', j, 'x')
end
if tonumber(h[4]) >= tonumber(h[5]) then
  redis.call('HSET', j, 's', 'd', 'f', now)
  redis.call('ZADD', DEAD, 0, id)
  free_key(h[8], id)
  if h[9] then publish_result(id, ARGV[7]) end
  return 3
end
local at = now + tonumber(ARGV[4])
redis.call('HSET', j, 's', 'w', 'r', at)
if at <= now then
  redis.call('ZADD', READY, 0, ready_member(code, at, id))
  publish_put(1, ARGV[7])
  return 2
end
redis.call('ZADD', DELAYED, at, code .. id)
return 1
