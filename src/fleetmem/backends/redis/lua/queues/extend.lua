-- ARGV: 1 queue, 2 id, 3 token, 4 lease ms. If the claim holds, its lease now ends lease ms
-- from now (a lease that had expired is live again). Returns {payload, priority, attempts,
-- max attempts, enqueued, ready_at, claimed, consumer, last error, lease expiry}, or nil.
use(ARGV[1])
local id = ARGV[2]
local j = JPFX .. id
local now = now_ms()
local h = redis.call('HMGET', j, unpack(HELD))
if not holds(h, ARGV[3], now) then return false end
local code = unclaim(id, h, now)
local exp = now + tonumber(ARGV[4])
if tonumber(h[4]) >= tonumber(h[5]) then
  redis.call('ZADD', LAST, exp, code .. id)
else
  redis.call('ZADD', CLAIMS, exp, code .. id)
end
if tonumber(h[6]) <= now then
  -- The lease had run out (nobody claimed the job since): it was ready again from that moment.
  redis.call('HSET', j, 'l', exp, 'r', tonumber(h[6]))
else
  redis.call('HSET', j, 'l', exp)
end
local r = redis.call('HMGET', j, 'p', 'e', 'r', 'c', 'w', 'x')
return {r[1], tonumber(h[7]), tonumber(h[4]), tonumber(h[5]), tonumber(r[2]), tonumber(r[3]),
  tonumber(r[4]), r[5], r[6], exp}
