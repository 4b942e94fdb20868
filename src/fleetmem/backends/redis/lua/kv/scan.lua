-- Live keys of the index between two ZRANGE BYLEX bounds, ascending.
-- ARGV: 1 min, 2 max, 3 how many live keys at most, 4 how many members to look at at most,
-- 5 partition filter ("" = any, "=<name>"), 6 (optional) "1": with each key its entry string
-- and expiry (PEXPIRETIME; -1 persistent), as get_entries.lua answers them (the export's
-- pages: one call reads a page). Members whose entry vanished (native expiry) are removed
-- from every index on the way. Returns {cursor, key...} (with ARGV[6]: {cursor, key, entry,
-- expiry, ...}): cursor is the bound to continue from, "" when the range is exhausted.
local lo, hi = ARGV[1], ARGV[2]
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local pf = ARGV[5]
local entries = ARGV[6] == '1'
local wanted_part = string.sub(pf, 2)
local out = {''}
local found, seen = 0, 0
while true do
  local batch = math.min(budget - seen, math.max(want - found, 16) + 16)
  if batch < 1 then batch = 1 end
  local ms = idx_range(lo, hi, batch)
  -- The members of the partition wanted, split; with ARGV[6] their entries in one MGET (an
  -- absent one: a vanished entry, as EXISTS would say).
  local keys, parts, at, raws, n = {}, {}, {}, nil, 0
  for i, m in ipairs(ms) do
    local key, part = split_member(m)
    if pf == '' or part == wanted_part then
      n = n + 1
      keys[n], parts[n], at[n] = key, part, i
    end
  end
  local timed
  if entries and n > 0 then
    local ekeys = {}
    for j = 1, n do ekeys[j] = EPFX .. keys[j] end
    raws = redis.call('MGET', unpack(ekeys, 1, n))
    -- Only a key in XZ can have an expiry (every write that sets one adds the key there, as
    -- ns_live.lua relies on too): PEXPIRETIME for those alone, -1 for the others.
    timed = redis.call('ZMSCORE', XZ, unpack(keys, 1, n))
  end
  for j = 1, n do
    local key, part = keys[j], parts[j]
    local live
    if entries then
      live = raws[j]
    else
      live = redis.call('EXISTS', EPFX .. key) == 1
    end
    if live then
      found = found + 1
      if entries then
        local k = 3 * found - 1
        out[k], out[k + 1], out[k + 2] = key, live, -1
        if timed[j] then out[k + 2] = redis.call('PEXPIRETIME', EPFX .. key) end
      else
        out[found + 1] = key
      end
      if found >= want then
        out[1] = '(' .. ms[at[j]]
        return out
      end
    else
      idx_rem(ms[at[j]])
      redis.call('ZREM', XZ, key)
      count(part, -1)
      redis.call('INCR', PENDING)
    end
  end
  seen = seen + #ms
  if #ms < batch then return out end
  lo = '(' .. ms[#ms]
  if seen >= budget then
    out[1] = lo
    return out
  end
end
