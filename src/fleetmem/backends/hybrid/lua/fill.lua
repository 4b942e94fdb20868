-- Cache fill guarded by the lease taken in read.lua. KEYS[1] = the namespace's epoch,
-- KEYS[2..] = entry keys. ARGV[1] = the lease token, ARGV[2] = the epoch string the reader
-- trusted when it took the lease; then, per key, its body and its cache time to live in ms.
-- A key is filled only while it still holds this reader's lease and the epoch is still the one
-- of the lease: any write (which deletes the key after its COMMIT), a newer lease, or an epoch
-- published meanwhile (a writer that could not delete bumped it) voids the fill, so a value
-- read from PostgreSQL before a write can never be cached after it.
local ep = redis.call('GET', KEYS[1])
if ep ~= ARGV[2] then
  return -1
end
local lease = 'L:' .. ARGV[1]
local filled = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == lease then
    local px = tonumber(ARGV[2 * i])
    if px > 0 then
      redis.call('SET', KEYS[i], ep .. ARGV[2 * i - 1], 'PX', px)
      filled = filled + 1
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return filled
