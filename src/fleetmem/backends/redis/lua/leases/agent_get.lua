-- ARGV: 1 id. Returns {info, generation, registered ms, last seen ms, expires ms}, or nil.
local cur = redis.call('HMGET', P .. 'a:' .. ARGV[1], 'i', 'g', 'r', 's', 'e')
if not cur[5] or tonumber(cur[5]) <= now_ms() then return nil end
return {cur[1], tonumber(cur[2]), tonumber(cur[3]), tonumber(cur[4]), tonumber(cur[5])}
