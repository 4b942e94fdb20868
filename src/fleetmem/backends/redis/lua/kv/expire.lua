-- ARGV: 1 key, 2 ttl_ms (0 = persist). Returns 1 if the entry is live. Version unchanged.
local key = ARGV[1]
local ekey = EPFX .. key
if redis.call('EXISTS', ekey) == 0 then return 0 end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  local exp = now_ms() + ttl
  redis.call('PEXPIREAT', ekey, exp)
  redis.call('ZADD', XZ, exp, key)
else
  redis.call('PERSIST', ekey)
  redis.call('ZREM', XZ, key)
end
return 1
