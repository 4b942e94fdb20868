-- ARGV: 2 ttl_ms, 3 partition arg, then key, payload pairs. Returns the count written.
local now = now_ms()
local ttl, parg = tonumber(ARGV[2]), ARGV[3]
local n = 0
for i = 4, #ARGV, 2 do
  write(ARGV[i], ARGV[i + 1], ttl, parg, false, now)
  n = n + 1
end
return n
