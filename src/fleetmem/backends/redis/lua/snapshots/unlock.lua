-- ARGV: 1 token. Releases the lock if token holds it. Returns 1 if released.
if not holds(ARGV[1]) then return 0 end
redis.call('DEL', LOCK)
return 1
