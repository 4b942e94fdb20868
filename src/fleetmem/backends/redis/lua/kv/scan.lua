-- Live keys of the index between two ZRANGE BYLEX bounds, ascending.
-- ARGV: 1 min, 2 max, 3 how many live keys at most, 4 how many members to look at at most,
-- 5 partition filter ("" = any, "=<name>"). Members whose entry vanished (native expiry) are
-- removed from every index on the way. Returns {cursor, key...}: cursor is the bound to
-- continue from, "" when the range is exhausted.
local lo, hi = ARGV[1], ARGV[2]
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local pf = ARGV[5]
local wanted_part = string.sub(pf, 2)
local out = {''}
local found, seen = 0, 0
while true do
  local batch = math.min(budget - seen, math.max(want - found, 16) + 16)
  if batch < 1 then batch = 1 end
  local ms = idx_range(lo, hi, batch)
  for _, m in ipairs(ms) do
    seen = seen + 1
    local key, part = split_member(m)
    if pf == '' or part == wanted_part then
      if redis.call('EXISTS', EPFX .. key) == 1 then
        found = found + 1
        out[found + 1] = key
        if found >= want then
          out[1] = '(' .. m
          return out
        end
      else
        idx_rem(m)
        redis.call('ZREM', XZ, key)
        count(part, -1)
        redis.call('INCR', PENDING)
      end
    end
  end
  if #ms < batch then return out end
  lo = '(' .. ms[#ms]
  if seen >= budget then
    out[1] = lo
    return out
  end
end
