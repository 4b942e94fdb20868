-- ARGV: 1 token, 2 TTL (ms). Takes the lock for token (or extends it when token holds it
-- already: a call sent again after a lost reply is harmless). Returns 1 if token holds it.
local cur = redis.call('GET', LOCK)
if cur == ARGV[1] then
  redis.call('PEXPIRE', LOCK, ARGV[2])
  return 1
end
if cur then return 0 end
redis.call('SET', LOCK, ARGV[1], 'PX', ARGV[2])
return 1
