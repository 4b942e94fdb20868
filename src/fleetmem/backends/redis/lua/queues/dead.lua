-- ARGV: 1 queue, 2 after ("" from the start), 3 limit. Moves the claims that died on their last
-- lease to the dead letter, then returns up to limit dead jobs with an id above after, by id:
-- 12 per job: id, payload, priority, attempts, max attempts, enqueued, ready_at, claimed,
-- lease expiry, consumer, token, last error.
use(ARGV[1])
sweep(now_ms())
local lo = '-'
if ARGV[2] ~= '' then lo = '(' .. ARGV[2] end
local ids = redis.call('ZRANGE', DEAD, lo, '+', 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', JPFX .. id, 'p', 'n', 'a', 'm', 'e', 'r', 'c', 'l', 'w', 't', 'x')
  local o = #out
  out[o + 1], out[o + 2], out[o + 3], out[o + 4] = id, h[1], tonumber(h[2]), tonumber(h[3])
  out[o + 5], out[o + 6], out[o + 7] = tonumber(h[4]), tonumber(h[5]), tonumber(h[6])
  out[o + 8], out[o + 9], out[o + 10] = tonumber(h[7]) or false, tonumber(h[8]) or false, h[9]
  out[o + 11], out[o + 12] = tonumber(h[10]), h[11]
end
return out
