-- KEYS[1] = "fm:{_fleetmem}:" (see ns_register.lua). ARGV: 1 "" (more to come) or the marker
-- to set once these are in (ns_ready's answer), 2.. namespaces found holding a counts key.
-- Registers them as ns_register does, then (ARGV[1] ~= "") marks the registry complete.
local n = #ARGV - 1
for i = 2, #ARGV, 500 do
  local args = {}
  for j = i, math.min(i + 499, #ARGV) do
    args[#args + 1] = 0
    args[#args + 1] = ARGV[j]
  end
  redis.call('ZADD', P .. 'ns', unpack(args))
  redis.call('ZREM', P .. 'nss', unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
if ARGV[1] ~= '' then redis.call('SET', P .. 'nsm', ARGV[1]) end
return n
