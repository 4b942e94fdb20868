-- ARGV: 1 key, 2 payload, 3 ttl_ms, 4 partition arg. Returns 1 if written.
if redis.call('EXISTS', EPFX .. ARGV[1]) == 1 then return 0 end
local now = now_ms()
local ver, _, part, exp = write(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], false, now)
local feed = feed_open(now)
if feed then
  feed_add(feed, 's', ARGV[1], part, ver, exp, ARGV[2])
  feed_close(feed)
end
return 1
