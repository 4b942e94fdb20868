-- ARGV: 1 partition filter ("" = every entry, "=<name>"), 2 lex cursor ("-" to start),
-- 3 how many members to look at, 4 the time (ms) of the "clear" change an earlier call of the
-- same clear() recorded ("" none yet). Returns {cursor ("" when done), live entries deleted,
-- that time ("" none)}.
--
-- Without a feed, a clear() is one call per budget of members, not atomic. With a feed it is
-- one call (below). The hand-off of ARGV[4] remains for a feed enabled between two calls of
-- one clear(): the first call that deletes a live entry records the one "clear" change (after
-- its deletions); a later call records a "delete" for each entry it deletes that was written at
-- or after that change (a write made between two calls, recorded after the "clear"), so that a
-- reader replaying the feed ends with what the namespace holds.
local pf, lo, budget, rec = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] or ''
local wanted = string.sub(pf, 2)
local now = now_ms()
local feed = feed_open(now)
-- With a feed, the whole clear is this one call: its "clear" change is recorded with all its
-- deletions, so a client that dies in the middle can never leave a "clear" in the feed while
-- entries it names are still live (nor deletions without their change). It blocks the server
-- for the length of the clear; without a feed, clear() stays one call per budget.
if feed then budget = 2147483647 end
local ms = idx_range(lo, '+', budget)
local since = feed and rec ~= '' and tonumber(rec)
local n = 0
for _, m in ipairs(ms) do
  local key, part = split_member(m)
  if pf == '' or part == wanted then
    local ekey = EPFX .. key
    if since then
      local h = redis.call('GETRANGE', ekey, 0, 18)
      if h ~= '' then
        local _, _, _, updated = struct.unpack(HEAD, h)
        if updated >= since then feed_add(feed, 'd', key, part, '', '', '') end
      end
    end
    n = n + redis.call('DEL', ekey)
    idx_rem(m)
    redis.call('ZREM', XZ, key)
    count(part, -1)
  end
end
if feed then
  if rec == '' and n > 0 then
    feed_add(feed, 'c', '', pf, '', '', '')
    rec = now
  end
  feed_close(feed)
end
if #ms < budget then
  if pf == '' then redis.call('DEL', DIR, BPFX, XZ, CNT, PENDING) end
  return {'', n, rec}
end
if pf == '' then return {'-', n, rec} end
return {'(' .. ms[#ms], n, rec}
