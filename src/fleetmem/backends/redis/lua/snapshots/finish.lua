-- ARGV: 1 token, 2 name, 3 seq, 4 keys, 5 bytes. A create's last step: its catalog row, with
-- the server's TIME (us) as its creation time, if token holds the lock. Returns that time
-- (a string of digits), or 0 (nothing written) when token does not hold the lock.
if not holds(ARGV[1]) then return 0 end
local t = redis.call('TIME')
local at = t[1] .. string.format('%06d', tonumber(t[2]))
redis.call('HSET', CAT, ARGV[2],
  '{"seq":' .. ARGV[3] .. ',"at":' .. at .. ',"keys":' .. ARGV[4] .. ',"bytes":' .. ARGV[5] .. '}')
return at
