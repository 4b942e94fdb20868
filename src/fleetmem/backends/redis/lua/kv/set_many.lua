-- ARGV: 1 ttl_ms (0 none), 2 partition arg, then key, payload pairs (distinct keys).
-- Returns the count written. Each item is written as set() would (keep_ttl off), but the
-- writes go out in bulk: one MSET (no TTL), ZMSCORE, ZADD and HINCRBY per slice of items.
-- With a feed, the changes go out as one XADD per 1000 items.
local now = now_ms()
local ttl, parg = tonumber(ARGV[1]), ARGV[2]
local feed = feed_open(now)   -- records each item's change, in ARGV order
local exp = -1
if ttl > 0 then exp = now + ttl end
local named = string.sub(parg, 2)
local deltas = {}             -- partition -> change of its count
local mset, nm = {}, 0        -- MSET arguments (ttl == 0)
local xadd, nx = {}, 0        -- ZADD XZ arguments (ttl > 0)
local fresh, nf = {}, 0       -- keys without a live entry, all going to partition newp
local newp = ''
if parg ~= '' then newp = named end

local function delta(part, d)
  deltas[part] = (deltas[part] or 0) + d
end

local function flush()
  if nf > 0 then
    -- A key whose entry expired natively may still be indexed: drop it first.
    local scores = redis.call('ZMSCORE', XZ, unpack(fresh, 1, nf))
    local members = {}
    for j = 1, nf do
      if scores[j] then unindex(fresh[j]) end
      members[j] = member(fresh[j], newp)
    end
    delta(newp, idx_add_many(members))
    fresh, nf = {}, 0
  end
  if nm > 0 then
    redis.call('MSET', unpack(mset, 1, nm))
    mset, nm = {}, 0
  end
  if nx > 0 then
    redis.call('ZADD', XZ, unpack(xadd, 1, nx))
    xadd, nx = {}, 0
  end
end

-- The current headers are read in blocks of READ keys with one MGET (keys are distinct, so a
-- block's writes cannot change a header read for it).
local READ = 500
local n = 0
for first = 3, #ARGV, 2 * READ do
  local last = math.min(#ARGV - 1, first + 2 * READ - 2)
  local ekeys, m = {}, 0
  for i = first, last, 2 do
    m = m + 1
    ekeys[m] = EPFX .. ARGV[i]
  end
  local raws = redis.call('MGET', unpack(ekeys, 1, m))
  m = 0
  for i = first, last, 2 do
    m = m + 1
    local key, ekey = ARGV[i], ekeys[m]
    local ver, c, old = parse(raws[m])
    if ver == nil then ver, c = 0, now end
    local part = old or ''
    if parg ~= '' then part = named end
    local value = entry(ver + 1, c, math.max(c, now), part, ARGV[i + 1])
    if feed then feed_add(feed, 's', key, part, ver + 1, exp, ARGV[i + 1]) end
    if ttl > 0 then
      redis.call('SET', ekey, value, 'PXAT', now + ttl)
      xadd[nx + 1], xadd[nx + 2] = now + ttl, key
      nx = nx + 2
    else
      mset[nm + 1], mset[nm + 2] = ekey, value
      nm = nm + 2
    end
    if old == nil then
      nf = nf + 1
      fresh[nf] = key
    elseif old ~= part then
      refile(key, old, part, delta)
    end
    n = n + 1
    if nm >= 1000 or nx >= 1000 or nf >= 500 then flush() end
  end
end
flush()
for part, d in pairs(deltas) do
  if d ~= 0 then count(part, d) end
end
if feed then feed_close(feed) end
return n
