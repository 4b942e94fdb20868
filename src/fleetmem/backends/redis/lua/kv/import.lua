-- The entries of an import (RedisKV.import_batch / import_replace), each written as set()
-- writes one (put() in _lib.lua) but with its own partition and an absolute expiry.
-- ARGV: 1 mode: "m" (merge: write every op), "a" (missing only: skip a key with a live
-- entry), "r" (replace: as "m", and an op whose expiry has passed deletes the key's live
-- entry); then four per op (distinct keys): key, stored JSON, partition ("" for default),
-- absolute expiry in ms ("" for none; a string, so that no digit is lost to Lua's number
-- formatting on its way to PXAT and to the feed).
-- On the server's TIME, now: an op whose expiry is at or before now is skipped and counted
-- expired (also when its key has a live entry); in mode "a" an op whose key has a live entry
-- is skipped and counted existing; every other op writes its value, partition and expiry
-- (SET PXAT: its remaining life is measured on this clock), version + 1 of a live entry (1
-- otherwise), created kept (now for a new entry), updated now; the feed, when enabled, records
-- a "set" per op written (and in mode "r" a "delete" per live entry an expired op removed).
-- The writes go out in bulk as in set_many.lua: one MGET per READ ops, MSET for the
-- persistent ones, ZADD of the expiry index and the new index members per slice.
-- Returns {written, expired, existing}.
local now = now_ms()
local mode = ARGV[1]
local feed = feed_open(now)
local written, expired, existing = 0, 0, 0
local deltas = {}             -- partition -> change of its count
local mset, nm = {}, 0        -- MSET arguments (persistent entries)
local xadd, nx = {}, 0        -- ZADD XZ arguments (entries with an expiry)
local fresh, nf = {}, 0       -- partition -> keys without a live entry; how many in all

local function delta(part, d)
  deltas[part] = (deltas[part] or 0) + d
end

local function flush()
  if nf > 0 then
    for part, keys in pairs(fresh) do
      -- A key whose entry expired natively may still be indexed: drop it first.
      local scores = redis.call('ZMSCORE', XZ, unpack(keys))
      local members = {}
      for j = 1, #keys do
        if scores[j] then unindex(keys[j]) end
        members[j] = member(keys[j], part)
      end
      delta(part, idx_add_many(members))
    end
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

-- The current headers are read in blocks of READ ops with one MGET (keys are distinct, so a
-- block's writes cannot change a header read for it).
local READ = 500
for first = 2, #ARGV, 4 * READ do
  local last = math.min(#ARGV - 3, first + 4 * READ - 4)
  local ekeys, m = {}, 0
  for i = first, last, 4 do
    m = m + 1
    ekeys[m] = EPFX .. ARGV[i]
  end
  local raws = redis.call('MGET', unpack(ekeys, 1, m))
  m = 0
  for i = first, last, 4 do
    m = m + 1
    local key, ekey, payload, part, exp = ARGV[i], ekeys[m], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local ver, c, old = parse(raws[m])
    if exp ~= '' and tonumber(exp) <= now then
      expired = expired + 1
      if mode == 'r' and ver ~= nil then
        local _, gone = remove(key)
        if feed then feed_add(feed, 'd', key, gone, '', '', '') end
      end
    elseif mode == 'a' and ver ~= nil then
      existing = existing + 1
    else
      if ver == nil then ver, c = 0, now end
      local value = entry(ver + 1, c, math.max(c, now), part, payload)
      if exp ~= '' then
        redis.call('SET', ekey, value, 'PXAT', exp)
        xadd[nx + 1], xadd[nx + 2] = exp, key
        nx = nx + 2
      else
        -- A member of XZ left by an expiry this write removes is dropped later by prune.
        mset[nm + 1], mset[nm + 2] = ekey, value
        nm = nm + 2
      end
      if old == nil then
        local keys = fresh[part]
        if keys == nil then
          keys = {}
          fresh[part] = keys
        end
        keys[#keys + 1] = key
        nf = nf + 1
      elseif old ~= part then
        refile(key, old, part, delta)
      end
      if feed then feed_add(feed, 's', key, part, ver + 1, exp == '' and -1 or exp, payload) end
      written = written + 1
      if nm >= 1000 or nx >= 1000 or nf >= 500 then flush() end
    end
  end
end
flush()
for part, d in pairs(deltas) do
  if d ~= 0 then count(part, d) end
end
if feed then feed_close(feed) end
return {written, expired, existing}
