-- ARGV: 2 key, 3 payload, 4 ttl_ms, 5 partition arg. Returns 1 if written.
if redis.call('EXISTS', EPFX .. ARGV[2]) == 1 then return 0 end
write(ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], false, now_ms())
return 1
