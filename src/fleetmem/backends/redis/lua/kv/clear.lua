-- ARGV: 1 partition filter ("" = every entry, "=<name>"), 2 lex cursor ("-" to start),
-- 3 how many members to look at. Returns {cursor ("" when done), live entries deleted}.
local pf, lo, budget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local wanted = string.sub(pf, 2)
local ms = idx_range(lo, '+', budget)
local n = 0
for _, m in ipairs(ms) do
  local key, part = split_member(m)
  if pf == '' or part == wanted then
    n = n + redis.call('DEL', EPFX .. key)
    idx_rem(m)
    redis.call('ZREM', XZ, key)
    count(part, -1)
  end
end
if #ms < budget then
  if pf == '' then redis.call('DEL', DIR, BPFX, XZ, CNT, PENDING) end
  return {'', n}
end
if pf == '' then return {'-', n} end
return {'(' .. ms[#ms], n}
