-- Shared by every script (prepended at load time).
--
-- Layout of a namespace (all keys share the hash tag {<ns>}, so one slot in a cluster):
--   fm:{ns}:e:<key>  STRING  a 19-byte header (struct ">BI6I6I6": length of the partition
--                            name, version, created ms, updated ms), the partition name
--                            ("" for "default"), then the JSON ("!" + JSON when it holds a
--                            run of 19+ digits); native TTL = the entry's expiry
--   fm:{ns}:d        ZSET    score 0: the lower bounds of the index buckets but the first
--   fm:{ns}:b:<lo>   ZSET    an index bucket: score 0, members "<key>" or "<key>\0<partition>"
--                            from <lo> (inclusive; "" for the first bucket) up to the next
--                            bound of fm:{ns}:d. Together the buckets form one sorted key
--                            index (a two-level B-tree); each holds at most BUCKET_MAX - 1
--                            members, so Redis keeps it in a compact listpack (~10 bytes a
--                            member instead of ~110 in a large sorted set)
--   fm:{ns}:x        ZSET    score = expiry (ms), member "<key>": entries that have a TTL (a
--                            member left by an entry made persistent is dropped by prune)
--   fm:{ns}:c        HASH    partition -> number of indexed entries
--   fm:{ns}:t        STRING  scratch for exact 64-bit arithmetic, deleted before returning
--   fm:{ns}:g        STRING  expired entries dropped from the index by a read, not yet
--                            counted by cleanup_expired (stats().expired_pending)
--   fm:{ns}:f, fm:{ns}:s     the change feed's flag and log (lua/changes/_feed.lua, appended
--                            to this prelude): every write records its changes there when
--                            the feed is enabled
-- Keys and partitions never hold control characters, so "\0" and "\n" cannot be ambiguous.
--
-- KEYS[1] = "fm:{ns}:" (the namespace prefix: it routes the call to the namespace's slot;
-- every key a script touches starts with it); the writes also get KEYS[2] = "fm:{ns}:f" and
-- KEYS[3] = "fm:{ns}:s", the feed's keys they may touch. ARGV holds the script's own arguments.
-- The lines between the "bind" markers are replaced in the function library (scripts.py).
-- <bind>
local P = KEYS[1]
local DIR, XZ, CNT, TMP, PENDING = P .. 'd', P .. 'x', P .. 'c', P .. 't', P .. 'g'
local EPFX, BPFX = P .. 'e:', P .. 'b:'
local FEED, LOG = P .. 'f', P .. 's'
-- </bind>

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function member(key, part)
  if part == '' then return key end
  return key .. '\0' .. part
end

local function split_member(m)
  local z = string.find(m, '\0', 1, true)
  if z then return string.sub(m, 1, z - 1), string.sub(m, z + 1) end
  return m, ''
end

local function count(part, delta)
  local name = part
  if name == '' then name = 'default' end
  if redis.call('HINCRBY', CNT, name, delta) <= 0 then redis.call('HDEL', CNT, name) end
end

-- The sorted index: buckets of at most BUCKET_MAX - 1 members (Redis's default
-- zset-max-listpack-entries is 128), found through the directory DIR of their lower bounds.
local BUCKET_MAX, BUCKET_FILL = 128, 64

-- The lower bound of the bucket that holds (or would hold) index member m.
local function bound_of(m)
  return redis.call('ZRANGE', DIR, '[' .. m, '-', 'BYLEX', 'REV', 'LIMIT', 0, 1)[1] or ''
end

-- The bound of the bucket after the one at bound b, if it is at most hi (a ZRANGE BYLEX max).
local function next_bound(b, hi)
  return redis.call('ZRANGE', DIR, '(' .. b, hi, 'BYLEX', 'LIMIT', 0, 1)[1]
end

-- Add members ms (a list) that all belong to the bucket at bound b; returns how many were
-- new. A bucket that reaches BUCKET_MAX is rewritten as buckets of BUCKET_FILL members.
local function bucket_add(b, ms)
  local bkey, args = BPFX .. b, {}
  for i, m in ipairs(ms) do args[2 * i - 1], args[2 * i] = 0, m end
  local added = redis.call('ZADD', bkey, unpack(args))
  if added > 0 and redis.call('ZCARD', bkey) >= BUCKET_MAX then
    local all = redis.call('ZRANGE', bkey, 0, -1)
    redis.call('DEL', bkey)
    for i = 1, #all, BUCKET_FILL do
      local lo = b
      if i > 1 then
        lo = all[i]
        redis.call('ZADD', DIR, 0, lo)
      end
      args = {}
      for j = i, math.min(i + BUCKET_FILL - 1, #all) do
        args[#args + 1], args[#args + 2] = 0, all[j]
      end
      redis.call('ZADD', BPFX .. lo, unpack(args))
    end
  end
  return added
end

-- Add index member m; returns 1 if it was new.
local function idx_add(m)
  return bucket_add(bound_of(m), {m})
end

-- Add index members ms (any order); returns how many were new.
local function idx_add_many(ms)
  local groups, order = {}, {}
  for _, m in ipairs(ms) do
    local b = bound_of(m)
    local g = groups[b]
    if g == nil then
      g = {}
      groups[b] = g
      order[#order + 1] = b
    end
    g[#g + 1] = m
  end
  local added = 0
  for _, b in ipairs(order) do added = added + bucket_add(b, groups[b]) end
  return added
end

-- Remove index member m; returns 1 if it was there. An emptied bucket leaves the directory.
local function idx_rem(m)
  local b = bound_of(m)
  local bkey = BPFX .. b
  local removed = redis.call('ZREM', bkey, m)
  if removed == 1 and b ~= '' and redis.call('EXISTS', bkey) == 0 then
    redis.call('ZREM', DIR, b)
  end
  return removed
end

-- Up to n index members between two ZRANGE BYLEX bounds (lo "-" or "[x"/"(x", hi "+" or
-- "[x"/"(x"), ascending, across buckets.
local function idx_range(lo, hi, n)
  local out = {}
  local b = ''
  if lo ~= '-' then b = bound_of(string.sub(lo, 2)) end
  while b do
    local ms = redis.call('ZRANGE', BPFX .. b, lo, hi, 'BYLEX', 'LIMIT', 0, n - #out)
    for _, m in ipairs(ms) do out[#out + 1] = m end
    if #out >= n then break end
    b = next_bound(b, hi)
  end
  return out
end

local HEAD = '>BI6I6I6'

-- The entry string of a value: header, partition name, stored JSON.
local function entry(ver, c, updated, part, payload)
  return struct.pack(HEAD, #part, ver, c, updated) .. part .. payload
end

-- The stored JSON of an entry string (without a "!" marker).
local function payload_of(raw)
  local p = string.sub(raw, 20 + string.byte(raw, 1))
  if string.byte(p, 1) == 33 then p = string.sub(p, 2) end
  return p
end

-- version, created_ms, partition of the live entry at ekey; nil when absent or expired.
local function header(ekey)
  local h = redis.call('GETRANGE', ekey, 0, 63)
  if h == '' then return nil end
  local plen, v, c = struct.unpack(HEAD, h)
  if plen > 44 then h = redis.call('GETRANGE', ekey, 0, 18 + plen) end -- a long partition
  return v, c, string.sub(h, 20, 19 + plen)
end

-- header() of an entry string already read (GET / MGET: false or nil when absent).
local function parse(raw)
  if not raw then return nil end
  local plen, v, c = struct.unpack(HEAD, raw)
  return v, c, string.sub(raw, 20, 19 + plen)
end

-- Remove every index member of key (an entry that vanished through native expiry).
local function unindex(key)
  local ms = idx_range('[' .. key, '[' .. key .. '\0\255', 1000)
  for _, m in ipairs(ms) do
    idx_rem(m)
    local _, part = split_member(m)
    count(part, -1)
  end
  redis.call('ZREM', XZ, key)
  return #ms
end

-- Move key's index member from partition old to part; adjust(partition, delta) keeps the counts.
local function refile(key, old, part, adjust)
  idx_rem(member(key, old))
  adjust(old, -1)
  idx_add(member(key, part))
  adjust(part, 1)
end

-- Write one entry whose current state (ver, c, old: from header(); nil = absent) is known.
-- parg: "" keeps the partition (default for a new entry), "=<name>" sets it.
-- ttl: ms (0 = none). keep: keep the current expiry when ttl is 0.
-- mset: nil, or a table collecting "ekey, value" pairs of plain writes for one MSET later.
-- Returns version, created_ms, partition, expires_ms (-1 = persistent).
local function put(key, ekey, ver, c, old, payload, ttl, parg, keep, now, mset)
  if ver == nil then
    if redis.call('ZSCORE', XZ, key) then unindex(key) end
    ver, c = 0, now
  end
  local part = old or ''
  if parg ~= '' then part = string.sub(parg, 2) end
  ver = ver + 1
  local value = entry(ver, c, math.max(c, now), part, payload)
  local exp = -1
  if ttl > 0 then
    exp = now + ttl
    redis.call('SET', ekey, value, 'PXAT', exp)
    redis.call('ZADD', XZ, exp, key)
  elseif keep and old then
    redis.call('SET', ekey, value, 'KEEPTTL')
    exp = redis.call('PEXPIRETIME', ekey)
  elseif mset then
    -- A member of XZ left by an expiry this write removes is dropped later by prune.
    mset[#mset + 1] = ekey
    mset[#mset + 1] = value
  else
    redis.call('SET', ekey, value)
  end
  if old == nil then
    if idx_add(member(key, part)) == 1 then count(part, 1) end
  elseif old ~= part then
    refile(key, old, part, count)
  end
  return ver, c, part, exp
end

local function write(key, payload, ttl, parg, keep, now)
  local ekey = EPFX .. key
  local ver, c, old = header(ekey)
  return put(key, ekey, ver, c, old, payload, ttl, parg, keep, now)
end

-- Delete the live entry key; returns 1 and its partition if it was live, else 0.
local function remove(key)
  local ekey = EPFX .. key
  local ver, _, part = header(ekey)
  if ver == nil then
    if redis.call('ZSCORE', XZ, key) then unindex(key) end
    return 0
  end
  redis.call('DEL', ekey)
  idx_rem(member(key, part))
  redis.call('ZREM', XZ, key)
  count(part, -1)
  return 1, part
end

