-- ARGV: keys. Returns two items per key: the entry string (nil when absent) and its expiry
-- (PEXPIRETIME; 0 when absent).
local out = {}
for i = 1, #ARGV do
  local ekey = EPFX .. ARGV[i]
  local raw = redis.call('GET', ekey)
  if raw then
    out[2 * i - 1], out[2 * i] = raw, redis.call('PEXPIRETIME', ekey)
  else
    out[2 * i - 1], out[2 * i] = false, 0
  end
end
return out
