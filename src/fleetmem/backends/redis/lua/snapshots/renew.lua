-- ARGV: 1 token, 2 TTL (ms). Extends the lock if token still holds it (never takes it again:
-- a holder that lost it must not write on what it read before). Returns 1 if extended.
if not holds(ARGV[1]) then return 0 end
redis.call('PEXPIRE', LOCK, ARGV[2])
return 1
