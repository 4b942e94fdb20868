-- As write.lua, for a delete: records dropped or reopened, never added, so it runs on a full
-- server too (allow-oom) and deleting snapshots frees memory there.
if not holds(ARGV[1]) then return 0 end
put_records(ARGV)
return 1
