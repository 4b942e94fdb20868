-- ARGV: 1 queue, 2 origin, 3 mode: "*" (every dead job: 4 cursor, the last id looked at by the
-- previous call or "", 5 how many to look at) or "=" (4... the ids). Moves the claims that
-- died on their last lease to the dead letter, then moves those dead jobs back to ready now,
-- attempts reset to 0; a job whose dedupe key another live job holds stays dead. Returns
-- {moved, cursor} (cursor "": nothing left to look at).
use(ARGV[1])
local now = now_ms()
sweep(now)
local ids, cursor = nil, ''
if ARGV[3] == '*' then
  local lo, budget = '-', tonumber(ARGV[5])
  if ARGV[4] ~= '' then lo = '(' .. ARGV[4] end
  ids = redis.call('ZRANGE', DEAD, lo, '+', 'BYLEX', 'LIMIT', 0, budget)
  if #ids == budget then cursor = ids[#ids] end
else
  ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local moved, ready = 0, {}
for _, id in ipairs(ids) do
  local j = JPFX .. id
  local h = redis.call('HMGET', j, 'q', 's', 'k', 'n')
  if h[1] == QNAME and h[2] == 'd' then
    local free = true
    if h[3] then
      local other = holder(h[3], now)
      if other and other ~= id then
        free = false
      else
        redis.call('HSET', DEDUPE, h[3], id)
      end
    end
    if free then
      redis.call('HSET', j, 's', 'w', 'a', 0, 'r', now)
      redis.call('HDEL', j, 'f')
      redis.call('ZREM', DEAD, id)
      ready[#ready + 1] = 0
      ready[#ready + 1] = ready_member(code_of(tonumber(h[4])), now, id)
      moved = moved + 1
      if #ready >= 2 * BATCH then
        redis.call('ZADD', READY, unpack(ready))
        ready = {}
      end
    end
  end
end
if #ready > 0 then redis.call('ZADD', READY, unpack(ready)) end
if moved > 0 then publish_put(moved, ARGV[2]) end
return {moved, cursor}
