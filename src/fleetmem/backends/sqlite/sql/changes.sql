-- SQL of SQLiteStore's change feed (schema version 4), as named blocks.
--
-- fleetmem_feeds holds one row per namespace whose feed is enabled (the flag every KV write
-- probes, inside its own write transaction); fleetmem_changes the log of every such namespace.
-- A change's position is its id: ids come from AUTOINCREMENT (never reused, even once the
-- rows above are trimmed or dropped), and every write holds SQLite's write lock from BEGIN
-- IMMEDIATE to COMMIT, so ids are handed out in commit order and a reader's snapshot always
-- holds a prefix of them. Times are integer milliseconds on this process's wall clock.

-- name: create_feeds
CREATE TABLE IF NOT EXISTS fleetmem_feeds (
    namespace    TEXT    NOT NULL PRIMARY KEY,
    epoch        INTEGER NOT NULL,  -- from the feed_epoch counter in fleetmem_meta
    retention_ms INTEGER NOT NULL,
    floor        INTEGER NOT NULL   -- the highest trimmed id (0: none trimmed yet)
) WITHOUT ROWID;

-- name: create_changes
CREATE TABLE IF NOT EXISTS fleetmem_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- the position
    namespace  TEXT    NOT NULL,
    epoch      INTEGER NOT NULL,
    op         TEXT    NOT NULL,  -- 'set', 'delete', 'ttl' or 'clear'
    key        TEXT,              -- NULL for 'clear'
    partition  TEXT,              -- NULL for a 'clear' of the whole namespace
    version    INTEGER,           -- 'set' and 'ttl'
    value      BLOB,              -- 'set': the stored payload (compact UTF-8 JSON)
    expires_at INTEGER,           -- 'set' and 'ttl'; NULL: persistent
    at         INTEGER NOT NULL   -- the time of the write
);

-- name: create_changes_index
CREATE INDEX IF NOT EXISTS fleetmem_changes_namespace ON fleetmem_changes (namespace, id);

-- name: feed_probe
-- ?1 namespace. The one probe a write makes (a WITHOUT ROWID primary key: one B-tree seek).
SELECT epoch, retention_ms FROM fleetmem_feeds WHERE namespace = ?1;

-- name: feed_enabled
SELECT 1 FROM fleetmem_feeds WHERE namespace = ?1;

-- name: feed_state
-- ?1 namespace: epoch, floor, retention, newest id, time of the oldest change retained.
SELECT epoch, floor, retention_ms,
       (SELECT max(id) FROM fleetmem_changes WHERE namespace = ?1),
       (SELECT at FROM fleetmem_changes WHERE namespace = ?1 ORDER BY id LIMIT 1)
FROM fleetmem_feeds WHERE namespace = ?1;

-- name: feed_head
-- ?1 namespace: epoch and head (the newest id, or the floor when nothing is retained). What
-- a waiting watcher polls: two index seeks, no write lock.
SELECT epoch, max(floor, coalesce((SELECT max(id) FROM fleetmem_changes WHERE namespace = ?1), 0))
FROM fleetmem_feeds WHERE namespace = ?1;

-- name: feed_next_epoch
-- A counter that survives disable(), so that each enable() of a disabled feed starts a greater
-- epoch than any before it (in any namespace of the file).
INSERT INTO fleetmem_meta (name, value) VALUES ('feed_epoch', '1')
ON CONFLICT (name) DO UPDATE SET value = CAST(value AS INTEGER) + 1
RETURNING CAST(value AS INTEGER);

-- name: feed_insert
-- ?1 namespace, ?2 epoch, ?3 retention_ms
INSERT INTO fleetmem_feeds (namespace, epoch, retention_ms, floor) VALUES (?1, ?2, ?3, 0);

-- name: feed_set_retention
UPDATE fleetmem_feeds SET retention_ms = ?2 WHERE namespace = ?1;

-- name: feed_delete
DELETE FROM fleetmem_feeds WHERE namespace = ?1;

-- name: changes_delete_namespace
DELETE FROM fleetmem_changes WHERE namespace = ?1;

-- name: change_insert
-- ?1 namespace, ?2 epoch, ?3 op, ?4 key, ?5 partition, ?6 version, ?7 value, ?8 expires_at,
-- ?9 at
INSERT INTO fleetmem_changes
    (namespace, epoch, op, key, partition, version, value, expires_at, at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9);

-- name: change_insert_sets
-- ?1 namespace, ?2 epoch, ?3 JSON array of keys just written (distinct), ?4 at.
-- One "set" per key, as the entry now stands: a set_many chunk is recorded by one statement
-- after its upsert (executemany cannot return rows). CROSS JOIN makes json_each the outer loop
-- (one primary-key seek per key, the changes in the array's order, no sort): left to itself
-- the planner may scan the namespace's entries instead, a hundred times slower.
INSERT INTO fleetmem_changes
    (namespace, epoch, op, key, partition, version, value, expires_at, at)
SELECT ?1, ?2, 'set', e.key, e.partition, e.version, e.value, e.expires_at, ?4
FROM json_each(?3) AS j
CROSS JOIN fleetmem_entries AS e ON e.namespace = ?1 AND e.key = j.value;

-- name: change_first_kept
-- ?1 namespace, ?2 cutoff: the first change (in feed order) written at or after the cutoff.
-- Walks the namespace's index from its oldest change, so it reads the trimmable prefix only.
SELECT id FROM fleetmem_changes WHERE namespace = ?1 AND at >= ?2 ORDER BY id LIMIT 1;

-- name: change_last_before
-- ?1 namespace, ?2 exclusive bound: the highest id below it (what a trim removes up to).
SELECT max(id) FROM fleetmem_changes WHERE namespace = ?1 AND id < ?2;

-- name: changes_trim
-- ?1 namespace, ?2 the highest id to remove
DELETE FROM fleetmem_changes WHERE namespace = ?1 AND id <= ?2;

-- name: feed_set_floor
UPDATE fleetmem_feeds SET floor = max(floor, ?2) WHERE namespace = ?1;

-- name: changes_after
-- ?1 namespace, ?2 exclusive lower id, ?3 limit
SELECT id, op, key, partition, version, value, expires_at, at FROM fleetmem_changes
WHERE namespace = ?1 AND id > ?2
ORDER BY id LIMIT ?3;
