-- ARGV: 1 retention (ms). Enables the feed (a new epoch) or, if enabled, sets its retention.
-- Returns 1 if it was enabled now, 0 if it was already.
local f = redis.call('HMGET', FEED, 'r', 'e')
if f[1] then
  redis.call('HSET', FEED, 'r', ARGV[1])
  return 0
end
local t = redis.call('TIME')
local epoch = tonumber(t[1]) * 1000000 + tonumber(t[2])
if f[2] and tonumber(f[2]) >= epoch then epoch = tonumber(f[2]) + 1 end
redis.call('DEL', LOG)
redis.call(
  'HSET', FEED, 'r', ARGV[1], 'e', string.format('%.0f', epoch), 'l', '0-0', 'f', '0-0', 'n', 0
)
return 1
