-- ARGV: 1 key, 2 payload, 3 ttl_ms, 4 partition arg. Returns 1 if written.
if redis.call('EXISTS', EPFX .. ARGV[1]) == 1 then return 0 end
write(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], false, now_ms())
return 1
