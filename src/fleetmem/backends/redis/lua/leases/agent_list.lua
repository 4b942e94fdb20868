-- Live agents between two ZRANGE BYLEX bounds of fm:{ns}:ai, ascending by id.
-- ARGV: 1 min, 2 max, 3 how many live agents at most, 4 how many ids to look at at most.
-- Gone agents met on the way leave the indexes (their records stay). Returns {cursor, then
-- six per agent: id, info, generation, registered, last seen, expires}; cursor is the bound to
-- continue from, "" when the range is exhausted.
local lo, hi = ARGV[1], ARGV[2]
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local out = {''}
local found, seen = 0, 0
while true do
  local batch = math.max(1, math.min(budget - seen, want - found + 16))
  local ids = redis.call('ZRANGE', P .. 'ai', lo, hi, 'BYLEX', 'LIMIT', 0, batch)
  for _, id in ipairs(ids) do
    seen = seen + 1
    local h = redis.call('HMGET', P .. 'a:' .. id, 'i', 'g', 'r', 's', 'e')
    if h[5] and tonumber(h[5]) > now then
      local n = #out
      out[n + 1], out[n + 2], out[n + 3] = id, h[1], tonumber(h[2])
      out[n + 4], out[n + 5], out[n + 6] = tonumber(h[3]), tonumber(h[4]), tonumber(h[5])
      found = found + 1
      if found >= want then
        out[1] = '(' .. id
        return out
      end
    else
      redis.call('ZREM', P .. 'ai', id)
      redis.call('ZREM', P .. 'ae', id)
    end
  end
  if #ids < batch then return out end
  lo = '(' .. ids[#ids]
  if seen >= budget then
    out[1] = lo
    return out
  end
end
