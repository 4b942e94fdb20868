-- ARGV: 1 cursor (the last name of the previous page, or ""), 2 page size. Returns {cursor for
-- the next page ("" at the end), the names of the page that hold a job or a held result};
-- names of empty queues are dropped (with their expired results' index) on the way.
local lo = '-'
if ARGV[1] ~= '' then lo = '(' .. ARGV[1] end
local page = tonumber(ARGV[2])
local names = redis.call('ZRANGE', NAMES, lo, '+', 'BYLEX', 'LIMIT', 0, page)
local now = now_ms()
local out = {''}
if #names == page then out[1] = names[#names] end
for _, name in ipairs(names) do
  use(name)
  redis.call('ZREMRANGEBYSCORE', DONE, '-inf', ms(now))
  if not forget_if_empty(now) then out[#out + 1] = name end
end
return out
