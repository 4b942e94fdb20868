-- ARGV: 1 token, 2 name, 3 its catalog row ("" = remove it). Sets or removes the row if token
-- holds the lock (a delete marks a row "deleting", then removes it). Returns 1, or 0 (nothing
-- written) when token does not hold the lock.
if not holds(ARGV[1]) then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', CAT, ARGV[2])
else
  redis.call('HSET', CAT, ARGV[2], ARGV[3])
end
return 1
