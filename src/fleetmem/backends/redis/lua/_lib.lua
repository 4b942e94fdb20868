-- Shared by every script (prepended at load time).
--
-- Layout of a namespace (all keys share the hash tag {<ns>}, so one slot in a cluster):
--   fm:{ns}:e:<key>  STRING  a 19-byte header (struct ">BI6I6I6": length of the partition
--                            name, version, created ms, updated ms), the partition name
--                            ("" for "default"), then the JSON ("!" + JSON when it holds a
--                            run of 19+ digits); native TTL = the entry's expiry
--   fm:{ns}:i        ZSET    score 0, member "<key>" or "<key>\0<partition>": sorted key index
--   fm:{ns}:x        ZSET    score = expiry (ms), member "<key>": entries that have a TTL (a
--                            member left by an entry made persistent is dropped by prune)
--   fm:{ns}:c        HASH    partition -> number of indexed entries
--   fm:{ns}:t        STRING  scratch for exact 64-bit arithmetic, deleted before returning
--   fm:{ns}:g        STRING  expired entries dropped from the index by a read, not yet
--                            counted by cleanup_expired (stats().expired_pending)
-- Keys and partitions never hold control characters, so "\0" and "\n" cannot be ambiguous.
--
-- KEYS[1] = "fm:{ns}:" (the namespace prefix: it routes the call to the namespace's slot;
-- every key a script touches starts with it). ARGV holds the script's own arguments.
-- The lines between the "bind" markers are replaced in the function library (scripts.py).
-- <bind>
local P = KEYS[1]
local IDX, XZ, CNT, TMP, PENDING = P .. 'i', P .. 'x', P .. 'c', P .. 't', P .. 'g'
local EPFX = P .. 'e:'
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

-- Remove every index member of key (an entry that vanished through native expiry).
local function unindex(key)
  local ms = redis.call('ZRANGE', IDX, '[' .. key, '[' .. key .. '\0\255', 'BYLEX')
  for _, m in ipairs(ms) do
    redis.call('ZREM', IDX, m)
    local _, part = split_member(m)
    count(part, -1)
  end
  redis.call('ZREM', XZ, key)
  return #ms
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
    if redis.call('ZADD', IDX, 0, member(key, part)) == 1 then count(part, 1) end
  elseif old ~= part then
    redis.call('ZREM', IDX, member(key, old))
    count(old, -1)
    redis.call('ZADD', IDX, 0, member(key, part))
    count(part, 1)
  end
  return ver, c, part, exp
end

local function write(key, payload, ttl, parg, keep, now)
  local ekey = EPFX .. key
  local ver, c, old = header(ekey)
  return put(key, ekey, ver, c, old, payload, ttl, parg, keep, now)
end

-- Delete the live entry key; returns 1 if it was live.
local function remove(key)
  local ekey = EPFX .. key
  local ver, _, part = header(ekey)
  if ver == nil then
    if redis.call('ZSCORE', XZ, key) then unindex(key) end
    return 0
  end
  redis.call('DEL', ekey)
  redis.call('ZREM', IDX, member(key, part))
  redis.call('ZREM', XZ, key)
  count(part, -1)
  return 1
end

