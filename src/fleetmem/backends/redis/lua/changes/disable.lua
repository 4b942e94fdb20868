-- Disables the feed: the flag and the log go, the epoch stays (the next enable's is greater).
-- Returns 1 if it was enabled.
if redis.call('HEXISTS', FEED, 'r') == 0 then return 0 end
redis.call('HDEL', FEED, 'r', 'l', 'f', 'n')
redis.call('DEL', LOG)
return 1
