-- ARGV: 1 key, 2 payload, then (all or none) 3 ttl_ms (0 none), 4 partition arg,
-- 5 keep_ttl ("1"/"0"). Returns {version, created, updated, partition, expires}.
local ttl, parg, keep = 0, '', false
if ARGV[3] then ttl, parg, keep = tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1' end
local now = now_ms()
local ver, c, part, exp = write(ARGV[1], ARGV[2], ttl, parg, keep, now)
local feed = feed_open(now)
if feed then
  feed_add(feed, 's', ARGV[1], part, ver, exp, ARGV[2])
  feed_close(feed)
end
return {ver, c, now, part, exp}
