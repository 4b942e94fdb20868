-- The number of live agents: those whose expiry in fm:{ns}:ae is after TIME.
return redis.call('ZCOUNT', P .. 'ae', '(' .. now_ms(), '+inf')
