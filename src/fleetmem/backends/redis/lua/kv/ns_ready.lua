-- KEYS[1] = "fm:{_fleetmem}:" (see ns_register.lua). Whether the registry is complete: its
-- marker P .. 'nsm' holds the run_id of the server that was running when a listing last
-- backfilled it (RedisKV._complete_registry). A missing marker means data older than the
-- registry, a restart without persistence or a flush; another run_id, a restart or a failover
-- (which may have lost registrations but not entries). Returns "" when complete, else the
-- value for ns_backfill to set ("-" when INFO is refused or has no run_id: the marker then
-- stands for "backfilled once").
local run = '-'
local info = redis.pcall('INFO', 'server')
if type(info) == 'string' then run = string.match(info, 'run_id:(%x+)') or '-' end
if redis.call('GET', P .. 'nsm') == run then return '' end
return run
