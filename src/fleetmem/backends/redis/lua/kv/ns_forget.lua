-- KEYS[1] = "fm:{_fleetmem}:" (see ns_register.lua). ARGV: 1 a namespace looked at again
-- after its suspicion's mark ARGV[2] had aged, 3 "1" if it was still empty (drop it from the
-- registry), "0" if it holds entries again (lift the suspicion, so that it is not looked at
-- again). Nothing happens if a writer registered it since (which lifted the mark). Returns 1
-- if the mark was still there.
local name = ARGV[1]
if redis.call('ZSCORE', P .. 'nss', name) ~= ARGV[2] then return 0 end
if ARGV[3] ~= '0' then redis.call('ZREM', P .. 'ns', name) end
redis.call('ZREM', P .. 'nss', name)
return 1
