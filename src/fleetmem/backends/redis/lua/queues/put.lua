-- ARGV: 1 queue, 2 origin, then 5 per job: payload, priority, delay ms, max attempts, dedupe
-- key ("" for none). Enqueues the jobs in order, atomically; a job whose dedupe key a live job
-- of the queue holds (or an earlier job of this call) gets that job's id and adds nothing.
-- Returns {number of jobs added, id of each job in order}. Publishes one wake-up carrying the
-- number added.
use(ARGV[1])
local now = now_ms()
local n = (#ARGV - 2) / 5
-- First the dedupe keys: what each job is -- true (new), an id (held by a live job) or the
-- index of an earlier new job of this call holding the same key.
local kind, seen, fresh = {}, {}, 0
for i = 1, n do
  local k, v = ARGV[5 * i + 2], true
  if k ~= '' then
    local s = seen[k]
    if s then
      v = s
    else
      local id = holder(k, now)
      if id then v = id; seen[k] = id else seen[k] = i end
    end
  end
  if v == true then fresh = fresh + 1 end
  kind[i] = v
end
local out = {fresh}
if fresh == 0 then
  for i = 1, n do out[i + 1] = kind[i] end
  return out
end
local seq = redis.call('INCRBY', SEQ, fresh) - fresh
local ready, delayed = {}, {}
for i = 1, n do
  local v = kind[i]
  if v == true then
    seq = seq + 1
    local id = string.format('%016x', seq)
    local b = 5 * i - 2
    local at = now + tonumber(ARGV[b + 2])
    local code = code_of(tonumber(ARGV[b + 1]))
    local k = ARGV[b + 4]
    local j = JPFX .. id
    redis.call('HSET', j, 'q', QNAME, 'p', ARGV[b], 'n', ARGV[b + 1], 'm', ARGV[b + 3],
      'e', now, 'r', at, 'a', 0, 't', 0, 's', 'w')
    if k ~= '' then
      redis.call('HSET', j, 'k', k)
      redis.call('HSET', DEDUPE, k, id)
    end
    if at <= now then
      ready[#ready + 1] = 0
      ready[#ready + 1] = ready_member(code, at, id)
    else
      delayed[#delayed + 1] = at
      delayed[#delayed + 1] = code .. id
    end
    if #ready >= 2 * BATCH then
      redis.call('ZADD', READY, unpack(ready))
      ready = {}
    end
    if #delayed >= 2 * BATCH then
      redis.call('ZADD', DELAYED, unpack(delayed))
      delayed = {}
    end
    out[i + 1] = id
  elseif type(v) == 'number' then
    out[i + 1] = out[v + 1]
  else
    out[i + 1] = v
  end
end
if #ready > 0 then redis.call('ZADD', READY, unpack(ready)) end
if #delayed > 0 then redis.call('ZADD', DELAYED, unpack(delayed)) end
redis.call('ZADD', NAMES, 0, QNAME)
publish_put(fresh, ARGV[2])
return out
