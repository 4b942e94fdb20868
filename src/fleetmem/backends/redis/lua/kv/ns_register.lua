-- The namespace registry (KEYS[1] = "fm:{_fleetmem}:", a slot of its own): P .. 'ns' is a
-- sorted set of namespace names (score 0, listed BYLEX), P .. 'nsq' a hash of the names a
-- listing found empty -> that server's TIME in ms (see RedisKV.namespaces).
-- ARGV[1] a namespace about to be written: listed, and no longer suspected of being empty.
redis.call('ZADD', P .. 'ns', 0, ARGV[1])
redis.call('HDEL', P .. 'nsq', ARGV[1])
return 1
