-- ARGV: 1 queue, 2 id. Removes the job if it is ready or delayed now (waiting, or claimed
-- under an expired lease with attempts left): its record, its place, its dedupe key. Returns 1,
-- or 0 (nothing changed).
use(ARGV[1])
local id = ARGV[2]
local j = JPFX .. id
local now = now_ms()
local h = redis.call('HMGET', j, 'q', 's', 'a', 'm', 'l', 'n', 'r', 'k')
if h[1] ~= QNAME then return 0 end
local code = code_of(tonumber(h[6]))
if h[2] == 'w' then
  redis.call('ZREM', DELAYED, code .. id)
  redis.call('ZREM', READY, ready_member(code, tonumber(h[7]), id))
elseif h[2] == 'c' and tonumber(h[5]) <= now and tonumber(h[3]) < tonumber(h[4]) then
  redis.call('ZREM', CLAIMS, code .. id)
  redis.call('ZREM', READY, ready_member(code, tonumber(h[5]), id))
else
  return 0
end
redis.call('DEL', j)
free_key(h[8], id)
forget_if_empty(now)
return 1
