-- KEYS[1] = "fm:{_fleetmem}:" (see ns_register.lua). ARGV: 1 a namespace found empty again
-- after its suspicion's mark ARGV[2] had aged. Drops it from the registry unless a writer
-- registered it since (which deleted the mark). Returns 1 if dropped.
local name = ARGV[1]
if redis.call('HGET', P .. 'nsq', name) ~= ARGV[2] then return 0 end
redis.call('ZREM', P .. 'ns', name)
redis.call('HDEL', P .. 'nsq', name)
return 1
