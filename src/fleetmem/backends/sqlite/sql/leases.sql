-- SQL of SQLiteStore's leases and fenced writes, as named blocks loaded once by
-- fleetmem.backends.sqlite.
--
-- Times are integer milliseconds since the Unix epoch on the wall clock of the process running
-- the statement (the same clock as the entries' expiry). A lease is live while
-- expires_at > now. A row outlives its lease: release sets expires_at to now and keeps the row,
-- so the last token of a name stays in the file and the next grant gets a greater one, across
-- releases, expiries and reopenings of the file.

-- name: create_leases
CREATE TABLE IF NOT EXISTS fleetmem_leases (
    namespace   TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    owner       TEXT    NOT NULL,
    token       INTEGER NOT NULL,  -- the fencing token of the latest grant
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,  -- <= now once released or expired
    ttl_ms      INTEGER NOT NULL,  -- the TTL last granted or renewed (renew without a TTL)
    PRIMARY KEY (namespace, name)
);

-- name: lease_expiry
-- ?1 namespace, ?2 name, ?3 now; the expiry of the live lease, if any
SELECT expires_at FROM fleetmem_leases
WHERE namespace = ?1 AND name = ?2 AND expires_at > ?3;

-- name: lease_grant
-- ?1 namespace, ?2 name, ?3 owner, ?4 now, ?5 ttl_ms.
-- One statement: grants a name never leased (token 1) or one whose lease is no longer live
-- (token + 1); returns no row while the lease is live.
INSERT INTO fleetmem_leases AS l
    (namespace, name, owner, token, acquired_at, expires_at, ttl_ms)
VALUES (?1, ?2, ?3, 1, ?4, ?4 + ?5, ?5)
ON CONFLICT (namespace, name) DO UPDATE SET
    owner = excluded.owner,
    token = l.token + 1,
    acquired_at = excluded.acquired_at,
    expires_at = excluded.expires_at,
    ttl_ms = excluded.ttl_ms
WHERE l.expires_at <= ?4
RETURNING token, acquired_at, expires_at;

-- name: lease_renew
-- ?1 namespace, ?2 name, ?3 token, ?4 now, ?5 ttl_ms (NULL: the last one)
UPDATE fleetmem_leases SET
    ttl_ms = coalesce(?5, ttl_ms),
    expires_at = ?4 + coalesce(?5, ttl_ms)
WHERE namespace = ?1 AND name = ?2 AND token = ?3 AND expires_at > ?4
RETURNING owner, acquired_at, expires_at;

-- name: lease_release
-- ?1 namespace, ?2 name, ?3 token, ?4 now; changes() tells whether it was live with that token
UPDATE fleetmem_leases SET expires_at = ?4
WHERE namespace = ?1 AND name = ?2 AND token = ?3 AND expires_at > ?4;

-- name: lease_holder
-- ?1 namespace, ?2 name, ?3 now
SELECT owner, token, acquired_at, expires_at FROM fleetmem_leases
WHERE namespace = ?1 AND name = ?2 AND expires_at > ?3;

-- name: fence_check
-- ?1 namespace, ?2 name, ?3 token, ?4 now; a row when the fence holds. Run first inside the
-- write's BEGIN IMMEDIATE transaction, with the write's now.
SELECT 1 FROM fleetmem_leases
WHERE namespace = ?1 AND name = ?2 AND token = ?3 AND expires_at > ?4;
