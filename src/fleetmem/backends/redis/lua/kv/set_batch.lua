-- Several independent set() calls (distinct keys). ARGV: three per call: key, payload,
-- options: "" (no TTL, keep the partition, keep_ttl off) or "<ttl_ms> <keep 0/1> <partition
-- arg>". Returns {now, then four per call: version, created, partition, expires}. Plain
-- writes go out as one MSET per slice.
local now = now_ms()
local out, mset = {now}, {}
local feed = feed_open(now)
-- Every current header in one MGET (the keys are distinct).
local ekeys = {}
for i = 1, #ARGV, 3 do ekeys[#ekeys + 1] = EPFX .. ARGV[i] end
local raws = redis.call('MGET', unpack(ekeys))
local j = 2
for i = 1, #ARGV, 3 do
  local key, opts = ARGV[i], ARGV[i + 2]
  local ttl, keep, parg = 0, false, ''
  if opts ~= '' then
    local t, k, p = string.match(opts, '^(%d+) ([01]) (.*)$')
    ttl, keep, parg = tonumber(t), k == '1', p
  end
  local n = (i + 2) / 3
  local ekey = ekeys[n]
  local ver, c, old = parse(raws[n])
  out[j], out[j + 1], out[j + 2], out[j + 3] = put(
    key, ekey, ver, c, old, ARGV[i + 1], ttl, parg, keep, now, mset
  )
  if feed then feed_add(feed, 's', key, out[j + 2], out[j], out[j + 3], ARGV[i + 1]) end
  j = j + 4
  if #mset >= 1000 then
    redis.call('MSET', unpack(mset))
    mset = {}
  end
end
if #mset > 0 then redis.call('MSET', unpack(mset)) end
if feed then feed_close(feed) end
return out
