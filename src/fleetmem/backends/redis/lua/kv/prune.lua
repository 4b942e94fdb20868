-- Drop the index members of entries that expired natively (at most ARGV[1] of them).
-- ARGV: 1 budget, 2 mode: "stats" also returns the per-partition counts, the pending count
-- and a size sample; "cleanup" returns (and resets) the pending count.
-- Returns {pruned, done, ...}.
local budget = tonumber(ARGV[1])
local now = now_ms()
local ks = redis.call('ZRANGE', XZ, '-inf', now, 'BYSCORE', 'LIMIT', 0, budget)
local pruned = 0
for _, key in ipairs(ks) do
  local exp = redis.call('PEXPIRETIME', EPFX .. key)
  if exp == -2 then
    unindex(key)
    pruned = pruned + 1
  elseif exp == -1 then
    redis.call('ZREM', XZ, key)
  else
    redis.call('ZADD', XZ, exp, key)
  end
end
if pruned > 0 then redis.call('INCRBY', PENDING, pruned) end
if #ks >= budget then return {pruned, 0} end
if ARGV[2] == 'cleanup' then
  return {pruned, 1, tonumber(redis.call('GETDEL', PENDING) or '0')}
end
local size, sampled = 0, 0
local sample = redis.call('ZRANDMEMBER', BPFX .. (redis.call('ZRANDMEMBER', DIR) or ''), 16)
for _, m in ipairs(sample) do
  local key = split_member(m)
  local len = redis.call('STRLEN', EPFX .. key)
  if len > 0 then
    size = size + len
    sampled = sampled + 1
  end
end
local pending = tonumber(redis.call('GET', PENDING) or '0')
return {pruned, 1, redis.call('HGETALL', CNT), size, sampled, pending}
