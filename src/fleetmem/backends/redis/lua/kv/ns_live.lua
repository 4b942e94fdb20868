-- Whether this namespace holds a live entry, from its counts and its expiry index (never a
-- pass over its entries). Returns 1 (live), 0 (no entry) or 2 (undecided: entries that have
-- (or had) a TTL due by now may be gone; prune, then read the counts).
local total = 0
for _, n in ipairs(redis.call('HVALS', CNT)) do total = total + tonumber(n) end
if total == 0 then return 0 end
-- CNT counts the indexed entries and XZ holds every entry given a TTL: an indexed entry
-- outside XZ is persistent, hence live.
if total > redis.call('ZCARD', XZ) then return 1 end
local later = redis.call('ZRANGE', XZ, '(' .. now_ms(), '+inf', 'BYSCORE', 'LIMIT', 0, 1)[1]
if later and redis.call('EXISTS', EPFX .. later) == 1 then return 1 end
return 2
