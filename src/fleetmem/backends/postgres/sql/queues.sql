-- Work queues, one named block each ("-- name: NAME").
-- {jobs} is the validated, double-quoted job table of migration 0004. $1 is always the
-- namespace, $2 the queue. Every statement runs alone, so now() is its start: the one clock of
-- every decision. A job's row says where it is through state and due_at:
--
--   state    due_at               effective state at now()
--   waiting  ready_at             ready when due_at <= now(), else delayed
--   claimed  lease_expires_at     claimed while due_at > now(); then ready again
--                                 (attempts < max_attempts) or dead (attempts >= max_attempts)
--   done     the result's expiry  done while due_at > now(); then gone (deletable)
--   dead     finished_at          dead
--
-- So "ready" is due_at <= now() AND attempts < max_attempts among waiting and claimed rows (a
-- waiting row always has attempts left), in the order of the claim index
-- (namespace, queue, priority DESC, due_at, id): due_at is the effective ready_at of both. A
-- claim whose lease ran out on its last attempt is dead from that instant: every statement here
-- that reads it says so (finished_at = due_at, its lease's expiry), and the claim, a put of its
-- dedupe key and retry_dead move it to 'dead'. "The claim holds" (ack, nack, extend) is
--   state = 'claimed' AND token = $t AND (due_at > now() OR attempts < max_attempts).
--
-- Notifications (payloads never start like a namespace, [A-Za-z0-9_.-], so the listener tells
-- them from a lease release "namespace:name"):
--   '>' || count || ':' || namespace || ':' || queue   jobs became claimable (put, retry_dead)
--   '!' || namespace || ':' || job id                  an awaited job finished (ack, nack)

-- name: put
-- $3 payloads (jsonb[]), $4 priorities (int[]), $5 delays in ms (bigint[]), $6 max_attempts
-- (int[]), one element per job; $7 the NOTIFY channel. One INSERT for the whole call, ids taken
-- in the order of the arrays; one notification for all of them, sent at commit.
WITH inserted AS (
    INSERT INTO {jobs} AS j
        (namespace, queue, state, priority, due_at, max_attempts, enqueued_at, ready_at, payload)
    SELECT $1, $2, 'waiting', i.priority, now() + i.delay_ms * interval '1 millisecond',
           i.max_attempts, now(), now() + i.delay_ms * interval '1 millisecond', i.payload
    FROM unnest($3::jsonb[], $4::int[], $5::bigint[], $6::int[])
         WITH ORDINALITY AS i (payload, priority, delay_ms, max_attempts, ord)
    ORDER BY i.ord
    RETURNING j.id
)
SELECT array_agg(id ORDER BY id), pg_notify($7, '>' || count(*) || ':' || $1 || ':' || $2)
FROM inserted

-- name: put_dedupe
-- put with dedupe keys ($7 text[], NULL elements for jobs without one; $8 the channel). A key
-- held by a waiting or claimed job enqueues nothing (ON CONFLICT on the unique index of live
-- keys). A holder whose lease ran out on its last attempt is dead, so it first moves to 'dead'
-- (`buried`), which frees its key; `inserted` reads `buried` so that it runs after it. Rows:
-- (id, key, true) per job inserted, (id, key, false) per live holder this statement's snapshot
-- saw, (NULL, NULL, NULL) when a notification was sent. A key that neither names (a job put by
-- a concurrent transaction that committed after the snapshot) is the caller's to look up again.
WITH buried AS (
    UPDATE {jobs} SET state = 'dead', finished_at = due_at
    WHERE namespace = $1 AND queue = $2 AND dedupe_key = ANY($7::text[])
      AND state = 'claimed' AND due_at <= now() AND attempts >= max_attempts
    RETURNING id
), inserted AS (
    INSERT INTO {jobs} AS j
        (namespace, queue, state, priority, due_at, max_attempts, enqueued_at, ready_at,
         dedupe_key, payload)
    SELECT $1, $2, 'waiting', i.priority, now() + i.delay_ms * interval '1 millisecond',
           i.max_attempts, now(), now() + i.delay_ms * interval '1 millisecond', i.dedupe_key,
           i.payload
    FROM unnest($3::jsonb[], $4::int[], $5::bigint[], $6::int[], $7::text[])
         WITH ORDINALITY AS i (payload, priority, delay_ms, max_attempts, dedupe_key, ord)
    WHERE (SELECT count(*) FROM buried) >= 0
    ORDER BY i.ord
    ON CONFLICT (namespace, queue, dedupe_key)
        WHERE dedupe_key IS NOT NULL AND state IN ('waiting', 'claimed')
        DO NOTHING
    RETURNING j.id, j.dedupe_key
), notified AS (
    SELECT pg_notify($8, '>' || count(*) || ':' || $1 || ':' || $2) FROM inserted
    HAVING count(*) > 0
)
SELECT id, dedupe_key, true FROM inserted
UNION ALL
SELECT id, dedupe_key, false FROM {jobs}
WHERE namespace = $1 AND queue = $2 AND dedupe_key = ANY($7::text[])
  AND state IN ('waiting', 'claimed') AND (due_at > now() OR attempts < max_attempts)
UNION ALL
SELECT NULL, NULL, NULL FROM notified

-- name: claim
-- $3 consumer, $4 lease in ms, $5 how many. One statement:
-- * `levels`: the distinct priorities of the queue's waiting and claimed jobs, highest first,
--   one index descent each (a loose index scan), produced only as far as `picked` reads them;
-- * `picked`: per priority, the ready jobs in (due_at, id) order -- a range of the claim index
--   ending at now(), so jobs not due yet are never read -- locked FOR UPDATE SKIP LOCKED (a row
--   another claimer holds is passed over, never waited for), at most $5 in all: the outer LIMIT
--   stops the nested loop, and MATERIALIZED runs it once, so no more rows are locked than are
--   claimed;
-- * `claimed`: stamps them (attempts + 1, token + 1, ready_at = the due_at they were ready at,
--   lease from now()), found by primary key (`= ANY(ARRAY(...))`: a join could be planned as a
--   hash join over the whole table for a large $5);
-- * `buried`: moves up to 100 claims whose lease ran out on their last attempt to 'dead' (the
--   small last-attempt index; disjoint from `picked`, which needs attempts < max_attempts).
-- The claimed jobs come back (in no particular order), then one row with a NULL id and, when
-- fewer than $5 were claimed, the milliseconds until the next waiting or claimed job of the
-- queue comes due (NULL: none; one descent per priority, skipped by a one-time filter when all
-- $5 were claimed).
WITH RECURSIVE levels (priority) AS (
    (SELECT priority FROM {jobs}
     WHERE namespace = $1 AND queue = $2 AND state IN ('waiting', 'claimed')
     ORDER BY priority DESC
     LIMIT 1)
    UNION ALL
    SELECT (SELECT j.priority FROM {jobs} j
            WHERE j.namespace = $1 AND j.queue = $2 AND j.state IN ('waiting', 'claimed')
              AND j.priority < l.priority
            ORDER BY j.priority DESC
            LIMIT 1)
    FROM levels l
    WHERE l.priority IS NOT NULL
), picked AS MATERIALIZED (
    SELECT p.id FROM levels l CROSS JOIN LATERAL (
        SELECT j.id FROM {jobs} j
        WHERE j.namespace = $1 AND j.queue = $2 AND j.state IN ('waiting', 'claimed')
          AND j.priority = l.priority AND j.due_at <= now() AND j.attempts < j.max_attempts
        ORDER BY j.due_at, j.id
        LIMIT $5
        FOR UPDATE SKIP LOCKED
    ) p
    LIMIT $5
), claimed AS (
    UPDATE {jobs} AS j SET
        state = 'claimed',
        attempts = j.attempts + 1,
        token = j.token + 1,
        ready_at = j.due_at,
        claimed_at = now(),
        lease_expires_at = now() + $4::bigint * interval '1 millisecond',
        due_at = now() + $4::bigint * interval '1 millisecond',
        consumer = $3
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING j.id, j.payload, j.priority, j.attempts, j.max_attempts, j.enqueued_at,
              j.ready_at, j.claimed_at, j.lease_expires_at, j.consumer, j.token, j.last_error
), expired AS MATERIALIZED (
    SELECT id FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'claimed' AND attempts >= max_attempts
      AND due_at <= now()
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), buried AS (
    UPDATE {jobs} AS j SET state = 'dead', finished_at = j.due_at
    WHERE j.id = ANY(ARRAY(SELECT id FROM expired))
)
SELECT id, payload, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
       lease_expires_at, consumer, token, last_error, NULL::bigint
FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       ceil(extract(epoch FROM min(n.due_at) - now()) * 1000)::bigint
FROM levels l CROSS JOIN LATERAL (
    SELECT j.due_at FROM {jobs} j
    WHERE j.namespace = $1 AND j.queue = $2 AND j.state IN ('waiting', 'claimed')
      AND j.priority = l.priority AND j.due_at > now()
    ORDER BY j.due_at
    LIMIT 1
) n
WHERE (SELECT count(*) FROM claimed) < $5

-- name: extend
-- $3 id, $4 token, $5 lease in ms. The claim holds: its lease ends $5 ms from now().
UPDATE {jobs} SET
    lease_expires_at = now() + $5::bigint * interval '1 millisecond',
    due_at = now() + $5::bigint * interval '1 millisecond'
WHERE id = $3 AND namespace = $1 AND queue = $2 AND state = 'claimed' AND token = $4
  AND (due_at > now() OR attempts < max_attempts)
RETURNING id, payload, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
          lease_expires_at, consumer, token, last_error

-- name: ack
-- $3 id, $4 token, $5 result (jsonb), $6 result TTL in ms, $7 the channel, $8 the job id in hex.
-- The claim holds: done, its result held until due_at; a NOTIFY only if a result(wait=) marked
-- the job (await_result), so an ack nobody waits for does not take the lock PostgreSQL holds
-- while it commits a notifying transaction. Up to two results of the queue that expired are
-- deleted on the way (SKIP LOCKED: concurrent acks never wait for one another), so results do
-- not pile up while the queue is used.
WITH finished AS (
    UPDATE {jobs} SET
        state = 'done',
        result = $5,
        finished_at = now(),
        due_at = now() + $6::bigint * interval '1 millisecond'
    WHERE id = $3 AND namespace = $1 AND queue = $2 AND state = 'claimed' AND token = $4
      AND (due_at > now() OR attempts < max_attempts)
    RETURNING awaited
), expired AS MATERIALIZED (
    SELECT id FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'done' AND due_at <= now()
    ORDER BY due_at
    LIMIT 2
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM {jobs} WHERE id = ANY(ARRAY(SELECT id FROM expired))
)
SELECT awaited, CASE WHEN awaited THEN pg_notify($7, '!' || $1 || ':' || $8) END
FROM finished

-- name: nack
-- $3 id, $4 token, $5 retry delay in ms, $6 error (NULL clears last_error), $7 the channel, $8
-- the job id in hex. The claim holds: waiting again $5 ms from now(), or dead now when its
-- attempts reached max_attempts (then a NOTIFY if a result(wait=) marked it). Returns whether
-- it died.
WITH failed AS (
    UPDATE {jobs} SET
        last_error = $6,
        state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'waiting' END,
        finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
        ready_at = CASE WHEN attempts >= max_attempts THEN ready_at
                        ELSE now() + $5::bigint * interval '1 millisecond' END,
        due_at = CASE WHEN attempts >= max_attempts THEN now()
                      ELSE now() + $5::bigint * interval '1 millisecond' END
    WHERE id = $3 AND namespace = $1 AND queue = $2 AND state = 'claimed' AND token = $4
      AND (due_at > now() OR attempts < max_attempts)
    RETURNING state = 'dead' AS died, awaited
)
SELECT died, CASE WHEN died AND awaited THEN pg_notify($7, '!' || $1 || ':' || $8) END
FROM failed

-- name: cancel
-- $3 id. Only a job that is ready or delayed right now: waiting, or claimed with its lease run
-- out and attempts left. A claim in flight holds the row: the DELETE waits for it and then sees
-- a live lease.
DELETE FROM {jobs}
WHERE id = $3 AND namespace = $1 AND queue = $2
  AND (state = 'waiting'
       OR (state = 'claimed' AND due_at <= now() AND attempts < max_attempts))
RETURNING id

-- name: result
-- $3 id. Done while its result is held; dead, or claimed with its lease run out on its last
-- attempt (dead since its lease's expiry, due_at). Otherwise no row.
SELECT state = 'done', CASE WHEN state = 'done' THEN result END,
       CASE WHEN state = 'done' THEN NULL ELSE last_error END, attempts,
       CASE WHEN state = 'claimed' THEN due_at ELSE finished_at END
FROM {jobs}
WHERE id = $3 AND namespace = $1 AND queue = $2
  AND ((state = 'done' AND due_at > now())
       OR state = 'dead'
       OR (state = 'claimed' AND due_at <= now() AND attempts >= max_attempts))

-- name: await_result
-- $3 id. Mark a waiting or claimed job so that its ack or its death is NOTIFYed.
UPDATE {jobs} SET awaited = true
WHERE id = $3 AND namespace = $1 AND queue = $2 AND state IN ('waiting', 'claimed')
  AND NOT awaited

-- name: stats
-- Ready, delayed, claimed, dead, done right now: the queue's range of the claim index, of the
-- dead index and of the done index from now() on.
SELECT
    count(*) FILTER (WHERE due_at <= now() AND attempts < max_attempts),
    count(*) FILTER (WHERE state = 'waiting' AND due_at > now()),
    count(*) FILTER (WHERE state = 'claimed' AND due_at > now()),
    count(*) FILTER (WHERE state = 'claimed' AND due_at <= now() AND attempts >= max_attempts)
        + (SELECT count(*) FROM {jobs}
           WHERE namespace = $1 AND queue = $2 AND state = 'dead'),
    (SELECT count(*) FROM {jobs}
     WHERE namespace = $1 AND queue = $2 AND state = 'done' AND due_at > now())
FROM {jobs}
WHERE namespace = $1 AND queue = $2 AND state IN ('waiting', 'claimed')

-- name: dead
-- $3 exclusive lower bound of the id (0: from the start), $4 the limit. The dead letter and the
-- claims whose lease ran out on their last attempt, ascending by id; finished_at is not a Job
-- field, so both come back alike.
SELECT id, payload, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
       lease_expires_at, consumer, token, last_error
FROM (
    (SELECT * FROM {jobs}
     WHERE namespace = $1 AND queue = $2 AND state = 'dead' AND id > $3
     ORDER BY id
     LIMIT $4)
    UNION ALL
    (SELECT * FROM {jobs}
     WHERE namespace = $1 AND queue = $2 AND state = 'claimed' AND attempts >= max_attempts
       AND due_at <= now() AND id > $3
     ORDER BY id
     LIMIT $4)
) d
ORDER BY id
LIMIT $4

-- name: bury
-- Every claim of the queue whose lease ran out on its last attempt goes to 'dead' (finished at
-- its lease's expiry). retry_dead runs it first, so that it sees every dead job in one state.
UPDATE {jobs} SET state = 'dead', finished_at = due_at
WHERE namespace = $1 AND queue = $2 AND state = 'claimed' AND attempts >= max_attempts
  AND due_at <= now()

-- name: retry_dead_all
-- $3 the channel. Every dead job back to waiting, ready now, attempts 0 -- except one whose
-- dedupe key a waiting or claimed job holds, and of several dead jobs with one key all but the
-- lowest id (one live job per key). A put of the same key racing it may still take the key
-- first: the unique index refuses this statement then (23505) and the caller runs it again.
WITH candidates AS (
    SELECT id, dedupe_key FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'dead'
), chosen AS (
    SELECT id FROM candidates WHERE dedupe_key IS NULL
    UNION ALL
    SELECT min(c.id) FROM candidates c
    WHERE c.dedupe_key IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM {jobs} h
          WHERE h.namespace = $1 AND h.queue = $2 AND h.dedupe_key = c.dedupe_key
            AND h.state IN ('waiting', 'claimed'))
    GROUP BY c.dedupe_key
), moved AS (
    UPDATE {jobs} SET
        state = 'waiting', attempts = 0, ready_at = now(), due_at = now(), finished_at = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM chosen)) AND state = 'dead'
    RETURNING id
)
SELECT count(*),
       CASE WHEN count(*) > 0 THEN pg_notify($3, '>' || count(*) || ':' || $1 || ':' || $2) END
FROM moved

-- name: retry_dead_ids
-- retry_dead_all for the dead jobs among the ids $4 (bigint[]).
WITH candidates AS (
    SELECT id, dedupe_key FROM {jobs}
    WHERE id = ANY($4::bigint[]) AND namespace = $1 AND queue = $2 AND state = 'dead'
), chosen AS (
    SELECT id FROM candidates WHERE dedupe_key IS NULL
    UNION ALL
    SELECT min(c.id) FROM candidates c
    WHERE c.dedupe_key IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM {jobs} h
          WHERE h.namespace = $1 AND h.queue = $2 AND h.dedupe_key = c.dedupe_key
            AND h.state IN ('waiting', 'claimed'))
    GROUP BY c.dedupe_key
), moved AS (
    UPDATE {jobs} SET
        state = 'waiting', attempts = 0, ready_at = now(), due_at = now(), finished_at = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM chosen)) AND state = 'dead'
    RETURNING id
)
SELECT count(*),
       CASE WHEN count(*) > 0 THEN pg_notify($3, '>' || count(*) || ':' || $1 || ':' || $2) END
FROM moved

-- name: purge_dead
-- Delete the dead letter and the claims whose lease ran out on their last attempt.
WITH dead AS (
    DELETE FROM {jobs} WHERE namespace = $1 AND queue = $2 AND state = 'dead'
    RETURNING 1
), expired AS (
    DELETE FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'claimed' AND attempts >= max_attempts
      AND due_at <= now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM dead) + (SELECT count(*) FROM expired)

-- name: list_queues
-- The namespace's queues holding a waiting or claimed job, a dead one, or a result still held:
-- a loose index scan (one descent per queue) of the claim, dead and done indexes each, the
-- last checking per queue that a result is held (one descent in the done index from now()).
WITH RECURSIVE live (queue) AS (
    (SELECT queue FROM {jobs}
     WHERE namespace = $1 AND state IN ('waiting', 'claimed')
     ORDER BY queue
     LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {jobs} j
            WHERE j.namespace = $1 AND j.state IN ('waiting', 'claimed') AND j.queue > l.queue
            ORDER BY j.queue
            LIMIT 1)
    FROM live l
    WHERE l.queue IS NOT NULL
), dead (queue) AS (
    (SELECT queue FROM {jobs}
     WHERE namespace = $1 AND state = 'dead'
     ORDER BY queue
     LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {jobs} j
            WHERE j.namespace = $1 AND j.state = 'dead' AND j.queue > d.queue
            ORDER BY j.queue
            LIMIT 1)
    FROM dead d
    WHERE d.queue IS NOT NULL
), done (queue) AS (
    (SELECT queue FROM {jobs}
     WHERE namespace = $1 AND state = 'done'
     ORDER BY queue
     LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM {jobs} j
            WHERE j.namespace = $1 AND j.state = 'done' AND j.queue > d.queue
            ORDER BY j.queue
            LIMIT 1)
    FROM done d
    WHERE d.queue IS NOT NULL
)
SELECT queue FROM live WHERE queue IS NOT NULL
UNION
SELECT queue FROM dead WHERE queue IS NOT NULL
UNION
SELECT d.queue FROM done d
WHERE d.queue IS NOT NULL
  AND EXISTS (
      SELECT 1 FROM {jobs} j
      WHERE j.namespace = $1 AND j.queue = d.queue AND j.state = 'done' AND j.due_at > now())
ORDER BY 1
