-- ARGV: keys. Returns, per key, 1 if its entry is live, else 0.
local out = {}
for i = 1, #ARGV do out[i] = redis.call('EXISTS', EPFX .. ARGV[i]) end
return out
