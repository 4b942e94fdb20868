-- KEYS[1] = "fm:{_fleetmem}:" (see ns_register.lua). ARGV: 1 how many ms a suspicion must be
-- old, 2 how many names at most. Returns the oldest suspected names whose suspicion is that
-- old (the caller checks each again: ns_suspect, then ns_forget).
return redis.call('ZRANGE', P .. 'nss', '-inf', now_ms() - tonumber(ARGV[1]), 'BYSCORE',
  'LIMIT', 0, tonumber(ARGV[2]))
