-- ARGV: 2 key, 3 payload, 4 ttl_ms (0 none), 5 partition arg, 6 keep_ttl ("1"/"0")
local now = now_ms()
local ver, c, part, exp = write(ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6] == '1', now)
return {ver, c, now, part, exp}
