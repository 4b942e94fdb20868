-- Shared by the lease and agent scripts (prepended at load time).
--
-- Keys of a namespace (the hash tag {ns} keeps them in the namespace's slot, next to its
-- entries; none can be mistaken for a key-value key of lua/kv/_lib.lua: those are
-- fm:{ns}:e:<key>, fm:{ns}:b:<lo> and the one-letter d, x, c, t, g):
--   fm:{ns}:l:<name>  HASH  a lease: o owner, t token, a acquired ms, e expires ms, d TTL ms.
--                           No native TTL: the record outlives its lease and keeps the last
--                           token, so the next grant gets a greater one. A release sets e to
--                           now; a lease is live while e > TIME.
--   fm:{ns}:a:<id>    HASH  an agent: i info (JSON), g generation, r registered ms, s last
--                           seen ms, e expires ms, d TTL ms. Kept once the agent is gone (its
--                           generation); live while e > TIME.
--   fm:{ns}:ai        ZSET  score 0, member <id>: agents registered and not deregistered
--                           (listed BYLEX; a listing drops the gone ones it passes)
--   fm:{ns}:ae        ZSET  score = expires ms, member <id>: count() is one ZCOUNT above TIME
-- Release notifications: PUBLISH on the channel fm:leases, payload "<ns>\0<name>\0<origin>"
-- (origin: an id of the releasing connector).
--
-- KEYS[1] = "fm:{ns}:". ARGV holds the script's own arguments.
-- <bind>
local P = KEYS[1]
-- </bind>

local CHANNEL = 'fm:leases'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The namespace of P ("fm:{ns}:").
local function namespace()
  return string.sub(P, 5, -3)
end
