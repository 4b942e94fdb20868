-- The agent registry, one named block each ("-- name: NAME").
-- {agents} is the validated, double-quoted agent table. $1 is always the namespace, $2 the
-- agent id. An agent is live while expires_at > now(); a gone agent's row keeps its generation.

-- name: register
-- $3 info (jsonb), $4 ttl in ms. A live agent keeps registered_at and generation; a gone one
-- gets generation + 1 and a new registered_at.
INSERT INTO {agents} AS a
    (namespace, id, info, generation, registered_at, last_seen, expires_at, ttl_ms)
VALUES ($1, $2, $3, 1, now(), now(), now() + $4::bigint * interval '1 millisecond', $4)
ON CONFLICT (namespace, id) DO UPDATE SET
    info = EXCLUDED.info,
    generation = CASE WHEN a.expires_at > now() THEN a.generation ELSE a.generation + 1 END,
    registered_at = CASE WHEN a.expires_at > now() THEN a.registered_at ELSE now() END,
    last_seen = now(),
    expires_at = EXCLUDED.expires_at,
    ttl_ms = EXCLUDED.ttl_ms
RETURNING info, generation, registered_at, last_seen, expires_at

-- name: heartbeat
-- $3 ttl in ms or NULL (the last one), $4 info or NULL (keep).
UPDATE {agents} SET
    info = coalesce($4::jsonb, info),
    ttl_ms = coalesce($3::bigint, ttl_ms),
    last_seen = now(),
    expires_at = now() + coalesce($3::bigint, ttl_ms) * interval '1 millisecond'
WHERE namespace = $1 AND id = $2 AND expires_at > now()
RETURNING info, generation, registered_at, last_seen, expires_at

-- name: deregister
UPDATE {agents} SET expires_at = now()
WHERE namespace = $1 AND id = $2 AND expires_at > now()
RETURNING 1

-- name: get
SELECT info, generation, registered_at, last_seen, expires_at FROM {agents}
WHERE namespace = $1 AND id = $2 AND expires_at > now()

-- name: list
-- $2 inclusive lower bound (the prefix), $3 exclusive upper bound, $4 exclusive cursor, $5 the
-- limit (NULL: none); the bounds as for the entries' keys (code-point order, COLLATE "C").
SELECT id, info, generation, registered_at, last_seen, expires_at FROM {agents}
WHERE namespace = $1 AND id >= $2 AND id < $3 AND id > $4 AND expires_at > now()
ORDER BY id
LIMIT $5

-- name: count
SELECT count(*) FROM {agents} WHERE namespace = $1 AND expires_at > now()
