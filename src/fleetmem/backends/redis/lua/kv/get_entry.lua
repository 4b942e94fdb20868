-- ARGV: 1 key. Returns {raw, expires_ms} or nil.
local ekey = EPFX .. ARGV[1]
local raw = redis.call('GET', ekey)
if not raw then return nil end
return {raw, redis.call('PEXPIRETIME', ekey)}
