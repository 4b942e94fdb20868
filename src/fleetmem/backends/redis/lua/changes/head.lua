-- Returns {epoch, the id of the newest change ("0-0": none yet)}, nil when not enabled.
local f = redis.call('HMGET', FEED, 'r', 'e', 'l')
if not f[1] then return false end
return {f[2], f[3]}
