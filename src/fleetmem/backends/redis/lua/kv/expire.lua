-- ARGV: 1 key, 2 ttl_ms (0 = persist), 3 the version the entry must have ('' = any). Returns
-- 1 if the entry is live (at that version). Version unchanged.
local key = ARGV[1]
local ekey = EPFX .. key
if redis.call('EXISTS', ekey) == 0 then return 0 end
if ARGV[3] ~= '' and header(ekey) ~= tonumber(ARGV[3]) then return 0 end
local ttl = tonumber(ARGV[2])
local now = now_ms()
local exp = -1
if ttl > 0 then
  exp = now + ttl
  redis.call('PEXPIREAT', ekey, exp)
  redis.call('ZADD', XZ, exp, key)
else
  redis.call('PERSIST', ekey)
  redis.call('ZREM', XZ, key)
end
local feed = feed_open(now)
if feed then
  local ver, _, part = header(ekey)
  feed_add(feed, 't', key, part, ver, exp, '')
  feed_close(feed)
end
return 1
