-- Publish a namespace's epoch; it never goes backwards. KEYS[1] = the epoch key, ARGV[1] = the
-- epoch (an integer) read from the durable store. The key holds "<epoch>|", the prefix of every
-- value cached under it, so a read compares prefixes without building one.
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(string.sub(cur, 1, -2)) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1] .. '|')
return 1
