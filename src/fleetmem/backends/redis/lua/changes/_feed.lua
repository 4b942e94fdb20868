-- The change feed of a namespace (changes.py): appended to the preludes of the key-value
-- scripts, which record their changes here, and of the feed's own scripts (scripts.py).
--
-- Keys, in the namespace's slot; every script touching them declares them (KEYS[2], KEYS[3]):
--   fm:{ns}:f  HASH    r: the retention in ms, there only while the feed is enabled: the flag
--                      every write looks up (one HMGET of a missing key is all a namespace
--                      without a feed pays); e: the epoch (TIME in us at the enable, above the
--                      previous one: disable keeps it, so the next enable's is greater);
--                      l: the id of the newest change ("0-0": none yet); f: the floor, the id
--                      of the newest change trimmed ("0-0": none yet); n: when (ms) a write
--                      next trims the log
--   fm:{ns}:s  STREAM  the changes. Each change has an id "<ms>-<seq>" of its own (its
--                      position is (ms << 32) | seq), above every earlier one: the scripts are
--                      atomic, so id order is the order the writes took effect. The changes of
--                      one script are written together, up to FEED_ENTRY per stream entry,
--                      with consecutive seqs: the entry's id is that of its last change.
--                      Entry fields: "at", the time of the write (ms), then per change a head
--                      "<op><key>\0<part>\0<ver>\0<exp>" and the stored JSON value ("" but for
--                      a set); op is s(et), d(elete), t(tl) or c(lear); part is the stored
--                      partition ("" default; for a clear its filter: "" all, "=<name>");
--                      exp the expiry in ms (-1 none); "" for what an op has not.

-- How often (ms) writes trim the log; reads trim it too, before they read.
local FEED_TRIM_EVERY = 1000
-- At most this many changes per stream entry (a command's arguments come from one unpack).
local FEED_ENTRY = 1000

-- Drop every change older than retention (ms) -- exactly, not "~": the floor must be the
-- newest change dropped, which is read first.
local function feed_trim(now, retention)
  local minid = string.format('%.0f-0', now - retention)
  local gone = redis.call('XREVRANGE', LOG, '(' .. minid, '-', 'COUNT', 1)[1]
  if gone then
    redis.call('XTRIM', LOG, 'MINID', minid)
    redis.call('HSET', FEED, 'f', gone[1])
  end
end

-- The namespace's feed, open for the changes of one script at time now; nil when the feed is
-- not enabled. Trims the log when that is due.
local function feed_open(now)
  local f = redis.call('HMGET', FEED, 'r', 'n', 'l')
  if not f[1] then return nil end
  local ms, seq = string.match(f[3] or '0-0', '^(%d+)-(%d+)$')
  local b = {now = now, ms = tonumber(ms), seq = tonumber(seq), n = 0, args = {'at', now}}
  if tonumber(f[2] or 0) <= now then
    feed_trim(now, tonumber(f[1]))
    b.trimmed = true
  end
  return b
end

-- Write the changes collected in b as one stream entry.
local function feed_write(b)
  if b.n == 0 then return end
  if b.now > b.ms then b.ms, b.seq = b.now, -1 end
  b.seq = b.seq + b.n
  b.last = string.format('%.0f-%.0f', b.ms, b.seq)
  redis.call('XADD', LOG, b.last, unpack(b.args, 1, 2 * b.n + 2))
  b.n, b.args = 0, {'at', b.now}
end

-- Record one change in feed b (see the layout for the arguments).
local function feed_add(b, op, key, part, ver, exp, val)
  local n = b.n + 1
  b.args[2 * n + 1] = op .. key .. '\0' .. part .. '\0' .. ver .. '\0' .. exp
  b.args[2 * n + 2] = val
  b.n = n
  if n == FEED_ENTRY then feed_write(b) end
end

-- Write what feed b still holds; the script's last feed call.
local function feed_close(b)
  feed_write(b)
  if b.last and b.trimmed then
    redis.call('HSET', FEED, 'l', b.last, 'n', b.now + FEED_TRIM_EVERY)
  elseif b.last then
    redis.call('HSET', FEED, 'l', b.last)
  elseif b.trimmed then
    redis.call('HSET', FEED, 'n', b.now + FEED_TRIM_EVERY)
  end
end
