-- ARGV: 1 queue, 2 limit. Moves the claims that died on their last lease to the dead letter,
-- then removes up to limit dead jobs (the queue leaves the list of names once empty). Returns
-- how many were removed (fewer than limit: none is left).
use(ARGV[1])
local now = now_ms()
sweep(now)
local ids = redis.call('ZRANGE', DEAD, 0, tonumber(ARGV[2]) - 1)
for i = 1, #ids, BATCH do
  local keys, chunk = {}, {}
  for k = i, math.min(i + BATCH - 1, #ids) do
    keys[#keys + 1] = JPFX .. ids[k]
    chunk[#chunk + 1] = ids[k]
  end
  redis.call('DEL', unpack(keys))
  redis.call('ZREM', DEAD, unpack(chunk))
end
forget_if_empty(now)
return #ids
