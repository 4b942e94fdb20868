-- ARGV: 1 min, 2 max (ZRANGE BYLEX bounds), 3 how many keys at most, 4 bytes of records after
-- which to stop early (at least one key is read). Returns {cursor, key, records, ...}: the
-- keys with records in the range, ascending, each with its records, read together; cursor is
-- the bound to go on from, "" when the range is exhausted.
local keys = redis.call('ZRANGE', KIDX, ARGV[1], ARGV[2], 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {''}
if #keys == 0 then return out end
local recs = redis.call('HMGET', HIST, unpack(keys))
local budget, size = tonumber(ARGV[4]), 0
for i, key in ipairs(keys) do
  local r = recs[i] or ''
  out[2 * i], out[2 * i + 1] = key, r
  size = size + #r + #key
  if size >= budget and i < #keys then
    out[1] = '(' .. key
    return out
  end
end
if #keys >= tonumber(ARGV[3]) then out[1] = '(' .. keys[#keys] end
return out
