-- Shared by the work queue scripts (prepended at load time).
--
-- Keys of a namespace (the hash tag {ns} keeps them in the namespace's slot, next to its
-- entries and leases; none can be mistaken for a key-value key -- e:, b:, d, x, c, t, g -- or
-- a lease or agent key -- l:, a:, ai, ae):
--   fm:{ns}:qn        STRING  the job id sequence (INCRBY); an id is a value as 16 hex digits
--   fm:{ns}:qs        ZSET    score 0: names of the queues that may hold a job or a result
--                             (a listing drops the empty ones it passes)
--   fm:{ns}:j:<id>    HASH    a job: q queue, p payload (JSON), n priority, m max attempts,
--                             e enqueued ms, r ready_at ms, a attempts, t token, s state
--                             (w waiting, c claimed, d dead, o done), c claimed ms, l lease
--                             expiry ms, w consumer, x last error, k dedupe key, f finished
--                             ms, v result (JSON), h result expiry ms, z present once a
--                             result(wait=...) awaits it. A done job has no payload and
--                             expires natively at h.
-- and per queue <q> (its name follows the key rules, so it holds no control character):
--   fm:{ns}:qr:<q>    ZSET    score 0: the ready jobs, member <code><ready_at><id> (below),
--                             so ZPOPMIN pops them in claim order
--   fm:{ns}:qd:<q>    ZSET    waiting jobs not ready yet: score ready_at, member <code><id>
--   fm:{ns}:qc:<q>    ZSET    claims with attempts left: score lease expiry, member <code><id>
--   fm:{ns}:ql:<q>    ZSET    claims on their last attempt: likewise
--   fm:{ns}:qx:<q>    ZSET    score 0: dead jobs, member <id> (id order)
--   fm:{ns}:qo:<q>    ZSET    done jobs whose result is held: score h, member <id>
--   fm:{ns}:qk:<q>    HASH    dedupe key -> id of the waiting or claimed job holding it
--
-- Claim order is exact: <code> is 2147483647 - priority as 8 hex digits (higher priority
-- first), <ready_at> 12 hex digits of milliseconds, <id> 16 hex digits; members of equal score
-- sort by their bytes. A waiting job (s = w) is in qd until it comes due, then in qr with
-- ready_at = r. A claim whose lease expired with attempts left stays s = c (its holder may
-- still ack, nack or extend it, as nobody claimed it since) but moves from qc to qr with
-- ready_at = l; one whose lease expired on its last attempt is dead since l, and moves from ql
-- to qx (s = d, f = l) at the next claim or sweep. Every read applies these rules itself.
--
-- Wake-ups: PUBLISH on the channel fm:queues, "p\0<ns>\0<q>\0<origin>\0<n>" when n jobs
-- became ready or waiting (a put, a nack for now, retry_dead) and "r\0<ns>\0<id>\0<origin>"
-- when an awaited job is done or dead. origin: an id of the calling connector, whose own
-- waiters were woken directly (its listener skips the message); "" from a sweep.
--
-- KEYS[1] = "fm:{ns}:". ARGV holds the script's own arguments (the queue first, mostly).
-- <bind>
local P = KEYS[1]
local SEQ, NAMES, JPFX = P .. 'qn', P .. 'qs', P .. 'j:'
-- </bind>

local CHANNEL = 'fm:queues'
local TOP = 2147483647
-- Members per ZADD / ZREM built in a script (Lua's unpack stops near 8,000 values).
local BATCH = 500

local QNAME, READY, DELAYED, CLAIMS, LAST, DEAD, DONE, DEDUPE

-- Bind the keys of queue q (every script does this first).
local function use(q)
  QNAME = q
  READY, DELAYED = P .. 'qr:' .. q, P .. 'qd:' .. q
  CLAIMS, LAST = P .. 'qc:' .. q, P .. 'ql:' .. q
  DEAD, DONE, DEDUPE = P .. 'qx:' .. q, P .. 'qo:' .. q, P .. 'qk:' .. q
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The namespace of P ("fm:{ns}:").
local function namespace()
  return string.sub(P, 5, -3)
end

-- The sort code of a priority (a number): higher priorities get smaller codes.
local function code_of(priority)
  return string.format('%08x', TOP - priority)
end

local function ready_member(code, at, id)
  return code .. string.format('%012x', at) .. id
end

-- A number as ZRANGEBYSCORE / ZCOUNT bounds take it (never in exponent form).
local function ms(at)
  return string.format('%d', at)
end

local function publish_put(n, origin)
  redis.call('PUBLISH', CHANNEL,
    'p\0' .. namespace() .. '\0' .. QNAME .. '\0' .. origin .. '\0' .. string.format('%d', n))
end

local function publish_result(id, origin)
  redis.call('PUBLISH', CHANNEL, 'r\0' .. namespace() .. '\0' .. id .. '\0' .. origin)
end

-- Free dedupe key k (false: none) if job id holds it.
local function free_key(k, id)
  if k and redis.call('HGET', DEDUPE, k) == id then redis.call('HDEL', DEDUPE, k) end
end

-- Job id, claimed on its last attempt, died when its lease expired at `at`: move it from ql to
-- the dead letter, free its dedupe key, wake its awaited result.
local function bury(id, code, at)
  local j = JPFX .. id
  local f = redis.call('HMGET', j, 'k', 'z')
  redis.call('HSET', j, 's', 'd', 'f', at)
  redis.call('ZREM', LAST, code .. id)
  redis.call('ZADD', DEAD, 0, id)
  free_key(f[1], id)
  if f[2] then publish_result(id, '') end
end

-- Move the claims that expired on their last attempt to the dead letter.
local function sweep(now)
  while true do
    local due = redis.call('ZRANGEBYSCORE', LAST, '-inf', ms(now), 'WITHSCORES', 'LIMIT', 0, BATCH)
    if #due == 0 then return end
    for i = 1, #due, 2 do
      local m = due[i]
      bury(string.sub(m, 9), string.sub(m, 1, 8), tonumber(due[i + 1]))
    end
  end
end

-- Move members of zset `from` due at `now` (score <= now) to the ready set, their score
-- becoming their ready_at: delayed jobs that came due, claims that expired with attempts left.
local function promote(from, now)
  while true do
    local due = redis.call('ZRANGEBYSCORE', from, '-inf', ms(now), 'WITHSCORES', 'LIMIT', 0, BATCH)
    if #due == 0 then return end
    local add, rem = {}, {}
    for i = 1, #due, 2 do
      local m = due[i]
      add[i], add[i + 1] = 0, ready_member(string.sub(m, 1, 8), tonumber(due[i + 1]), string.sub(m, 9))
      rem[#rem + 1] = m
    end
    redis.call('ZADD', READY, unpack(add))
    redis.call('ZREM', from, unpack(rem))
  end
end

-- Settle the queue at `now`: what came due is ready, what died is dead.
local function settle(now)
  promote(DELAYED, now)
  promote(CLAIMS, now)
  sweep(now)
  -- Results past their TTL: their job hashes expired by themselves; drop their index entries,
  -- so an idle queue that consumers still poll does not keep them.
  redis.call('ZREMRANGEBYSCORE', DONE, '-inf', ms(now))
end

-- The id of the live (waiting, or claimed and not dead) job holding dedupe key k, or nil. A
-- holder that died on its last lease is buried now, which frees the key.
local function holder(k, now)
  local id = redis.call('HGET', DEDUPE, k)
  if not id then return nil end
  local h = redis.call('HMGET', JPFX .. id, 's', 'a', 'm', 'l', 'n')
  if h[1] == 'w' then return id end
  if h[1] == 'c' then
    local l = tonumber(h[4])
    if l > now or tonumber(h[2]) < tonumber(h[3]) then return id end
    bury(id, code_of(tonumber(h[5])), l)
    return nil
  end
  redis.call('HDEL', DEDUPE, k) -- not a live job's: stale
  return nil
end

-- Fields read by the claim checks of ack, nack and extend.
local HELD = {'q', 's', 't', 'a', 'm', 'l', 'n', 'k', 'z'}

-- Whether h (HMGET of HELD) is a claim of this queue with token `token` that holds at `now`:
-- claimed with that token and not dead (an expired lease with attempts left is fine: nobody
-- claimed the job since).
local function holds(h, token, now)
  if h[1] ~= QNAME or h[2] ~= 'c' or h[3] ~= token then return false end
  return tonumber(h[6]) > now or tonumber(h[4]) < tonumber(h[5])
end

-- Take job id (h: HMGET of HELD, a claim that holds) out of the claim sets, and out of the
-- ready set if its expired lease put it there. Returns its sort code.
local function unclaim(id, h, now)
  local code = code_of(tonumber(h[7]))
  if tonumber(h[4]) >= tonumber(h[5]) then
    redis.call('ZREM', LAST, code .. id)
  else
    redis.call('ZREM', CLAIMS, code .. id)
    -- Always (a no-op when absent): if the server's clock went back since a claim promoted
    -- the expired lease, a stale ready member must not survive to be claimed again.
    redis.call('ZREM', READY, ready_member(code, tonumber(h[6]), id))
  end
  return code
end

-- Whether the queue holds no job and no result held at `now`.
local function empty(now)
  if redis.call('EXISTS', READY, DELAYED, CLAIMS, LAST, DEAD) > 0 then return false end
  return redis.call('ZCOUNT', DONE, '(' .. ms(now), '+inf') == 0
end

-- Drop the queue from the list of names if it is empty at `now`.
local function forget_if_empty(now)
  if empty(now) then
    redis.call('ZREM', NAMES, QNAME)
    redis.call('DEL', DONE, DEDUPE)
    return true
  end
  return false
end

