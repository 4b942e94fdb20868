-- ARGV: keys. Returns, per key, 1 if a live entry was deleted, else 0.
local out = {}
for i = 1, #ARGV do out[i] = remove(ARGV[i]) end
return out
