-- KEYS[1] = "fm:{_fleetmem}:" (see ns_register.lua). ARGV: 1 a namespace found (or made)
-- empty, 2 how many ms it must stay suspected before it may be forgotten.
-- Returns "" (just suspected now, or not in the registry), or the suspicion's mark when it is
-- older than ARGV[2] (the caller then looks at the namespace again and calls ns_forget).
local name = ARGV[1]
if not redis.call('ZSCORE', P .. 'ns', name) then return '' end
local now = now_ms()
local mark = redis.call('ZSCORE', P .. 'nss', name)
if not mark then
  redis.call('ZADD', P .. 'nss', now, name)
  return ''
end
if now - tonumber(mark) >= tonumber(ARGV[2]) then return mark end
return ''
