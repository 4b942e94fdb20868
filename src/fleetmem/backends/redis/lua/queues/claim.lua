-- ARGV: 1 queue, 2 consumer, 3 lease ms, 4 limit. Settles the queue, then claims up to limit
-- ready jobs in claim order. Returns {now, lease expiry, ms until the next job may become
-- ready (-1: none; only when fewer than limit were claimed), then 9 per job: id, payload,
-- priority, attempts, max attempts, enqueued, ready_at, token, last error}.
use(ARGV[1])
local now = now_ms()
settle(now)
local limit = tonumber(ARGV[4])
local exp = now + tonumber(ARGV[3])
local consumer = ARGV[2]
local out = {now, exp, -1}
local popped = redis.call('ZPOPMIN', READY, limit)
local claims, last = {}, {}
for i = 1, #popped, 2 do
  local m = popped[i]
  local code, id = string.sub(m, 1, 8), string.sub(m, 21)
  local at = tonumber(string.sub(m, 9, 20), 16)
  local j = JPFX .. id
  local h = redis.call('HMGET', j, 'p', 'n', 'a', 'm', 'e', 't', 'x', 's', 'l')
  -- Only a waiting job, or a claim whose lease ran out, is claimable: a stale member (left by
  -- a clock that went back) of a live claim or a finished job is dropped.
  if h[1] and (h[8] == 'w' or (h[8] == 'c' and tonumber(h[9]) <= now)) then
    local a, t, most = tonumber(h[3]) + 1, tonumber(h[6]) + 1, tonumber(h[4])
    redis.call('HSET', j, 's', 'c', 'a', a, 't', t, 'r', at, 'c', now, 'l', exp, 'w', consumer)
    if a >= most then
      last[#last + 1] = exp
      last[#last + 1] = code .. id
    else
      claims[#claims + 1] = exp
      claims[#claims + 1] = code .. id
    end
    local o = #out
    out[o + 1], out[o + 2], out[o + 3] = id, h[1], tonumber(h[2])
    out[o + 4], out[o + 5], out[o + 6] = a, most, tonumber(h[5])
    out[o + 7], out[o + 8], out[o + 9] = at, t, h[7]
  end
end
if #claims > 0 then redis.call('ZADD', CLAIMS, unpack(claims)) end
if #last > 0 then redis.call('ZADD', LAST, unpack(last)) end
if (#out - 3) / 9 < limit then
  local next = nil
  for _, key in ipairs({DELAYED, CLAIMS}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
    if first and (next == nil or tonumber(first) < next) then next = tonumber(first) end
  end
  if next then out[3] = math.max(next - now, 0) end
end
return out
