-- ARGV: 1 key, 2 payload, 3 expected version, 4 ttl_ms, 5 partition arg.
-- Returns {0, current_version} on a mismatch, else {1, ver, created, updated, part, expires}.
local cur = header(EPFX .. ARGV[1]) or 0
if cur ~= tonumber(ARGV[3]) then return {0, cur} end
local now = now_ms()
local ver, c, part, exp = write(ARGV[1], ARGV[2], tonumber(ARGV[4]), ARGV[5], true, now)
local feed = feed_open(now)
if feed then
  feed_add(feed, 's', ARGV[1], part, ver, exp, ARGV[2])
  feed_close(feed)
end
return {1, ver, c, now, part, exp}
