-- Leases with fencing tokens, one named block each ("-- name: NAME").
-- {leases} is the validated, double-quoted lease table. $1 is always the namespace, $2 the lease
-- name. A lease is live while expires_at > now(); each statement runs alone, so now() is its
-- clock. A row outlives its lease (release sets expires_at to now()) so the token only grows.

-- name: acquire
-- $3 owner, $4 ttl in ms. One statement: the upsert takes a free (absent, released or
-- expired) lease with token + 1, or changes nothing when it is live; the second branch then
-- reports the live lease's remaining life. The upsert is not even tried when the statement's
-- snapshot shows the lease live: ON CONFLICT locks the row it conflicts with before it looks at
-- its WHERE, so a refused acquire would wait for the fenced writes holding the row FOR SHARE
-- and write a row lock (WAL) on every poll of a waiter. When the snapshot is behind a grant by
-- a concurrent transaction (the upsert then waited for it and found the lease live), the
-- reported remaining life is 0 or there is no row: the caller tries again at once.
WITH current AS (
    SELECT expires_at FROM {leases} WHERE namespace = $1 AND name = $2
), granted AS (
    INSERT INTO {leases} AS l (namespace, name, owner, token, acquired_at, expires_at, ttl_ms)
    SELECT $1, $2, $3, 1, now(), now() + $4::bigint * interval '1 millisecond', $4::bigint
    WHERE NOT EXISTS (SELECT 1 FROM current WHERE current.expires_at > now())
    ON CONFLICT (namespace, name) DO UPDATE SET
        owner = EXCLUDED.owner,
        token = l.token + 1,
        acquired_at = EXCLUDED.acquired_at,
        expires_at = EXCLUDED.expires_at,
        ttl_ms = EXCLUDED.ttl_ms
    WHERE l.expires_at <= now()
    RETURNING token, acquired_at, expires_at
)
SELECT token, acquired_at, expires_at, NULL::bigint FROM granted
UNION ALL
SELECT NULL, NULL, NULL,
       greatest(0, ceil(extract(epoch FROM c.expires_at - now()) * 1000))::bigint
FROM current c
WHERE NOT EXISTS (SELECT 1 FROM granted)

-- name: renew
-- $3 token, $4 ttl in ms or NULL (the last one).
UPDATE {leases} SET
    ttl_ms = coalesce($4::bigint, ttl_ms),
    expires_at = now() + coalesce($4::bigint, ttl_ms) * interval '1 millisecond'
WHERE namespace = $1 AND name = $2 AND token = $3 AND expires_at > now()
RETURNING owner, acquired_at, expires_at

-- name: release
-- $3 token, $4 the NOTIFY channel. The notification (payload "namespace:name"; a namespace
-- has no colon) is sent at commit, with the release, to every listening process.
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
-- A fence check alone (the set_many path checks it before streaming its rows).
SELECT {fence}($1, $2, $3)
