-- SQL of SQLiteStore's work queues, as named blocks loaded once by fleetmem.backends.sqlite.
--
-- Times are integer milliseconds since the Unix epoch on the wall clock of the process running
-- the statement (the clock of the entries and the leases). One row per job, in every state:
--
--   state    due_at                     in the claim index
--   waiting  ready_at                   yes  (ready when due_at <= now, else delayed)
--   claimed  lease_expires_at           yes  (live while due_at > now; then ready again, or dead
--                                             when attempts >= max_attempts)
--   done     when its result expires    no   (the row may be deleted once due_at <= now)
--   dead     NULL                       no
--
-- A claimed job whose lease expired is claimable in the same index order as a waiting one: its
-- due_at (the lease's expiry) is its effective ready_at. A claimed job whose lease expired on
-- its last attempt is dead from that moment; the statements below that read or count jobs treat
-- it as dead, and every write that could meet it (a claim of its queue, a put of its dedupe
-- key, retry_dead, purge_dead) first moves it to 'dead' with finished_at = its lease's expiry
-- (job_bury_expired, job_bury).

-- name: create_jobs
CREATE TABLE IF NOT EXISTS fleetmem_jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after a delete
    namespace        TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    state            TEXT    NOT NULL,  -- waiting | claimed | done | dead
    due_at           INTEGER,           -- see the table above
    priority         INTEGER NOT NULL,  -- higher is claimed first
    max_attempts     INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,  -- claims so far (0 again after retry_dead)
    token            INTEGER NOT NULL,  -- claims ever (never reset): the claim's fence
    dedupe_key       TEXT,
    enqueued_at      INTEGER NOT NULL,
    ready_at         INTEGER NOT NULL,
    claimed_at       INTEGER,           -- the latest claim's, NULL before the first
    lease_expires_at INTEGER,
    consumer         TEXT,
    last_error       TEXT,              -- the error of the latest nack
    finished_at      INTEGER,           -- done: when acked; dead: when it died
    payload          BLOB    NOT NULL,  -- compact UTF-8 JSON (last: large values stay out of
    result           BLOB               -- the way of the columns above)
);

-- name: create_jobs_claim_index
-- The claim order, waiting and claimed jobs only (done and dead ones are never scanned).
CREATE INDEX IF NOT EXISTS fleetmem_jobs_claim
    ON fleetmem_jobs (namespace, queue, priority DESC, due_at, id)
    WHERE state IN ('waiting', 'claimed');

-- name: create_jobs_state_index
-- Every job by state and due_at: the next job coming due (one seek per state), counts, expired
-- claims, expired results, dead jobs in id order (due_at is NULL for all of them), and the
-- distinct queues of a namespace.
CREATE INDEX IF NOT EXISTS fleetmem_jobs_state
    ON fleetmem_jobs (namespace, queue, state, due_at);

-- name: create_jobs_dedupe_index
-- One live (waiting or claimed) job per dedupe key and queue; done and dead jobs free it.
CREATE UNIQUE INDEX IF NOT EXISTS fleetmem_jobs_dedupe
    ON fleetmem_jobs (namespace, queue, dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('waiting', 'claimed');

-- name: job_insert
-- ?1 namespace, ?2 queue, ?3 priority, ?4 max_attempts, ?5 dedupe_key, ?6 now, ?7 ready_at,
-- ?8 payload
INSERT INTO fleetmem_jobs
    (namespace, queue, state, due_at, priority, max_attempts, attempts, token, dedupe_key,
     enqueued_at, ready_at, payload)
VALUES (?1, ?2, 'waiting', ?7, ?3, ?4, 0, 0, ?5, ?6, ?7, ?8);

-- name: last_insert_rowid
SELECT last_insert_rowid();

-- name: job_dedupe_holder
-- ?1 namespace, ?2 queue, ?3 dedupe_key, ?4 now; the live job holding the key, and whether it
-- is in fact dead (its lease expired on its last attempt)
SELECT id, state = 'claimed' AND due_at <= ?4 AND attempts >= max_attempts FROM fleetmem_jobs
WHERE namespace = ?1 AND queue = ?2 AND dedupe_key = ?3 AND state IN ('waiting', 'claimed');

-- name: job_bury_expired
-- ?1 namespace, ?2 queue, ?3 now. Claims whose lease expired on their last attempt go to the
-- dead letter, dead since their lease's expiry; their ids (result waiters to wake).
UPDATE fleetmem_jobs SET state = 'dead', finished_at = lease_expires_at, due_at = NULL
WHERE namespace = ?1 AND queue = ?2 AND state = 'claimed' AND due_at <= ?3
  AND attempts >= max_attempts
RETURNING id;

-- name: job_bury
-- ?1 id; a claim whose lease expired on its last attempt (checked by the caller)
UPDATE fleetmem_jobs SET state = 'dead', finished_at = lease_expires_at, due_at = NULL
WHERE id = ?1 AND state = 'claimed';

-- name: job_next_due
-- ?1 namespace, ?2 queue: the earliest due_at of a waiting job and of a claimed one (one seek
-- each). A claim reads it first, without the write lock: nothing is claimable while both are
-- NULL or later than now.
SELECT
    (SELECT min(due_at) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'waiting'),
    (SELECT min(due_at) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'claimed');

-- name: job_claimable
-- ?1 namespace, ?2 queue, ?3 now, ?4 limit: the next jobs in claim order (after
-- job_bury_expired, none of them is dead)
SELECT id FROM fleetmem_jobs
WHERE namespace = ?1 AND queue = ?2 AND state IN ('waiting', 'claimed') AND due_at <= ?3
ORDER BY priority DESC, due_at, id
LIMIT ?4;

-- name: job_claim
-- ?1 JSON array of ids (from job_claimable, same transaction), ?2 now, ?3 lease_ms,
-- ?4 consumer. SET reads the old row: ready_at becomes the effective one (an expired claim's
-- lease expiry).
UPDATE fleetmem_jobs SET
    state = 'claimed',
    ready_at = due_at,
    attempts = attempts + 1,
    token = token + 1,
    claimed_at = ?2,
    lease_expires_at = ?2 + ?3,
    due_at = ?2 + ?3,
    consumer = ?4
WHERE id IN (SELECT value FROM json_each(?1))
RETURNING id, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
    lease_expires_at, consumer, token, last_error, payload;

-- name: job_extend
-- ?1 namespace, ?2 queue, ?3 id, ?4 token, ?5 now, ?6 lease_ms. The claim holds while the job
-- is claimed with that token and not dead (an expired lease with attempts left is fine). SET
-- reads the old row: a claim extended after its lease expired reports (and keeps) ready_at =
-- that expiry, when the job became ready again, as a claim of it then would have.
UPDATE fleetmem_jobs SET
    ready_at = CASE WHEN due_at <= ?5 THEN due_at ELSE ready_at END,
    lease_expires_at = ?5 + ?6,
    due_at = ?5 + ?6
WHERE id = ?3 AND namespace = ?1 AND queue = ?2 AND state = 'claimed' AND token = ?4
  AND (due_at > ?5 OR attempts < max_attempts)
RETURNING id, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
    lease_expires_at, consumer, token, last_error, payload;

-- name: job_ack
-- ?1 namespace, ?2 queue, ?3 id, ?4 token, ?5 now, ?6 result, ?7 result_ttl_ms
UPDATE fleetmem_jobs SET
    state = 'done', result = ?6, finished_at = ?5, due_at = ?5 + ?7
WHERE id = ?3 AND namespace = ?1 AND queue = ?2 AND state = 'claimed' AND token = ?4
  AND (due_at > ?5 OR attempts < max_attempts);

-- name: job_nack
-- ?1 namespace, ?2 queue, ?3 id, ?4 token, ?5 now, ?6 retry_in_ms, ?7 error. Dead when the
-- attempts are used up, else waiting again; returns the new state.
UPDATE fleetmem_jobs SET
    last_error = ?7,
    state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'waiting' END,
    finished_at = CASE WHEN attempts >= max_attempts THEN ?5 END,
    ready_at = CASE WHEN attempts >= max_attempts THEN ready_at ELSE ?5 + ?6 END,
    due_at = CASE WHEN attempts >= max_attempts THEN NULL ELSE ?5 + ?6 END
WHERE id = ?3 AND namespace = ?1 AND queue = ?2 AND state = 'claimed' AND token = ?4
  AND (due_at > ?5 OR attempts < max_attempts)
RETURNING state;

-- name: job_sweep_results
-- ?1 namespace, ?2 queue, ?3 now: delete (a batch of) done jobs whose result expired; run by an
-- ack and by a claim that takes the write lock, in their transaction
DELETE FROM fleetmem_jobs WHERE id IN (
    SELECT id FROM fleetmem_jobs
    WHERE namespace = ?1 AND queue = ?2 AND state = 'done' AND due_at <= ?3
    LIMIT 256
);

-- name: job_sweep_namespace_results
-- ?1 namespace, ?2 now: delete every done job of the namespace whose result expired, in every
-- queue (the store's cleanup_expired). A loose index scan of the state index over the
-- namespace's queues (one seek per queue), then one range of it per queue: never a pass over
-- the namespace's other jobs. (The statement starts with DELETE, so sqlite3 reports rowcount.)
DELETE FROM fleetmem_jobs WHERE id IN (
    WITH RECURSIVE q(name) AS (
        SELECT (SELECT min(queue) FROM fleetmem_jobs WHERE namespace = ?1)
        UNION ALL
        SELECT (SELECT min(queue) FROM fleetmem_jobs WHERE namespace = ?1 AND queue > q.name)
        FROM q WHERE q.name IS NOT NULL
    )
    SELECT j.id FROM q JOIN fleetmem_jobs j
    ON j.namespace = ?1 AND j.queue = q.name AND j.state = 'done' AND j.due_at <= ?2
);

-- name: job_cancel
-- ?1 namespace, ?2 queue, ?3 id, ?4 now: only a job that is ready or delayed right now
-- (waiting, or claimed under an expired lease with attempts left)
DELETE FROM fleetmem_jobs
WHERE id = ?3 AND namespace = ?1 AND queue = ?2
  AND (state = 'waiting'
       OR (state = 'claimed' AND due_at <= ?4 AND attempts < max_attempts));

-- name: job_result
-- ?1 namespace, ?2 queue, ?3 id
SELECT state, due_at, attempts, max_attempts, lease_expires_at, finished_at, last_error, result
FROM fleetmem_jobs
WHERE id = ?3 AND namespace = ?1 AND queue = ?2;

-- name: job_stats
-- ?1 namespace, ?2 queue, ?3 now: ready, delayed, claimed, dead, done (effective states)
SELECT
    (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'waiting' AND due_at <= ?3)
  + (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'claimed' AND due_at <= ?3
       AND attempts < max_attempts),
    (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'waiting' AND due_at > ?3),
    (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'claimed' AND due_at > ?3),
    (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'dead')
  + (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'claimed' AND due_at <= ?3
       AND attempts >= max_attempts),
    (SELECT count(*) FROM fleetmem_jobs
     WHERE namespace = ?1 AND queue = ?2 AND state = 'done' AND due_at > ?3);

-- name: job_dead_page
-- ?1 namespace, ?2 queue, ?3 exclusive lower id, ?4 limit: dead-lettered jobs by id
SELECT id, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
    lease_expires_at, consumer, token, last_error, payload
FROM fleetmem_jobs
WHERE namespace = ?1 AND queue = ?2 AND state = 'dead' AND due_at IS NULL AND id > ?3
ORDER BY id
LIMIT ?4;

-- name: job_expired_dead_page
-- ?1 namespace, ?2 queue, ?3 exclusive lower id, ?4 limit, ?5 now: claims that died with their
-- lease, not yet moved (few: the next claim moves them)
SELECT id, priority, attempts, max_attempts, enqueued_at, ready_at, claimed_at,
    lease_expires_at, consumer, token, last_error, payload
FROM fleetmem_jobs
WHERE namespace = ?1 AND queue = ?2 AND state = 'claimed' AND due_at <= ?5
  AND attempts >= max_attempts AND id > ?3
ORDER BY id
LIMIT ?4;

-- name: job_dead_all
-- ?1 namespace, ?2 queue: every dead-lettered job (after job_bury_expired) and its dedupe key,
-- in id order
SELECT id, dedupe_key FROM fleetmem_jobs
WHERE namespace = ?1 AND queue = ?2 AND state = 'dead' AND due_at IS NULL
ORDER BY id;

-- name: job_dead_of
-- ?1 namespace, ?2 queue, ?3 JSON array of ids: those that are dead-lettered jobs of the queue
-- (after job_bury_expired) and their dedupe keys, in id order
SELECT id, dedupe_key FROM fleetmem_jobs
WHERE id IN (SELECT value FROM json_each(?3)) AND namespace = ?1 AND queue = ?2
  AND state = 'dead'
ORDER BY id;

-- name: job_dedupe_held
-- ?1 namespace, ?2 queue, ?3 dedupe_key: a live job holds it (after job_bury_expired)
SELECT 1 FROM fleetmem_jobs
WHERE namespace = ?1 AND queue = ?2 AND dedupe_key = ?3 AND state IN ('waiting', 'claimed');

-- name: job_retry
-- ?1 JSON array of ids (dead, checked in the same transaction), ?2 now
UPDATE fleetmem_jobs SET
    state = 'waiting', attempts = 0, finished_at = NULL, ready_at = ?2, due_at = ?2
WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'dead';

-- name: job_purge_dead
-- ?1 namespace, ?2 queue (after job_bury_expired)
DELETE FROM fleetmem_jobs WHERE namespace = ?1 AND queue = ?2 AND state = 'dead';

-- name: job_queues
-- ?1 namespace, ?2 now. A loose index scan of the state index: each step is one seek to the
-- next queue name; a queue is listed if it holds a job that is not done, or a held result.
WITH RECURSIVE q(name) AS (
    SELECT (SELECT min(queue) FROM fleetmem_jobs WHERE namespace = ?1)
    UNION ALL
    SELECT (SELECT min(queue) FROM fleetmem_jobs WHERE namespace = ?1 AND queue > q.name)
    FROM q WHERE q.name IS NOT NULL
)
SELECT name FROM q
WHERE name IS NOT NULL
  AND (EXISTS (SELECT 1 FROM fleetmem_jobs j
               WHERE j.namespace = ?1 AND j.queue = q.name
                 AND j.state IN ('waiting', 'claimed', 'dead'))
       OR EXISTS (SELECT 1 FROM fleetmem_jobs j
                  WHERE j.namespace = ?1 AND j.queue = q.name AND j.state = 'done'
                    AND j.due_at > ?2));
