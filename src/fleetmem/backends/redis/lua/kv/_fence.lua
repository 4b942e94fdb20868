-- The fence of a fenced write, put before the body of "fenced_<script>" (scripts.py): ARGV
-- ends with a lease name and a token, popped here so that the body sees its own arguments
-- unchanged. The lease hash fm:{ns}:l:<name> (layout: lua/leases/_lib.lua; "t" the token,
-- "e" the expiry in ms) must hold that token and expire after this server's TIME; otherwise
-- the write is refused before the body runs, so a lost fence wins over anything the body
-- would have said (a version conflict, not a number). The connector turns the error into
-- LeaseLostError (it knows the name and token: the last two arguments of the call).
do
  local token = table.remove(ARGV)
  local name = table.remove(ARGV)
  local l = redis.call('HMGET', P .. 'l:' .. name, 't', 'e')
  if l[1] ~= token or not l[2] or tonumber(l[2]) <= now_ms() then
    return redis.error_reply('FMLEASELOST the fencing lease is no longer held')
  end
end
