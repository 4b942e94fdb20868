-- Cache fill guarded by the lease taken in read.lua. KEYS[1] = the namespace's epoch,
-- KEYS[2..] = entry keys. ARGV[1] = the lease token; then, per key, its body and its cache
-- time to live in ms. A key is filled only while it still holds this reader's lease: any write
-- (which deletes the key after its COMMIT) or a newer lease in between voids the fill, so a value
-- read from PostgreSQL before a write can never be cached after it.
local ep = redis.call('GET', KEYS[1])
if not ep then
  return -1
end
local lease = 'L:' .. ARGV[1]
local filled = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == lease then
    local px = tonumber(ARGV[2 * i - 1])
    if px > 0 then
      redis.call('SET', KEYS[i], ep .. ARGV[2 * i - 2], 'PX', px)
      filled = filled + 1
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return filled
