-- Work queues, one named block each ("-- name: NAME").
-- {jobs} is the validated, double-quoted job table of migration 0004, {jobs_awaited} its table
-- of the jobs a result(wait=) waits for (a row per job, deleted with the job by its foreign
-- key). $1 is always the namespace, $2 the queue. Every statement runs alone, so now() is its
-- start: the one clock of every decision. A job's row says where it is through state and
-- due_at:
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
-- PostgreSQL delivers identical payloads of one transaction once: a transaction sends at most
-- one notification per queue and job (a put of several statements, one at its end).

-- name: put
-- $3 payloads (jsonb[]), $4 priorities (int[]), $5 delays in ms (bigint[]), $6 max_attempts
-- (int[]), one element per job; $7 the NOTIFY channel, or NULL when the caller notifies once
-- for several statements of its transaction (notify_put). One INSERT for the whole call, ids
-- taken in the order of the arrays; one notification for all of them, sent at commit.
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
SELECT array_agg(id ORDER BY id),
       CASE WHEN $7::text IS NOT NULL
            THEN pg_notify($7, '>' || count(*) || ':' || $1 || ':' || $2) END
FROM inserted

-- name: notify_put
-- $3 the channel, $4 how many jobs the transaction added: the one notification of a put that
-- ran several statements (sent at its commit).
SELECT pg_notify($3, '>' || $4::bigint || ':' || $1 || ':' || $2)

-- name: put_dedupe
-- put with dedupe keys ($7 text[], NULL elements for jobs without one; $8 the channel, or NULL
-- as in put). A key held by a waiting or claimed job enqueues nothing (ON CONFLICT on the
-- unique index of live keys). A holder whose lease ran out on its last attempt is dead, so it
-- first moves to 'dead' (`buried`), which frees its key; `inserted` reads `buried` so that it
-- runs after it. Rows: (id, key, true) per job inserted, (id, key, false) per live holder this
-- statement's snapshot saw, (NULL, NULL, NULL) when a notification was sent. A key that
-- neither names (a job put by a concurrent transaction that committed after the snapshot) is
-- the caller's to look up again.
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
    HAVING count(*) > 0 AND $8::text IS NOT NULL
)
SELECT id, dedupe_key, true FROM inserted
UNION ALL
SELECT id, dedupe_key, false FROM {jobs}
WHERE namespace = $1 AND queue = $2 AND dedupe_key = ANY($7::text[])
  AND state IN ('waiting', 'claimed') AND (due_at > now() OR attempts < max_attempts)
UNION ALL
SELECT NULL, NULL, NULL FROM notified

-- name: claim
-- $3 consumer, $4 lease in ms; {limit}, how many, is $5, or the constant 1 in `claim_one` (the
-- same statement without $5; queue_statements builds both). With the constant PostgreSQL keeps
-- one generic plan for the prepared statement; with a parameter LIMIT it costs the generic plan
-- at 10% of the queue, finds it dearer than a custom one and plans anew at every call (several
-- times the cost of running the statement). One statement:
-- * `levels`: the distinct priorities of the queue's waiting and claimed jobs, highest first,
--   one index descent each (a loose index scan), produced only as far as `picked` reads them;
-- * `picked`: per priority, the ready jobs in (due_at, id) order -- a range of the claim index
--   ending at now(), so jobs not due yet are never read -- locked FOR NO KEY UPDATE SKIP LOCKED
--   (a row another claimer holds is passed over, never waited for; the KEY SHARE lock that
--   await_result's foreign key takes does not stop it), at most the limit in all: the outer LIMIT
--   stops the nested loop, and MATERIALIZED runs it once, so no more rows are locked than are
--   claimed;
-- * `claimed`: stamps them (attempts + 1, token + 1, ready_at = the due_at they were ready at,
--   lease from now()), found by primary key (`= ANY(ARRAY(...))`: a join could be planned as a
--   hash join over the whole table for a large limit);
-- * `buried`: moves up to 100 claims whose lease ran out on their last attempt to 'dead' (the
--   small last-attempt index; disjoint from `picked`, which needs attempts < max_attempts).
-- The claimed jobs come back (in no particular order), then one row with a NULL id and, when
-- fewer than the limit were claimed, the milliseconds until the next waiting or claimed job of the
-- queue comes due (NULL: none; one descent per priority, skipped by a one-time filter when the
-- limit was reached).
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
        LIMIT {limit}
        FOR NO KEY UPDATE SKIP LOCKED
    ) p
    LIMIT {limit}
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
    FOR NO KEY UPDATE SKIP LOCKED
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
WHERE (SELECT count(*) FROM claimed) < {limit}

-- name: extend
-- $3 id, $4 token, $5 lease in ms. The claim holds: its lease ends $5 ms from now(). A claim
-- whose lease had run out (nobody claimed the job since) is live again, and the job's ready_at
-- is when it became ready again, its old lease's expiry (the due_at the SET reads), as a claim
-- would have reported.
UPDATE {jobs} SET
    ready_at = CASE WHEN due_at <= now() THEN due_at ELSE ready_at END,
    lease_expires_at = now() + $5::bigint * interval '1 millisecond',
    due_at = now() + $5::bigint * interval '1 millisecond'
WHERE id = $3 AND namespace = $1 AND queue = $2 AND state = 'claimed' AND token = $4
  AND (due_at > now() OR attempts < max_attempts)
RETURNING id, payload, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
          lease_expires_at, consumer, token, last_error

-- name: ack
-- $3 id, $4 token, $5 result (jsonb), $6 result TTL in ms, $7 the channel, $8 the job id in hex.
-- The claim holds: done, its result held until due_at; a NOTIFY only if a result(wait=) marked
-- the job (a row of {jobs_awaited}, deleted here), so an ack nobody waits for does not take the
-- lock PostgreSQL holds while it commits a notifying transaction. Up to two results of the
-- queue that expired are deleted on the way (SKIP LOCKED: concurrent acks never wait for one
-- another), so results do not pile up while the queue is used.
WITH finished AS (
    UPDATE {jobs} SET
        state = 'done',
        result = $5,
        finished_at = now(),
        due_at = now() + $6::bigint * interval '1 millisecond'
    WHERE id = $3 AND namespace = $1 AND queue = $2 AND state = 'claimed' AND token = $4
      AND (due_at > now() OR attempts < max_attempts)
    RETURNING id
), unmarked AS (
    DELETE FROM {jobs_awaited} WHERE id = $3 AND EXISTS (SELECT 1 FROM finished)
    RETURNING id
), expired AS MATERIALIZED (
    SELECT id FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'done' AND due_at <= now()
    ORDER BY due_at
    LIMIT 2
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM {jobs} WHERE id = ANY(ARRAY(SELECT id FROM expired))
)
SELECT CASE WHEN EXISTS (SELECT 1 FROM unmarked)
            THEN pg_notify($7, '!' || $1 || ':' || $8) END
FROM finished

-- name: nack
-- $3 id, $4 token, $5 retry delay in ms, $6 error (NULL clears last_error), $7 the channel, $8
-- the job id in hex. The claim holds: waiting again $5 ms from now(), or dead now when its
-- attempts reached max_attempts (then a NOTIFY if a result(wait=) marked it, and the mark
-- goes). Returns whether it died.
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
    RETURNING id, state = 'dead' AS died
), unmarked AS (
    DELETE FROM {jobs_awaited} WHERE id = $3 AND EXISTS (SELECT 1 FROM failed WHERE died)
    RETURNING id
)
SELECT died, CASE WHEN EXISTS (SELECT 1 FROM unmarked)
                  THEN pg_notify($7, '!' || $1 || ':' || $8) END
FROM failed

-- name: cancel
-- $3 id. Only a job that is ready or delayed right now: waiting, or claimed with its lease run
-- out and attempts left. A claim in flight holds the row: the DELETE waits for it and then sees
-- a live lease. Its mark in {jobs_awaited}, if any, goes with it (the foreign key).
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
-- $3 id. Mark a live job (waiting, or claimed and not dead) so that its ack or its death by
-- nack is NOTIFYed. The job's row is read, not written: its only lock is the foreign key's
-- KEY SHARE, which claims (FOR NO KEY UPDATE SKIP LOCKED), acks and nacks do not conflict with.
-- A mark inserted while the job is being acked may come too late for that ack's statement to
-- see it: the waiter then learns of the ack at its next poll, and the mark stays until the
-- job's row is deleted (its result expired).
INSERT INTO {jobs_awaited} (id)
SELECT id FROM {jobs}
WHERE id = $3 AND namespace = $1 AND queue = $2 AND state IN ('waiting', 'claimed')
  AND (due_at > now() OR attempts < max_attempts)
ON CONFLICT (id) DO NOTHING

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

-- name: retry_dead_all
-- $3 the channel. Every dead job back to waiting, ready now, attempts 0 -- except one whose
-- dedupe key a live job holds (waiting, or claimed and not dead), and of several dead jobs with
-- one key all but the lowest id (one live job per key). "Dead" includes the claims whose lease
-- ran out on their last attempt (their row still says 'claimed'), judged at this statement's
-- now() like everything else in it. Such a claim holds its key in the unique index of live
-- keys: when another dead job of its key is chosen, `buried` moves it to 'dead' first (`moved`
-- reads `buried`, so it runs after it), so that the index has let go of the key by the time
-- `moved` gives it to the chosen one. A put of the same key racing this statement may still
-- take the key first: the unique index refuses the statement then (23505) and the caller runs
-- it again.
WITH candidates AS (
    SELECT id, dedupe_key FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'dead'
    UNION ALL
    SELECT id, dedupe_key FROM {jobs}
    WHERE namespace = $1 AND queue = $2 AND state = 'claimed' AND attempts >= max_attempts
      AND due_at <= now()
), chosen AS MATERIALIZED (
    SELECT id, dedupe_key FROM candidates WHERE dedupe_key IS NULL
    UNION ALL
    SELECT min(c.id), c.dedupe_key FROM candidates c
    WHERE c.dedupe_key IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM {jobs} h
          WHERE h.namespace = $1 AND h.queue = $2 AND h.dedupe_key = c.dedupe_key
            AND h.state IN ('waiting', 'claimed')
            AND (h.due_at > now() OR h.attempts < h.max_attempts))
    GROUP BY c.dedupe_key
), buried AS (
    UPDATE {jobs} SET state = 'dead', finished_at = due_at
    WHERE namespace = $1 AND queue = $2
      AND dedupe_key = ANY(ARRAY(SELECT dedupe_key FROM chosen WHERE dedupe_key IS NOT NULL))
      AND id <> ALL(ARRAY(SELECT id FROM chosen))
      AND state = 'claimed' AND attempts >= max_attempts AND due_at <= now()
    RETURNING id
), moved AS (
    UPDATE {jobs} SET
        state = 'waiting', attempts = 0, ready_at = now(), due_at = now(), finished_at = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM chosen))
      AND (state = 'dead'
           OR (state = 'claimed' AND attempts >= max_attempts AND due_at <= now()))
      AND (SELECT count(*) FROM buried) >= 0
    RETURNING id
)
SELECT count(*),
       CASE WHEN count(*) > 0 THEN pg_notify($3, '>' || count(*) || ':' || $1 || ':' || $2) END
FROM moved

-- name: retry_dead_ids
-- retry_dead_all for the dead jobs among the ids $4 (bigint[]); `buried` may move a claim dead
-- of an expired lease outside $4 (it holds the key of one chosen): it is dead either way.
WITH candidates AS (
    SELECT id, dedupe_key FROM {jobs}
    WHERE id = ANY($4::bigint[]) AND namespace = $1 AND queue = $2
      AND (state = 'dead'
           OR (state = 'claimed' AND attempts >= max_attempts AND due_at <= now()))
), chosen AS MATERIALIZED (
    SELECT id, dedupe_key FROM candidates WHERE dedupe_key IS NULL
    UNION ALL
    SELECT min(c.id), c.dedupe_key FROM candidates c
    WHERE c.dedupe_key IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM {jobs} h
          WHERE h.namespace = $1 AND h.queue = $2 AND h.dedupe_key = c.dedupe_key
            AND h.state IN ('waiting', 'claimed')
            AND (h.due_at > now() OR h.attempts < h.max_attempts))
    GROUP BY c.dedupe_key
), buried AS (
    UPDATE {jobs} SET state = 'dead', finished_at = due_at
    WHERE namespace = $1 AND queue = $2
      AND dedupe_key = ANY(ARRAY(SELECT dedupe_key FROM chosen WHERE dedupe_key IS NOT NULL))
      AND id <> ALL(ARRAY(SELECT id FROM chosen))
      AND state = 'claimed' AND attempts >= max_attempts AND due_at <= now()
    RETURNING id
), moved AS (
    UPDATE {jobs} SET
        state = 'waiting', attempts = 0, ready_at = now(), due_at = now(), finished_at = NULL
    WHERE id = ANY(ARRAY(SELECT id FROM chosen))
      AND (state = 'dead'
           OR (state = 'claimed' AND attempts >= max_attempts AND due_at <= now()))
      AND (SELECT count(*) FROM buried) >= 0
    RETURNING id
)
SELECT count(*),
       CASE WHEN count(*) > 0 THEN pg_notify($3, '>' || count(*) || ':' || $1 || ':' || $2) END
FROM moved

-- name: purge_dead
-- Delete the dead letter and the claims whose lease ran out on their last attempt, in one
-- DELETE with one condition: a row a concurrent claim is moving to 'dead' (read as 'claimed',
-- re-checked as 'dead' once that claim committed) passes it either way. Marks in
-- {jobs_awaited} go with their jobs (the foreign key).
WITH gone AS (
    DELETE FROM {jobs}
    WHERE namespace = $1 AND queue = $2
      AND (state = 'dead'
           OR (state = 'claimed' AND attempts >= max_attempts AND due_at <= now()))
    RETURNING 1
)
SELECT count(*) FROM gone

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
