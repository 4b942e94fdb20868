-- ARGV: 1 queue. Returns {ready, delayed, claimed, dead, done} by the effective states at TIME.
use(ARGV[1])
local now = ms(now_ms())
local after = '(' .. now
local due_d = redis.call('ZCOUNT', DELAYED, '-inf', now)
local due_c = redis.call('ZCOUNT', CLAIMS, '-inf', now)
local due_l = redis.call('ZCOUNT', LAST, '-inf', now)
return {
  redis.call('ZCARD', READY) + due_d + due_c,
  redis.call('ZCARD', DELAYED) - due_d,
  redis.call('ZCARD', CLAIMS) - due_c + redis.call('ZCARD', LAST) - due_l,
  redis.call('ZCARD', DEAD) + due_l,
  redis.call('ZCOUNT', DONE, after, '+inf'),
}
