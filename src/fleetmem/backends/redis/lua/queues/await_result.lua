-- ARGV: 1 queue, 2 id. Marks a waiting or claimed job of the queue as awaited: its ack, or its
-- nack to the dead letter, then publishes a wake-up for its result. Returns 1 if marked.
local j = JPFX .. ARGV[2]
local h = redis.call('HMGET', j, 'q', 's')
if h[1] ~= ARGV[1] or (h[2] ~= 'w' and h[2] ~= 'c') then return 0 end
redis.call('HSET', j, 'z', 1)
return 1
