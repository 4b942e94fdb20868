-- Cache read with leases. KEYS[1] = the namespace's epoch (a sorted set, member "e"),
-- KEYS[2..] = entry keys. ARGV[1] = this reader's lease token, ARGV[2] = lease time (ms).
-- A cache value is "<epoch>|<body>"; a value written under an older epoch is dead.
-- Returns -1 when the namespace has no epoch (flushed, restarted empty, evicted); otherwise one
-- item per key: the body on a hit, 1 when this reader now holds the fill lease, 0 when another
-- reader holds it.
local ep = redis.call('ZSCORE', KEYS[1], 'e')
if not ep then
  return -1
end
local prefix = ep .. '|'
local plen = #prefix
local out = {}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v and string.sub(v, 1, plen) == prefix then
    out[i - 1] = string.sub(v, plen + 1)
  elseif v and string.sub(v, 1, 2) == 'L:' then
    out[i - 1] = 0
  else
    redis.call('SET', KEYS[i], 'L:' .. ARGV[1], 'PX', ARGV[2])
    out[i - 1] = 1
  end
end
return out
