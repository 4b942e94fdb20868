-- Cache read with leases. KEYS[1] = the namespace's epoch (a string "<epoch>.<nonce>|"),
-- KEYS[2..] = entry keys. ARGV[1] = this reader's lease token, ARGV[2] = lease time (ms),
-- ARGV[3] = the epoch string this reader trusts (as published, for the durable epoch it
-- confirmed in PostgreSQL lately).
-- A cache value is "<epoch>.<nonce>|<body>"; a value written under another epoch is dead.
-- Returns -1 when the published epoch is missing or is not the one the reader trusts (the
-- reader then resyncs). With one entry key: the whole cached value on a hit, 1 when this reader
-- now holds the fill lease, 0 when another reader holds it. With more: a table of these.
local ep = redis.call('GET', KEYS[1])
if ep ~= ARGV[3] then
  return -1
end
local plen = #ep
local lease = 'L:' .. ARGV[1]
local function read(key)
  local v = redis.call('GET', key)
  if v then
    if string.sub(v, 1, plen) == ep then
      return v
    end
    if string.sub(v, 1, 2) == 'L:' then
      if v == lease then
        return 1  -- left by this reader's first attempt (HybridKV._hit_or_lease)
      end
      return 0
    end
  end
  redis.call('SET', key, lease, 'PX', ARGV[2])
  return 1
end
if #KEYS == 2 then
  return read(KEYS[2])
end
local out = {}
for i = 2, #KEYS do
  out[i - 1] = read(KEYS[i])
end
return out
