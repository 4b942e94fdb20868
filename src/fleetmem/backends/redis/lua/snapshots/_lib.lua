-- Shared by the snapshot scripts (prepended at load time).
--
-- The named snapshots of a namespace (see snapshots.py), under its hash tag {ns} -- so in its
-- slot, next to its entries -- but under the upper-case "S", which no key-value, lease, agent,
-- queue or feed key uses: no index walk, count, SCAN pattern or clear() of those ever meets
-- them.
--   fm:{ns}:Sc  HASH    the catalog: snapshot name -> JSON {"seq", "at" (server time, us),
--                       "keys", "bytes"} (plus "deleting": true while a delete runs)
--   fm:{ns}:Sk  ZSET    score 0: every key that has a record (ordered by its UTF-8 bytes)
--   fm:{ns}:Sh  HASH    key -> its records, newest first, each a 20-byte header (struct
--                       ">IIqI": from_seq, to_seq (0 = open), expires ms (-1 = none), length
--                       of the entry string) followed by the entry string as lua/kv/_lib.lua
--                       wrote it (header, partition, stored JSON)
--   fm:{ns}:Su  HASH    "records", "bytes": what Sh holds (bytes as seam.record_bytes counts)
--   fm:{ns}:Sl  STRING  the lock of creates and deletes: a random token, with a TTL
-- Sk and Sh change together, with Su, in one script call.
--
-- KEYS[1] = "fm:{ns}:". ARGV holds the script's own arguments; every script that changes Sc,
-- Sk, Sh or Su takes the lock's token first and changes nothing (answering 0) unless the lock
-- holds that token.
-- <bind>
local P = KEYS[1]
local CAT, KIDX, HIST, USE, LOCK = P .. 'Sc', P .. 'Sk', P .. 'Sh', P .. 'Su', P .. 'Sl'
-- </bind>

local function holds(token)
  return redis.call('GET', LOCK) == token
end

-- argv (a script's ARGV) from 4 on: pairs of key and records ("" = the key has none left);
-- argv 2 and 3: the change of Su's records and bytes.
local function put_records(argv)
  for i = 4, #argv, 2 do
    local key, recs = argv[i], argv[i + 1]
    if recs == '' then
      redis.call('HDEL', HIST, key)
      redis.call('ZREM', KIDX, key)
    else
      redis.call('HSET', HIST, key, recs)
      redis.call('ZADD', KIDX, 0, key)
    end
  end
  if argv[2] ~= '0' then
    -- The last record gone: no hash of zeros is left behind.
    if redis.call('HINCRBY', USE, 'records', argv[2]) == 0 then
      redis.call('DEL', USE)
      return
    end
  end
  if argv[3] ~= '0' then redis.call('HINCRBY', USE, 'bytes', argv[3]) end
end
