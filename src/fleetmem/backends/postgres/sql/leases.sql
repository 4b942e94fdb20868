-- Leases with fencing tokens, one named block each ("-- name: NAME").
-- {leases} is the validated, double-quoted lease table. $1 is always the namespace, $2 the lease
-- name. A lease is live while expires_at > now(); the statements here run alone, so now() is
-- their start. A row outlives its lease (release sets expires_at to now()) so the token only
-- grows.
--
-- Clocks. Whether a lease is live is judged at the instant the statement started: now() in the
-- statements here (acquire, renew, release, holder), statement_timestamp() in the fence
-- function and the set_many pre-check below, which may run inside set_many's transaction
-- (where now() would be the transaction's start, before its COPY); alone, the two are equal. A grant or a renewal is
-- stamped with clock_timestamp() read after its row lock is held, not with now(): a statement
-- can wait before it gets there (for a relation lock, for a concurrent first grant, a renew for
-- fenced writes in flight), and an expiry counted from its start could already be past when it
-- returns. The two agree: a grant is given only when expires_at <= now() <= clock_timestamp(),
-- so the old lease ended before the new one starts; the new holder's statements start after
-- the grant returned, so their now() is later than its stamp and they see at most its TTL; a
-- statement that started earlier and runs later (an old holder's fenced write) checks the
-- token too, and its FOR SHARE lock keeps the grant from happening before it commits.

-- name: acquire
-- $3 owner, $4 ttl in ms. One statement, which never waits for the lease row's lock:
-- * free (released or expired in the snapshot): the row is locked FOR UPDATE SKIP LOCKED and
--   granted with token + 1. A row another transaction holds -- fenced writes of the old holder
--   (FOR SHARE, kept as long as such a write waits for an entry's row lock, possibly past the
--   lease's expiry), or a concurrent acquire -- is skipped, and so is a row a transaction
--   committed since the snapshot unless it is still free (the lock rechecks the newest row;
--   in that rare race the row stays locked, unchanged, until the statement ends).
--   Waiting there would make an acquire without `wait` block, and return a lease counted from
--   before the wait;
-- * absent: inserted with token 1; ON CONFLICT DO NOTHING only waits for a concurrent first
--   grant (another acquire statement) and then changes nothing;
-- * live in the snapshot: nothing is tried, so a refused acquire takes no row lock and writes
--   nothing (a polling waiter writes no WAL); the last branch reports its remaining life.
-- Not granted although free in the snapshot (locked, or granted meanwhile): 20 ms, "try again
-- soon"; a waiting acquire does, one without `wait` returns None at once. No row at all (absent
-- in the snapshot and inserted meanwhile): the caller tries again at once.
-- The grant's stamp t is read in the projection above the lock (a subquery with FOR UPDATE is
-- never flattened), after the row is locked.
WITH current AS (
    SELECT expires_at FROM {leases} WHERE namespace = $1 AND name = $2
), free AS (
    SELECT clock_timestamp() AS t FROM (
        SELECT 1 FROM {leases}
        WHERE namespace = $1 AND name = $2 AND expires_at <= now()
        FOR UPDATE SKIP LOCKED
    ) locked
), taken AS (
    UPDATE {leases} AS l SET
        owner = $3,
        token = l.token + 1,
        acquired_at = free.t,
        expires_at = free.t + $4::bigint * interval '1 millisecond',
        ttl_ms = $4::bigint
    FROM free
    WHERE l.namespace = $1 AND l.name = $2
    RETURNING l.token, l.acquired_at, l.expires_at
), inserted AS (
    INSERT INTO {leases} (namespace, name, owner, token, acquired_at, expires_at, ttl_ms)
    SELECT $1, $2, $3, 1, s.t, s.t + $4::bigint * interval '1 millisecond', $4::bigint
    FROM (SELECT clock_timestamp() AS t) s
    WHERE NOT EXISTS (SELECT 1 FROM current)
    ON CONFLICT (namespace, name) DO NOTHING
    RETURNING token, acquired_at, expires_at
)
SELECT token, acquired_at, expires_at, NULL::bigint FROM taken
UNION ALL
SELECT token, acquired_at, expires_at, NULL::bigint FROM inserted
UNION ALL
SELECT NULL, NULL, NULL,
       CASE WHEN c.expires_at > now()
            THEN ceil(extract(epoch FROM c.expires_at - now()) * 1000)::bigint
            ELSE 20 END
FROM current c
WHERE NOT EXISTS (SELECT 1 FROM taken)

-- name: renew
-- $3 token, $4 ttl in ms or NULL (the last one). The row lock waits for fenced writes in flight
-- (FOR SHARE; the holder's own, normally short). Whether the lease is still live is decided
-- again after the lock is held, on the clock read then (t): a renewal that waited past the
-- lease's expiry finds it lost, as if it had started then, and a renewed expiry counts from t.
WITH locked AS (
    SELECT s.expires_at, clock_timestamp() AS t FROM (
        SELECT expires_at FROM {leases}
        WHERE namespace = $1 AND name = $2 AND token = $3 AND expires_at > now()
        FOR UPDATE
    ) s
)
UPDATE {leases} AS l SET
    ttl_ms = coalesce($4::bigint, l.ttl_ms),
    expires_at = locked.t + coalesce($4::bigint, l.ttl_ms) * interval '1 millisecond'
FROM locked
WHERE l.namespace = $1 AND l.name = $2 AND l.token = $3 AND locked.expires_at > locked.t
RETURNING l.owner, l.acquired_at, l.expires_at

-- name: release
-- $3 token, $4 the NOTIFY channel. The notification (payload "namespace:name"; a namespace
-- has no colon) is sent at commit, with the release, to every listening process. Decided and
-- stamped at the statement's start (now()), like every liveness check: a release that waits for
-- fenced writes in flight frees the lease as of when it was asked (nobody can take the locked
-- row meanwhile), and the next acquire, which starts later, finds it free.
WITH freed AS (
    UPDATE {leases} SET expires_at = now()
    WHERE namespace = $1 AND name = $2 AND token = $3 AND expires_at > now()
    RETURNING namespace, name
)
SELECT pg_notify($4, namespace || ':' || name) FROM freed

-- name: holder
SELECT owner, token, acquired_at, expires_at FROM {leases}
WHERE namespace = $1 AND name = $2 AND expires_at > now()

-- name: fence
-- $3 token. Whether the lease is live with that token, taking no lock: set_many asks it in its
-- transaction before it streams its rows, so a lost lease fails before the COPY rather than
-- after it. The upsert that ends the transaction checks again with the fence function, whose
-- FOR SHARE lock covers the write; a lock taken here would hold the row for the whole COPY and
-- keep the holder's own renewals waiting that long.
SELECT EXISTS (
    SELECT 1 FROM {leases}
    WHERE namespace = $1 AND name = $2 AND token = $3 AND expires_at > statement_timestamp()
)
