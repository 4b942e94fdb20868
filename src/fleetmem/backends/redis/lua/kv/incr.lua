-- ARGV: 1 key, 2 amount (decimal text), 3 "i" (int amount) or "f" (float), 4 ttl_ms,
-- 5 partition arg. Integers use INCRBY on a scratch key: exact in signed 64 bits, an error
-- (nothing written) beyond. Returns {"OK", text} | {"NAN", first byte} | {"RANGE"} (an int
-- result beyond 64 bits) | {"FLOAT"} (a float result that overflows).
local key = ARGV[1]
local raw = redis.call('GET', EPFX .. key)
local v = '0'
if raw then v = payload_of(raw) end
local b = string.byte(v, 1)
if not (b == 45 or (b >= 48 and b <= 57)) then return {'NAN', string.sub(v, 1, 1)} end
local result
if ARGV[3] == 'i' and string.find(v, '^%-?%d+$') then
  redis.call('SET', TMP, v)
  local r = redis.pcall('INCRBY', TMP, ARGV[2])
  if type(r) == 'table' and r.err then
    redis.call('DEL', TMP)
    return {'RANGE'}
  end
  result = redis.call('GET', TMP)
  redis.call('DEL', TMP)
else
  local x = tonumber(v) + tonumber(ARGV[2])
  if x ~= x or x == math.huge or x == -math.huge then return {'FLOAT'} end
  for _, f in ipairs({'%.15g', '%.16g', '%.17g'}) do
    result = string.format(f, x)
    if tonumber(result) == x then break end
  end
  if not string.find(result, '[%.eE]') then result = result .. '.0' end
end
local now = now_ms()
local ver, _, part, exp = write(key, result, tonumber(ARGV[4]), ARGV[5], true, now)
local feed = feed_open(now)
if feed then
  feed_add(feed, 's', key, part, ver, exp, result)
  feed_close(feed)
end
return {'OK', result}
