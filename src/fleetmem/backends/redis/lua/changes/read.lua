-- ARGV: 1 the id to read after ("": from the oldest retained), 2 at most how many changes.
-- Trims what is past retention first. Returns nil when the feed is not enabled, else
-- {epoch, floor id, head id, then per stream entry read: the id of its first change returned,
-- its "at", then that change's head and value and those of the changes after it}. The caller
-- checks ARGV[1] against epoch, floor and head (an expired cursor gets nothing it could use).
local f = redis.call('HMGET', FEED, 'r', 'e', 'l')
if not f[1] then return false end
feed_trim(now_ms(), tonumber(f[1]))
local out = {f[2], redis.call('HGET', FEED, 'f'), f[3]}
local limit = tonumber(ARGV[2])
local from, ams, aseq = '-', -1, -1
if ARGV[1] ~= '' then
  from = '(' .. ARGV[1]
  local ms, seq = string.match(ARGV[1], '^(%d+)-(%d+)$')
  ams, aseq = tonumber(ms), tonumber(seq)
end
-- An entry holds at least one change after `from` (its id is its last change's), so asking
-- for limit - got entries is enough; at most 100 at once, as one may hold FEED_ENTRY.
local got = 0
while got < limit do
  local want = math.min(limit - got, 100)
  local es = redis.call('XRANGE', LOG, from, '+', 'COUNT', want)
  for _, e in ipairs(es) do
    local ms, seq = string.match(e[1], '^(%d+)-(%d+)$')
    ms, seq = tonumber(ms), tonumber(seq)
    local fields = e[2]
    local n = (#fields - 2) / 2
    local first = seq - n + 1
    local skip = 0
    if ms == ams and aseq >= first then skip = aseq - first + 1 end
    local take = math.min(n - skip, limit - got)
    local g = {string.format('%.0f-%.0f', ms, first + skip), fields[2]}
    for j = 1, take do
      g[2 * j + 1] = fields[2 * (skip + j) + 1]
      g[2 * j + 2] = fields[2 * (skip + j) + 2]
    end
    out[#out + 1] = g
    got = got + take
    if got >= limit then break end
  end
  if #es < want then break end
  from = '(' .. es[#es][1]
end
return out
