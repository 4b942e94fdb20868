-- Leases with fencing tokens, one named block each ("-- name: NAME").
-- {leases} is the validated, double-quoted lease table. $1 is always the namespace, $2 the lease
-- name. A lease is live while expires_at > now(); each statement runs alone, so now() is its
-- clock. A row outlives its lease (release sets expires_at to now()) so the token only grows.

-- name: acquire
-- $3 owner, $4 ttl in ms. One statement: the upsert takes a free (absent, released or
-- expired) lease with token + 1, or changes nothing when it is live; the second branch then
-- reports the live lease's remaining life (NULL when the statement's snapshot predates a
-- grant by a concurrent transaction: the caller only uses it to size its sleep).
WITH granted AS (
    INSERT INTO {leases} AS l (namespace, name, owner, token, acquired_at, expires_at, ttl_ms)
    VALUES ($1, $2, $3, 1, now(), now() + $4::bigint * interval '1 millisecond', $4)
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
       greatest(0, ceil(extract(epoch FROM l.expires_at - now()) * 1000))::bigint
FROM {leases} l
WHERE l.namespace = $1 AND l.name = $2 AND NOT EXISTS (SELECT 1 FROM granted)

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
