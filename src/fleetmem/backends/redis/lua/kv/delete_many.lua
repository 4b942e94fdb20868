-- ARGV: keys. Returns, per key, 1 if a live entry was deleted, else 0. The feed is looked up
-- once a live entry was deleted (a delete of absent keys records nothing).
local out = {}
local feed
for i = 1, #ARGV do
  local gone, part = remove(ARGV[i])
  out[i] = gone
  if gone == 1 then
    if feed == nil then feed = feed_open(now_ms()) or false end
    if feed then feed_add(feed, 'd', ARGV[i], part, '', '', '') end
  end
end
if feed then feed_close(feed) end
return out
