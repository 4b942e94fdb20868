-- Bring a namespace's published epoch in line with the durable one. KEYS[1] = the epoch key
-- (holds "<epoch>.<nonce>|", the prefix of every value cached under it), KEYS[2] = the key
-- naming the server it was published on (its run_id); ARGV[1] = the durable epoch D the caller
-- has just read from PostgreSQL; ARGV[2] = '1' when D comes from the caller's own increment
-- just now (so nothing was ever cached under it); ARGV[3] = a random nonce, used only if D is
-- published now.
-- Every publication writes a string never published before ("<D>.<nonce>|", the nonce fresh):
-- a value cached under an earlier publication never matches a later one, even when the
-- number starts again (a clear deletes the durable epoch and the published one).
-- Returns {0, D, E}: already published on this very server, as E (nothing to do); {1, D, E}: D
-- published now as E (it was ahead of the published epoch, which retires every value cached
-- before, or the epoch key was missing, on a server whose run_id is the one stored (evicted or
-- deleted) or with D fresh);
-- {2, N}: the caller must first raise the durable epoch to at least N, then call again. That
-- is the case when the published epoch is missing or equals D on a server that restarted
-- (old data from its persistence may be back: the stored run_id is not this server's), or is
-- AHEAD of D (the durable epoch went backwards: restored from a backup, or cleared). The
-- published number never moves backwards, and never stays put when it cannot be trusted. A
-- server that does not tell its run_id is never taken as unchanged.
local d = tonumber(ARGV[1])
local info = redis.pcall('INFO', 'server')
local id = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
local cur = redis.call('GET', KEYS[1])
local published = cur and tonumber(string.match(cur, '^(%d+)'))
local on_this_server = id ~= '' and redis.call('GET', KEYS[2]) == id
if published == d and on_this_server then
  return {0, d, cur}
end
if (published and published < d) or (not published and (on_this_server or ARGV[2] == '1')) then
  local epoch = ARGV[1] .. '.' .. ARGV[3] .. '|'
  redis.call('SET', KEYS[1], epoch)
  redis.call('SET', KEYS[2], id)
  return {1, d, epoch}
end
return {2, math.max(published or 0, d) + 1}
