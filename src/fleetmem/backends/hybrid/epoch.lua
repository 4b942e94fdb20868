-- Publish a namespace's epoch; it never goes backwards. KEYS[1] = the epoch key, KEYS[2] = the
-- key naming the server it was published on; ARGV[1] = the epoch (an integer) read from the
-- durable store. The epoch key holds "<epoch>|", the prefix of every value cached under it, so
-- a read compares prefixes without building one. The second key holds this server's run_id:
-- after a restart (with old data from its persistence or not) the run_id differs, and a reader
-- that compares it with its connection's knows the epoch is from before the restart.
local cur = redis.call('GET', KEYS[1])
if cur and tonumber(string.sub(cur, 1, -2)) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1] .. '|')
local info = redis.pcall('INFO', 'server')
local id = type(info) == 'string' and string.match(info, 'run_id:(%x+)')
if id then
  redis.call('SET', KEYS[2], id)
else
  redis.call('DEL', KEYS[2])
end
return 1
