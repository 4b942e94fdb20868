-- ARGV: 2.. keys. Returns how many live entries were deleted.
local n = 0
for i = 2, #ARGV do n = n + remove(ARGV[i]) end
return n
