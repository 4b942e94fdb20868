-- ARGV: 2 key, 3 payload, 4 expected version, 5 ttl_ms, 6 partition arg.
-- Returns {0, current_version} on a mismatch, else {1, ver, created, updated, part, expires}.
local cur = header(EPFX .. ARGV[2]) or 0
if cur ~= tonumber(ARGV[4]) then return {0, cur} end
local now = now_ms()
local ver, c, part, exp = write(ARGV[2], ARGV[3], tonumber(ARGV[5]), ARGV[6], true, now)
return {1, ver, c, now, part, exp}
