-- The namespace registry (KEYS[1] = "fm:{_fleetmem}:", a slot of its own): P .. 'ns' is a
-- sorted set of namespace names (score 0, listed BYLEX), P .. 'nss' a sorted set of the names
-- suspected of being empty (a listing found them empty, or a clear() emptied them), scored by
-- that server's TIME in ms (see RedisKV.namespaces); P .. 'nsm' the marker of a complete
-- registry (ns_ready.lua).
-- ARGV[1] a namespace about to be written: listed, and no longer suspected of being empty.
redis.call('ZADD', P .. 'ns', 0, ARGV[1])
redis.call('ZREM', P .. 'nss', ARGV[1])
return 1
