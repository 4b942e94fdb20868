-- SQL of SQLiteStore's agent registry, as named blocks loaded once by
-- fleetmem.backends.sqlite.
--
-- Times are integer milliseconds since the Unix epoch on the wall clock of the process running
-- the statement. An agent is live while expires_at > now. A row outlives its agent:
-- deregister sets expires_at to now and keeps the row, so its generation stays in the file and
-- the next register of that id gets a greater one.

-- name: create_agents
CREATE TABLE IF NOT EXISTS fleetmem_agents (
    namespace     TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    info          BLOB    NOT NULL,  -- compact UTF-8 JSON of an object
    generation    INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,  -- <= now once deregistered or expired
    ttl_ms        INTEGER NOT NULL,  -- the TTL last given (heartbeat without a TTL)
    PRIMARY KEY (namespace, id)
);

-- name: agent_register
-- ?1 namespace, ?2 id, ?3 info, ?4 now, ?5 ttl_ms.
-- A live agent keeps registered_at and generation; an absent or gone one starts again with
-- generation + 1 (1 for an id never seen).
INSERT INTO fleetmem_agents AS a
    (namespace, id, info, generation, registered_at, last_seen, expires_at, ttl_ms)
VALUES (?1, ?2, ?3, 1, ?4, ?4, ?4 + ?5, ?5)
ON CONFLICT (namespace, id) DO UPDATE SET
    info = excluded.info,
    generation = CASE WHEN a.expires_at > ?4 THEN a.generation ELSE a.generation + 1 END,
    registered_at = CASE WHEN a.expires_at > ?4 THEN a.registered_at ELSE ?4 END,
    last_seen = ?4,
    expires_at = excluded.expires_at,
    ttl_ms = excluded.ttl_ms
RETURNING info, generation, registered_at, last_seen, expires_at;

-- name: agent_heartbeat
-- ?1 namespace, ?2 id, ?3 now, ?4 ttl_ms (NULL: the last one), ?5 info (NULL: keep)
UPDATE fleetmem_agents SET
    ttl_ms = coalesce(?4, ttl_ms),
    info = coalesce(?5, info),
    last_seen = ?3,
    expires_at = ?3 + coalesce(?4, ttl_ms)
WHERE namespace = ?1 AND id = ?2 AND expires_at > ?3
RETURNING info, generation, registered_at, last_seen, expires_at;

-- name: agent_deregister
-- ?1 namespace, ?2 id, ?3 now; changes() tells whether it was live
UPDATE fleetmem_agents SET expires_at = ?3
WHERE namespace = ?1 AND id = ?2 AND expires_at > ?3;

-- name: agent_get
-- ?1 namespace, ?2 id, ?3 now
SELECT info, generation, registered_at, last_seen, expires_at FROM fleetmem_agents
WHERE namespace = ?1 AND id = ?2 AND expires_at > ?3;

-- name: agent_list
-- ?1 namespace, ?2 inclusive lower bound, ?3 exclusive upper bound, ?4 now, ?5 limit (-1: none)
SELECT id, info, generation, registered_at, last_seen, expires_at FROM fleetmem_agents
WHERE namespace = ?1 AND id >= ?2 AND id < ?3 AND expires_at > ?4
ORDER BY id LIMIT ?5;

-- name: agent_count
-- ?1 namespace, ?2 now
SELECT count(*) FROM fleetmem_agents WHERE namespace = ?1 AND expires_at > ?2;
