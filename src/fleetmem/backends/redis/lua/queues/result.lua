-- ARGV: 1 queue, 2 id. Returns {1, result, attempts, finished} for a done job whose result is
-- held, {2, last error, attempts, finished} for a dead one (also one whose lease expired on
-- its last attempt: dead since that expiry), else nil.
local j = JPFX .. ARGV[2]
local h = redis.call('HMGET', j, 'q', 's', 'a', 'm', 'l', 'x', 'f', 'v', 'h')
if h[1] ~= ARGV[1] then return false end
local now = now_ms()
local s = h[2]
if s == 'o' and tonumber(h[9]) > now then return {1, h[8], tonumber(h[3]), tonumber(h[7])} end
if s == 'd' then return {2, h[6], tonumber(h[3]), tonumber(h[7])} end
if s == 'c' and tonumber(h[5]) <= now and tonumber(h[3]) >= tonumber(h[4]) then
  return {2, h[6], tonumber(h[3]), tonumber(h[5])}
end
return false
