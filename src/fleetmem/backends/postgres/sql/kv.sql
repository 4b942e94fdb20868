-- fleetmem's PostgreSQL statements, one named block each ("-- name: NAME").
-- {table} is replaced by the validated, double-quoted "schema"."table"; everything else is a
-- parameter. $1 is always the namespace. An entry is live while
-- expires_at IS NULL OR expires_at > now(); each statement runs alone, so now() is its clock.
--
-- The change feed (migration 0005). Every write records its changes in its own statement:
-- * `f` looks up the namespace's feed once per statement (MATERIALIZED, uncorrelated): a
--   namespace without a feed pays one primary-key probe of a small table. With a feed it also
--   takes the namespace's transaction advisory lock in shared mode, which the clear function
--   takes exclusively (see migration 0005: a clear comes after every write it did not see).
-- * `w`, the write, reads `f` first -- `(SELECT count(*) FROM f) < 2`, always true, is a
--   one-time filter checked before it writes anything -- so the lock is taken before any row
--   lock (a clear waiting for it never waits for a row this write holds). The fenced twin
--   (kv.py fenced_statement) changes the first $1 of `w`.
-- * `c` inserts the changes (pos NULL: the reader's sequencer numbers them after commit) from
--   w's RETURNING, only when `f` found a feed (a one-time filter again: no feed, no scan of w).
-- * `f` also NOTIFYs the table's channel ('~' || namespace), sent at commit, but only while a
--   watcher is asleep (watched_until in the future): a NOTIFY serialises commits, so writes do
--   not send one otherwise. (A write that then changes nothing wakes the watchers for
--   nothing; it costs them a read.)

-- name: get
SELECT value FROM {table}
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())

-- name: get_entry
SELECT value, partition, version, created_at, updated_at, expires_at FROM {table}
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())

-- name: get_many
SELECT key, value FROM {table}
WHERE namespace = $1 AND key = ANY($2::text[]) AND (expires_at IS NULL OR expires_at > now())

-- name: get_entries
SELECT key, value, partition, version, created_at, updated_at, expires_at FROM {table}
WHERE namespace = $1 AND key = ANY($2::text[]) AND (expires_at IS NULL OR expires_at > now())

-- name: get_entry_ttl
-- get_entry with the remaining life in whole milliseconds on the server's clock (NULL:
-- persistent), for a cache in front of the store (HybridStore).
SELECT value, partition, version, created_at, updated_at, expires_at,
       CASE WHEN expires_at IS NULL THEN NULL
            ELSE greatest(0, floor(extract(epoch FROM expires_at - now()) * 1000))::bigint END
FROM {table}
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())

-- name: get_entries_ttl
SELECT key, value, partition, version, created_at, updated_at, expires_at,
       CASE WHEN expires_at IS NULL THEN NULL
            ELSE greatest(0, floor(extract(epoch FROM expires_at - now()) * 1000))::bigint END
FROM {table}
WHERE namespace = $1 AND key = ANY($2::text[]) AND (expires_at IS NULL OR expires_at > now())

-- name: exists_many
SELECT key FROM {table}
WHERE namespace = $1 AND key = ANY($2::text[]) AND (expires_at IS NULL OR expires_at > now())

-- name: exists
SELECT 1 FROM {table}
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())

-- name: ttl
SELECT CASE WHEN expires_at IS NULL THEN NULL
            ELSE greatest(0, extract(epoch FROM expires_at - now()))::float8 END
FROM {table}
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())

-- name: keys
-- $2 inclusive lower bound (the prefix), $3 exclusive upper bound, $4 exclusive cursor.
SELECT key FROM {table}
WHERE namespace = $1 AND key >= $2 AND key < $3 AND key > $4
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY key
LIMIT $5

-- name: keys_partition
SELECT key FROM {table}
WHERE namespace = $1 AND partition = $6 AND key >= $2 AND key < $3 AND key > $4
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY key
LIMIT $5

-- name: search
-- $2/$3 the prefix range, $4 a LIKE pattern (escape \), $5 a regex or NULL, $6 the limit.
SELECT key, value FROM {table}
WHERE namespace = $1 AND key >= $2 AND key < $3
  AND key LIKE $4 ESCAPE '\'
  AND ($5::text IS NULL OR key ~ $5)
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY key
LIMIT $6

-- name: search_partition
SELECT key, value FROM {table}
WHERE namespace = $1 AND partition = $7 AND key >= $2 AND key < $3
  AND key LIKE $4 ESCAPE '\'
  AND ($5::text IS NULL OR key ~ $5)
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY key
LIMIT $6

-- name: partitions
SELECT DISTINCT partition FROM {table}
WHERE namespace = $1 AND (expires_at IS NULL OR expires_at > now())
ORDER BY partition

-- name: stats
SELECT partition,
       count(*) FILTER (WHERE expires_at IS NULL OR expires_at > now()) AS live,
       count(*) FILTER (WHERE expires_at <= now()) AS expired,
       coalesce(sum(pg_column_size(value))
                FILTER (WHERE expires_at IS NULL OR expires_at > now()), 0)::bigint AS bytes
FROM {table}
WHERE namespace = $1
GROUP BY partition
ORDER BY partition

-- name: set
-- $3 value, $4 partition or NULL (keep), $5 ttl in ms or NULL, $6 keep_ttl.
-- An expired row counts as absent: the upsert recreates it (version 1, new created_at).
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, $2::text, coalesce($4::text, 'default'), $3::jsonb, 1, now(), now(),
           now() + $5::bigint * interval '1 millisecond'
    WHERE (SELECT count(*) FROM f) < 2
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value,
        partition = CASE WHEN e.expires_at <= now() THEN EXCLUDED.partition
                         ELSE coalesce($4, e.partition) END,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = CASE WHEN $5::bigint IS NOT NULL THEN EXCLUDED.expires_at
                          WHEN $6::bool AND (e.expires_at IS NULL OR e.expires_at > now())
                              THEN e.expires_at
                          ELSE NULL END
    RETURNING key, partition, version, created_at, updated_at, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT partition, version, created_at, updated_at, expires_at
FROM w

-- name: set_batch
-- Many `set`s (distinct keys) in one statement: $2 keys, $3 values, $4 partitions (NULL: keep),
-- $5 ttls in ms (NULL: none); $6 the keys whose given partition replaces a live entry's,
-- $7 the keys written with keep_ttl. (ON CONFLICT DO UPDATE sees only the proposed row, whose
-- partition is already 'default' and whose expiry is NULL for both flags; the two short
-- arrays -- empty in the common case -- carry them.)
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, b.key, coalesce(b.partition, 'default'), b.value, 1, now(), now(),
           now() + b.ttl_ms * interval '1 millisecond'
    FROM unnest($2::text[], $3::jsonb[], $4::text[], $5::bigint[])
        AS b(key, value, partition, ttl_ms)
    WHERE (SELECT count(*) FROM f) < 2
    -- Rows are locked in key order, so concurrent batches never wait on each other in a cycle.
    ORDER BY b.key COLLATE "C"
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value,
        partition = CASE WHEN e.expires_at <= now() OR EXCLUDED.key = ANY($6::text[])
                         THEN EXCLUDED.partition ELSE e.partition END,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = CASE WHEN EXCLUDED.expires_at IS NOT NULL THEN EXCLUDED.expires_at
                          WHEN (e.expires_at IS NULL OR e.expires_at > now())
                               AND EXCLUDED.key = ANY($7::text[])
                              THEN e.expires_at
                          ELSE NULL END
    RETURNING key, partition, version, created_at, updated_at, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT key, partition, version, created_at, updated_at, expires_at
FROM w

-- name: set_batch_plain
-- set_batch when no call of the batch has a ttl, a partition or keep_ttl (the common case):
-- two arrays to send instead of four, and no per-row test against the flag arrays.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, b.key, 'default', b.value, 1, now(), now(), NULL
    FROM unnest($2::text[], $3::jsonb[]) AS b(key, value)
    WHERE (SELECT count(*) FROM f) < 2
    ORDER BY b.key COLLATE "C"  -- lock rows in key order (see set_batch)
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value,
        partition = CASE WHEN e.expires_at <= now() THEN 'default' ELSE e.partition END,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = NULL
    RETURNING key, partition, version, created_at, updated_at, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT key, partition, version, created_at, updated_at, expires_at
FROM w

-- name: set_if_absent
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, $2::text, coalesce($4::text, 'default'), $3::jsonb, 1, now(), now(),
           now() + $5::bigint * interval '1 millisecond'
    WHERE (SELECT count(*) FROM f) < 2
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value, partition = EXCLUDED.partition, version = 1,
        created_at = now(), updated_at = now(), expires_at = EXCLUDED.expires_at
    WHERE e.expires_at <= now()
    RETURNING key, partition, version, created_at, updated_at, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT partition, version, created_at, updated_at, expires_at
FROM w

-- name: compare_and_set
-- $6 the expected version (> 0); compare_and_set with version 0 uses set_if_absent.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    UPDATE {table} SET
        value = $3,
        partition = coalesce($4, partition),
        version = version + 1,
        updated_at = now(),
        expires_at = CASE WHEN $5::bigint IS NULL THEN expires_at
                          ELSE now() + $5::bigint * interval '1 millisecond' END
    WHERE namespace = $1 AND key = $2 AND version = $6
      AND (expires_at IS NULL OR expires_at > now())
      AND (SELECT count(*) FROM f) < 2
    RETURNING key, partition, version, created_at, updated_at, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT partition, version, created_at, updated_at, expires_at
FROM w

-- name: current_version
SELECT version FROM {table}
WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())

-- name: incr
-- $3 the amount as text, $6 true when it is a float. Integers add as numeric and must stay in
-- signed 64 bits; a float on either side adds as float8, printed shortest-exact and stored as
-- numeric with at least one decimal so that it reads back as a float. A live non-number or an
-- out-of-range result matches no row: nothing changes (nothing is recorded) and the caller
-- looks at the current value to say why.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, $2::text, coalesce($4::text, 'default'),
           to_jsonb(CASE WHEN $6::bool
                         THEN round($3::text::float8::text::numeric,
                                    greatest(scale($3::text::float8::text::numeric), 1))
                         ELSE $3::text::numeric END),
           1, now(), now(), now() + $5::bigint * interval '1 millisecond'
    WHERE (SELECT count(*) FROM f) < 2
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = CASE
            WHEN e.expires_at <= now() THEN EXCLUDED.value
            WHEN $6::bool OR e.value::text !~ '^-?[0-9]+$'
                THEN to_jsonb(round(((e.value::text)::float8 + $3::text::float8)::text::numeric,
                                    greatest(scale(((e.value::text)::float8
                                                    + $3::text::float8)::text::numeric), 1)))
            ELSE to_jsonb((e.value::text)::numeric + $3::text::numeric) END,
        partition = CASE WHEN e.expires_at <= now() THEN EXCLUDED.partition
                         ELSE coalesce($4, e.partition) END,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = CASE WHEN $5::bigint IS NOT NULL THEN EXCLUDED.expires_at
                          WHEN e.expires_at <= now() THEN NULL
                          ELSE e.expires_at END
    WHERE e.expires_at <= now()
       OR (jsonb_typeof(e.value) = 'number'
           AND ($6::bool OR e.value::text !~ '^-?[0-9]+$'
                OR (e.value::text)::numeric + $3::text::numeric
                   BETWEEN -9223372036854775808 AND 9223372036854775807))
    RETURNING key, partition, version, expires_at, value,
              ($6::bool OR value::text !~ '^-?[0-9]+$') AS is_float
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT value, is_float
FROM w

-- name: delete
-- Only a live entry deleted is a change: an expired row removed records nothing.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    DELETE FROM {table} WHERE namespace = $1 AND key = $2 AND (SELECT count(*) FROM f) < 2
    RETURNING key, partition, expires_at IS NULL OR expires_at > now() AS live
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, at)
    SELECT $1, (SELECT epoch FROM f), 'd', key, partition, now()
    FROM w WHERE live AND (SELECT epoch FROM f) IS NOT NULL
)
SELECT live
FROM w

-- name: delete_batch
-- Rows are locked in key order before they are deleted (see l).
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), l AS MATERIALIZED (
    -- Lock the rows in key order first, as every multi-row write does (set_batch, set_many):
    -- a DELETE by an array locks in its scan's order, which a bitmap scan makes heap order,
    -- and two writers locking in different orders deadlock.
    SELECT key FROM {table} WHERE namespace = $1 AND key = ANY($2::text[])
      AND (SELECT count(*) FROM f) < 2
    ORDER BY key COLLATE "C"
    FOR UPDATE
), w AS (
    DELETE FROM {table} WHERE namespace = $1 AND key = ANY(ARRAY(SELECT key FROM l))
    RETURNING key, partition, expires_at IS NULL OR expires_at > now() AS live
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, at)
    SELECT $1, (SELECT epoch FROM f), 'd', key, partition, now()
    FROM w WHERE live AND (SELECT epoch FROM f) IS NOT NULL
)
SELECT key, live
FROM w

-- name: delete_many
-- Rows are locked in key order before they are deleted (see l).
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), l AS MATERIALIZED (
    -- Lock the rows in key order first, as every multi-row write does (set_batch, set_many):
    -- a DELETE by an array locks in its scan's order, which a bitmap scan makes heap order,
    -- and two writers locking in different orders deadlock.
    SELECT key FROM {table} WHERE namespace = $1 AND key = ANY($2::text[])
      AND (SELECT count(*) FROM f) < 2
    ORDER BY key COLLATE "C"
    FOR UPDATE
), w AS (
    DELETE FROM {table} WHERE namespace = $1 AND key = ANY(ARRAY(SELECT key FROM l))
    RETURNING key, partition, expires_at IS NULL OR expires_at > now() AS live
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, at)
    SELECT $1, (SELECT epoch FROM f), 'd', key, partition, now()
    FROM w WHERE live AND (SELECT epoch FROM f) IS NOT NULL
)
SELECT count(*) FILTER (WHERE live)
FROM w

-- name: expire
-- $3 ttl in ms, or NULL to persist; $4 the version the entry must have (NULL: any). A "ttl"
-- change keeps the entry's version.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    UPDATE {table}
    SET expires_at = now() + $3::bigint * interval '1 millisecond'
    WHERE namespace = $1 AND key = $2 AND (expires_at IS NULL OR expires_at > now())
      AND ($4::bigint IS NULL OR version = $4::bigint)
      AND (SELECT count(*) FROM f) < 2
    RETURNING key, partition, version, expires_at
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 't', key, partition, version, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT 1
FROM w

-- name: clear
-- The clear function of migration 0005: the entries of the namespace and, when it has a feed,
-- one "clear" change if a live entry went (after waiting for the recording writes in flight).
SELECT {clear}($1, NULL::text)

-- name: clear_partition
SELECT {clear}($1, $2::text)

-- name: cleanup_expired
WITH gone AS (
    DELETE FROM {table} WHERE namespace = $1 AND expires_at <= now() RETURNING 1
)
SELECT count(*) FROM gone

-- name: sweep
-- The background sweeper: expired rows of every namespace, a bounded batch at a time.
WITH doomed AS (
    SELECT ctid FROM {table} WHERE expires_at <= now() LIMIT $1 FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM doomed) RETURNING 1
)
SELECT count(*) FROM gone

-- name: sweep_results
-- The background sweeper, for the work queues: done jobs whose result expired (invisible to
-- every call already), of every namespace, a bounded batch ($1) at a time. The done index is
-- (namespace, queue, due_at): a loose index scan walks its queues (one descent each, produced
-- only as far as `doomed` reads them) and reads per queue the range of expired results
-- (due_at <= now(), a bound of the index scan), so held results are never read, however many.
-- Marks of awaited jobs go with their rows (the foreign key of <table>_jobs_awaited).
WITH RECURSIVE queues (namespace, queue) AS (
    (SELECT namespace, queue FROM {jobs}
     WHERE state = 'done'
     ORDER BY namespace, queue
     LIMIT 1)
    UNION ALL
    SELECT n.namespace, n.queue FROM queues q CROSS JOIN LATERAL (
        SELECT j.namespace, j.queue FROM {jobs} j
        WHERE j.state = 'done' AND (j.namespace, j.queue) > (q.namespace, q.queue)
        ORDER BY j.namespace, j.queue
        LIMIT 1
    ) n
), doomed AS MATERIALIZED (
    SELECT d.id FROM queues q CROSS JOIN LATERAL (
        SELECT j.id FROM {jobs} j
        WHERE j.namespace = q.namespace AND j.queue = q.queue AND j.state = 'done'
          AND j.due_at <= now()
        ORDER BY j.due_at
        LIMIT $1
        FOR UPDATE SKIP LOCKED
    ) d
    LIMIT $1
), gone AS (
    DELETE FROM {jobs} WHERE id = ANY(ARRAY(SELECT id FROM doomed)) RETURNING 1
)
SELECT count(*) FROM gone

-- name: stage_create
-- Created once per session and emptied by every commit: creating and dropping a table per call
-- would cost catalog writes on every set_many.
CREATE TEMPORARY TABLE IF NOT EXISTS fleetmem_stage_1
    (key text COLLATE "C" NOT NULL, value jsonb NOT NULL)
ON COMMIT DELETE ROWS

-- name: set_many
-- Upserts the staged rows; $2 partition or NULL (keep), $3 ttl in ms or NULL.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, s.key, coalesce($2, 'default'), s.value, 1, now(), now(),
           now() + $3::bigint * interval '1 millisecond'
    FROM fleetmem_stage_1 s
    WHERE (SELECT count(*) FROM f) < 2
    ORDER BY s.key COLLATE "C"  -- lock rows in key order (see set_batch)
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value,
        partition = CASE WHEN e.expires_at <= now() THEN EXCLUDED.partition
                         ELSE coalesce($2, e.partition) END,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = EXCLUDED.expires_at
    RETURNING key, partition, version, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
    RETURNING 1
)
SELECT count(*) FROM c

-- name: ping
SELECT 1

-- name: server_time
-- The server's clock now (not the transaction's start: this runs on its own, outside any).
SELECT clock_timestamp()

-- name: namespaces
-- Unlike the others, no namespace parameter: $1 inclusive lower bound (the prefix), $2
-- exclusive upper bound, $3 exclusive cursor ('' for none), $4 limit (NULL: none), $5 the
-- reserved prefix ('_fleetmem'). A loose index scan of the primary key (namespace, key): each
-- step is one descent of the index to the next namespace, never a pass over a namespace's
-- rows. A namespace is live if the expiry index has a row of it expiring after now() (one
-- descent), else if it has a persistent row (a walk of its rows that stops at the first
-- persistent one: it passes over expired rows only, which the sweeper and cleanup_expired free).
WITH RECURSIVE ns(name) AS (
    (SELECT namespace FROM {table}
     WHERE namespace >= $1 AND namespace < $2 AND namespace > $3
     ORDER BY namespace LIMIT 1)
    UNION ALL
    SELECT (SELECT t.namespace FROM {table} t
            WHERE t.namespace > ns.name AND t.namespace < $2
            ORDER BY t.namespace LIMIT 1)
    FROM ns WHERE ns.name IS NOT NULL
)
SELECT name FROM ns
WHERE name IS NOT NULL AND NOT starts_with(name, $5)
  -- Scalar subqueries with LIMIT 1, not EXISTS: the planner may answer an EXISTS with one
  -- hashed pass over every persistent row of the table.
  AND ((SELECT 1 FROM {table} e
        WHERE e.namespace = ns.name AND e.expires_at > now() LIMIT 1) IS NOT NULL
       OR (SELECT 1 FROM {table} e
           WHERE e.namespace = ns.name AND e.expires_at IS NULL LIMIT 1) IS NOT NULL)
LIMIT $4

-- Export and import (fleetmem.portability; kv.py export_pages, import_batch, import_replace).

-- name: export_page
-- One page of an export: the live entries above $4 (exclusive; '' for the first page) in the
-- prefix range [$2, $3), ascending, at most $5. Every page of an export runs in one REPEATABLE
-- READ READ ONLY transaction: they read one snapshot, and now() -- the transaction's start --
-- judges expiry in all of them, so the export is one instant.
SELECT key, value, partition, version, created_at, updated_at, expires_at FROM {table}
WHERE namespace = $1 AND key >= $2 AND key < $3 AND key > $4
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY key
LIMIT $5

-- name: export_page_partition
SELECT key, value, partition, version, created_at, updated_at, expires_at FROM {table}
WHERE namespace = $1 AND partition = $6 AND key >= $2 AND key < $3 AND key > $4
  AND (expires_at IS NULL OR expires_at > now())
ORDER BY key
LIMIT $5

-- name: import_batch
-- Imported entries (distinct keys): $2 keys, $3 values, $4 partitions, $5 absolute expiries
-- (NULL: persistent); $6 true: only keys without a live entry ("missing"). An op whose expiry
-- has passed (<= now()) is skipped. The others are written as `set` writes, with the op's
-- partition and expiry: a live entry gets version + 1 and keeps created_at; an absent or
-- expired one is (re)created at version 1. Each write records a "set" change (the f/c pattern
-- above). Returns the entries written and the ops skipped as expired; with $6 the rest had a
-- live entry.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, b.key, b.partition, b.value, 1, now(), now(), b.expires_at
    FROM unnest($2::text[], $3::jsonb[], $4::text[], $5::timestamptz[])
        AS b(key, value, partition, expires_at)
    WHERE (b.expires_at IS NULL OR b.expires_at > now())
      AND (SELECT count(*) FROM f) < 2
    ORDER BY b.key COLLATE "C"  -- lock rows in key order (see set_batch)
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value,
        partition = EXCLUDED.partition,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = EXCLUDED.expires_at
    WHERE NOT $6::bool OR e.expires_at <= now()
    RETURNING key, partition, version, expires_at, value
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
)
SELECT (SELECT count(*) FROM w) AS written,
       (SELECT count(*) FROM unnest($5::timestamptz[]) AS x(at) WHERE x.at <= now()) AS expired

-- name: import_replace_page
-- One page of a replace, a statement of its transaction (kv.py import_replace): the page
-- written as by import_batch (all of it but the expired ops), and the namespace's keys above
-- $6 (the previous page's last key; '' before the first page) up to $7 (this page's last key)
-- that the write did not write deleted -- the keys between the file's, and the key of an op
-- skipped as expired. Records a "set" change per entry written and a "delete" change per live
-- entry deleted. Every statement of the transaction has the same now(): an op is expired (and
-- its key deleted) the same way in every page. Returns the counts written, expired, deleted.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), w AS (
    INSERT INTO {table} AS e
        (namespace, key, partition, value, version, created_at, updated_at, expires_at)
    SELECT $1, b.key, b.partition, b.value, 1, now(), now(), b.expires_at
    FROM unnest($2::text[], $3::jsonb[], $4::text[], $5::timestamptz[])
        AS b(key, value, partition, expires_at)
    WHERE (b.expires_at IS NULL OR b.expires_at > now())
      AND (SELECT count(*) FROM f) < 2
    ORDER BY b.key COLLATE "C"
    ON CONFLICT (namespace, key) DO UPDATE SET
        value = EXCLUDED.value,
        partition = EXCLUDED.partition,
        version = CASE WHEN e.expires_at <= now() THEN 1 ELSE e.version + 1 END,
        created_at = CASE WHEN e.expires_at <= now() THEN now() ELSE e.created_at END,
        updated_at = now(),
        expires_at = EXCLUDED.expires_at
    RETURNING key, partition, version, expires_at, value
), d AS (
    -- Rows w wrote are not deleted (a row is never modified twice by one statement). The keys
    -- to delete are computed once, before the delete scans, by an InitPlan: the range's keys
    -- EXCEPT w's (a set operation -- hashed or sorted, never a nested loop -- which reads w's
    -- RETURNING in full first); the delete then probes the primary key per key of that array.
    -- A join of the range with w instead was planned as a Nested Loop Anti Join whenever the
    -- range was estimated at one row (stale statistics of freshly written keys): quadratic in
    -- the page, ~100 ms for a page of 1,000 keys.
    DELETE FROM {table} t
    WHERE t.namespace = $1
      AND t.key = ANY(ARRAY(
          SELECT r.key FROM {table} r WHERE r.namespace = $1 AND r.key > $6 AND r.key <= $7
          EXCEPT ALL
          SELECT w.key FROM w))
      AND (SELECT count(*) FROM f) < 2
    RETURNING t.key, t.partition, t.expires_at IS NULL OR t.expires_at > now() AS live
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, version, value, expires_at, at)
    SELECT $1, (SELECT epoch FROM f), 's', key, partition, version, value, expires_at, now()
    FROM w WHERE (SELECT epoch FROM f) IS NOT NULL
    UNION ALL
    SELECT $1, (SELECT epoch FROM f), 'd', key, partition, NULL, NULL, NULL, now()
    FROM d WHERE live AND (SELECT epoch FROM f) IS NOT NULL
)
SELECT (SELECT count(*) FROM w) AS written,
       (SELECT count(*) FROM unnest($5::timestamptz[]) AS x(at) WHERE x.at <= now()) AS expired,
       (SELECT count(*) FROM d WHERE live) AS deleted

-- name: import_replace_rest
-- The end of a replace: the namespace's keys above $2 (the last page's last key; '' when the
-- import had no entry) deleted, a "delete" change recorded per live entry.
WITH f AS MATERIALIZED (
    SELECT epoch, pg_advisory_xact_lock_shared(1718382950, hashtext($1)),
           CASE WHEN watched_until > now() THEN pg_notify('{channel}', '~' || $1) END
    FROM {feeds} WHERE namespace = $1
), d AS (
    DELETE FROM {table} t
    WHERE t.namespace = $1 AND t.key > $2 AND (SELECT count(*) FROM f) < 2
    RETURNING t.key, t.partition, t.expires_at IS NULL OR t.expires_at > now() AS live
), c AS (
    INSERT INTO {changes} (namespace, epoch, op, key, partition, at)
    SELECT $1, (SELECT epoch FROM f), 'd', key, partition, now()
    FROM d WHERE live AND (SELECT epoch FROM f) IS NOT NULL
)
SELECT count(*) FILTER (WHERE live) FROM d
