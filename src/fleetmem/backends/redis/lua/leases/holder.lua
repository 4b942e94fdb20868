-- ARGV: 1 name. Returns {owner, token, acquired ms, expires ms} of the live lease, or nil.
local cur = redis.call('HMGET', P .. 'l:' .. ARGV[1], 'o', 't', 'a', 'e')
if not cur[4] or tonumber(cur[4]) <= now_ms() then return nil end
return {cur[1], tonumber(cur[2]), tonumber(cur[3]), tonumber(cur[4])}
