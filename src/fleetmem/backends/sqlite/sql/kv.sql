-- SQL of SQLiteStore, as named blocks loaded once by fleetmem.backends.sqlite.
--
-- Parameters are numbered (?1, ?2 ...) and always bound, never formatted in. Times are integer
-- milliseconds since the Unix epoch on this process's wall clock; an entry is live while
-- expires_at IS NULL OR expires_at > now. Keys compare with SQLite's BINARY collation, which on
-- UTF-8 text is code-point order.
--
-- A write that may record a change in the namespace's change feed (sql/changes.sql) returns,
-- as its last column, the feed's epoch: (SELECT epoch FROM fleetmem_feeds WHERE namespace =
-- ?1), NULL when the feed is not enabled. Asked inside the write statement, under the write
-- lock, that probe costs a B-tree seek and no round trip of its own.

-- name: meta_table_exists
SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fleetmem_meta';

-- name: create_meta
CREATE TABLE IF NOT EXISTS fleetmem_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- name: read_schema_version
SELECT value FROM fleetmem_meta WHERE name = 'schema_version';

-- name: write_schema_version
INSERT INTO fleetmem_meta (name, value) VALUES ('schema_version', ?1);

-- name: update_schema_version
UPDATE fleetmem_meta SET value = ?1 WHERE name = 'schema_version';

-- name: create_entries
CREATE TABLE IF NOT EXISTS fleetmem_entries (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    partition  TEXT    NOT NULL,
    value      BLOB    NOT NULL,  -- compact UTF-8 JSON
    version    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,           -- NULL: persistent
    PRIMARY KEY (namespace, key)
);

-- name: create_partition_index
CREATE INDEX IF NOT EXISTS fleetmem_entries_partition
    ON fleetmem_entries (namespace, partition, key);

-- name: create_expiry_index
CREATE INDEX IF NOT EXISTS fleetmem_entries_expiry
    ON fleetmem_entries (namespace, expires_at) WHERE expires_at IS NOT NULL;

-- name: check_json
SELECT json_array_length('[1]');

-- name: select_one
SELECT 1;

-- name: journal_mode_wal
PRAGMA journal_mode = WAL;

-- name: journal_mode
PRAGMA journal_mode;

-- name: synchronous_normal
PRAGMA synchronous = NORMAL;

-- name: synchronous_full
PRAGMA synchronous = FULL;

-- name: query_only
PRAGMA query_only = ON;

-- name: begin_immediate
BEGIN IMMEDIATE;

-- name: begin
BEGIN;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;

-- name: get_value
-- ?1 namespace, ?2 key, ?3 now
SELECT value FROM fleetmem_entries
WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3);

-- name: get_entry
-- ?1 namespace, ?2 key, ?3 now
SELECT value, partition, version, created_at, updated_at, expires_at FROM fleetmem_entries
WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3);

-- name: get_entries
-- ?1 namespace, ?2 JSON array of keys, ?3 now
SELECT key, value, partition, version, created_at, updated_at, expires_at FROM fleetmem_entries
WHERE namespace = ?1 AND key IN (SELECT value FROM json_each(?2))
  AND (expires_at IS NULL OR expires_at > ?3);

-- name: live_keys_among
-- ?1 namespace, ?2 JSON array of keys, ?3 now: those with a live entry
SELECT key FROM fleetmem_entries
WHERE namespace = ?1 AND key IN (SELECT value FROM json_each(?2))
  AND (expires_at IS NULL OR expires_at > ?3);

-- name: get_many
-- ?1 namespace, ?2 JSON array of keys, ?3 now
SELECT key, value FROM fleetmem_entries
WHERE namespace = ?1 AND key IN (SELECT value FROM json_each(?2))
  AND (expires_at IS NULL OR expires_at > ?3);

-- name: get_version
-- ?1 namespace, ?2 key, ?3 now
SELECT version FROM fleetmem_entries
WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3);

-- name: get_expiry
-- ?1 namespace, ?2 key, ?3 now
SELECT expires_at FROM fleetmem_entries
WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?3);

-- name: keys
-- ?1 namespace, ?2 inclusive lower bound, ?3 exclusive upper bound, ?4 now, ?5 limit (-1: none)
SELECT key FROM fleetmem_entries
WHERE namespace = ?1 AND key >= ?2 AND key < ?3 AND (expires_at IS NULL OR expires_at > ?4)
ORDER BY key LIMIT ?5;

-- name: keys_in_partition
-- as keys, ?6 partition
SELECT key FROM fleetmem_entries
WHERE namespace = ?1 AND partition = ?6 AND key >= ?2 AND key < ?3
  AND (expires_at IS NULL OR expires_at > ?4)
ORDER BY key LIMIT ?5;

-- name: scan
-- ?1 namespace, ?2 inclusive lower bound, ?3 exclusive upper bound, ?4 now
SELECT key, value FROM fleetmem_entries
WHERE namespace = ?1 AND key >= ?2 AND key < ?3 AND (expires_at IS NULL OR expires_at > ?4)
ORDER BY key;

-- name: scan_partition
-- as scan, ?5 partition
SELECT key, value FROM fleetmem_entries
WHERE namespace = ?1 AND partition = ?5 AND key >= ?2 AND key < ?3
  AND (expires_at IS NULL OR expires_at > ?4)
ORDER BY key;

-- name: partitions
-- ?1 namespace, ?2 now
SELECT DISTINCT partition FROM fleetmem_entries
WHERE namespace = ?1 AND (expires_at IS NULL OR expires_at > ?2)
ORDER BY partition;

-- name: stats_live
-- ?1 namespace, ?2 now
SELECT partition, count(*), coalesce(sum(length(value)), 0) FROM fleetmem_entries
WHERE namespace = ?1 AND (expires_at IS NULL OR expires_at > ?2)
GROUP BY partition ORDER BY partition;

-- name: stats_expired
-- ?1 namespace, ?2 now
SELECT count(*) FROM fleetmem_entries WHERE namespace = ?1 AND expires_at <= ?2;

-- name: upsert
-- ?1 namespace, ?2 key, ?3 partition (NULL: keep a live entry's, 'default' for a new one),
-- ?4 payload, ?5 now, ?6 expires_at (NULL: none), ?7 keep_ttl (1: keep a live entry's expiry).
-- An expired row counts as absent: it is overwritten as a new entry (version 1).
INSERT INTO fleetmem_entries AS e
    (namespace, key, partition, value, version, created_at, updated_at, expires_at)
VALUES (?1, ?2, coalesce(?3, 'default'), ?4, 1, ?5, ?5, ?6)
ON CONFLICT (namespace, key) DO UPDATE SET
    value = excluded.value,
    partition = CASE WHEN e.expires_at <= ?5 THEN excluded.partition
                     ELSE coalesce(?3, e.partition) END,
    version = CASE WHEN e.expires_at <= ?5 THEN 1 ELSE e.version + 1 END,
    created_at = CASE WHEN e.expires_at <= ?5 THEN ?5 ELSE e.created_at END,
    updated_at = ?5,
    expires_at = CASE WHEN ?7 AND (e.expires_at IS NULL OR e.expires_at > ?5) THEN e.expires_at
                      ELSE ?6 END

-- name: returning_meta
RETURNING partition, version, created_at, updated_at, expires_at,
    (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1);

-- name: insert_if_absent
-- ?1 namespace, ?2 key, ?3 partition or NULL, ?4 payload, ?5 now, ?6 expires_at or NULL.
-- Writes only over a missing or expired row; returns a row (the feed's epoch) when it wrote.
INSERT INTO fleetmem_entries AS e
    (namespace, key, partition, value, version, created_at, updated_at, expires_at)
VALUES (?1, ?2, coalesce(?3, 'default'), ?4, 1, ?5, ?5, ?6)
ON CONFLICT (namespace, key) DO UPDATE SET
    value = excluded.value,
    partition = excluded.partition,
    version = 1,
    created_at = ?5,
    updated_at = ?5,
    expires_at = ?6
WHERE e.expires_at <= ?5
RETURNING (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1);

-- name: delete
-- ?1 namespace, ?2 key; returns the deleted row's expiry (to tell a live row from an expired),
-- its partition and the feed's epoch
DELETE FROM fleetmem_entries WHERE namespace = ?1 AND key = ?2
RETURNING expires_at, partition, (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1);

-- name: delete_many
-- ?1 namespace, ?2 JSON array of keys
DELETE FROM fleetmem_entries
WHERE namespace = ?1 AND key IN (SELECT value FROM json_each(?2))
RETURNING expires_at, key, partition, (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1);

-- name: set_expiry
-- ?1 namespace, ?2 key, ?3 new expires_at or NULL, ?4 now, ?5 the version the entry must have
-- (NULL: any); returns a row when the key was live (at that version)
UPDATE fleetmem_entries SET expires_at = ?3
WHERE namespace = ?1 AND key = ?2 AND (expires_at IS NULL OR expires_at > ?4)
  AND (?5 IS NULL OR version = ?5)
RETURNING version, partition, (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1);

-- name: count_live
-- ?1 namespace, ?2 now; with the feed's epoch (clear)
SELECT count(*), (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1) FROM fleetmem_entries
WHERE namespace = ?1 AND (expires_at IS NULL OR expires_at > ?2);

-- name: count_live_in_partition
-- ?1 namespace, ?2 now, ?3 partition; with the feed's epoch (clear)
SELECT count(*), (SELECT epoch FROM fleetmem_feeds WHERE namespace = ?1) FROM fleetmem_entries
WHERE namespace = ?1 AND partition = ?3 AND (expires_at IS NULL OR expires_at > ?2);

-- name: delete_namespace
DELETE FROM fleetmem_entries WHERE namespace = ?1;

-- name: delete_partition
DELETE FROM fleetmem_entries WHERE namespace = ?1 AND partition = ?2;

-- name: delete_expired
-- ?1 namespace, ?2 now
DELETE FROM fleetmem_entries WHERE namespace = ?1 AND expires_at <= ?2;

-- name: namespaces
-- ?1 inclusive lower bound (the prefix), ?2 exclusive upper bound, ?3 exclusive cursor ('' for
-- none), ?4 now, ?5 limit (-1: none), ?6 the reserved prefix as a GLOB ('_fleetmem*').
-- A loose index scan of the primary key's index (namespace, key): each step is one seek to
-- the next namespace (min() over an index range), never a pass over a namespace's entries.
-- A namespace is live if the expiry index has an entry of it expiring after now (one seek),
-- else if it has a persistent entry (a walk of its rows that stops at the first persistent
-- one: it passes over expired rows only, which cleanup_expired frees).
WITH RECURSIVE ns(name) AS (
    SELECT (SELECT min(namespace) FROM fleetmem_entries
            WHERE namespace >= ?1 AND namespace < ?2 AND namespace > ?3)
    UNION ALL
    SELECT (SELECT min(namespace) FROM fleetmem_entries
            WHERE namespace > ns.name AND namespace < ?2)
    FROM ns WHERE ns.name IS NOT NULL
)
SELECT name FROM ns
WHERE name IS NOT NULL AND name NOT GLOB ?6
  AND (EXISTS (SELECT 1 FROM fleetmem_entries e
               WHERE e.namespace = ns.name AND e.expires_at > ?4)
       OR EXISTS (SELECT 1 FROM fleetmem_entries e
                  WHERE e.namespace = ns.name AND e.expires_at IS NULL))
LIMIT ?5;

-- ---------------------------------------------------------------- export and import
-- Exports read in a session of their own (one read transaction: one snapshot), keyset pages.

-- name: export_page
-- ?1 namespace, ?2 inclusive lower bound, ?3 exclusive upper bound, ?4 now, ?5 limit
SELECT key, value, partition, version, created_at, updated_at, expires_at FROM fleetmem_entries
WHERE namespace = ?1 AND key >= ?2 AND key < ?3 AND (expires_at IS NULL OR expires_at > ?4)
ORDER BY key LIMIT ?5;

-- name: export_page_in_partition
-- as export_page, ?6 partition
SELECT key, value, partition, version, created_at, updated_at, expires_at FROM fleetmem_entries
WHERE namespace = ?1 AND partition = ?6 AND key >= ?2 AND key < ?3
  AND (expires_at IS NULL OR expires_at > ?4)
ORDER BY key LIMIT ?5;

-- name: replace_delete_range
-- ?1 namespace, ?2 inclusive lower bound, ?3 exclusive upper bound, ?4 JSON array of keys to
-- keep (those the replace just wrote), ?5 limit: delete the first ?5 other keys of the range,
-- in key order (one walk of the primary key from ?2, never past ?3). Returns each deleted
-- row's expiry (a live row is a change, an expired one is not), key and partition.
DELETE FROM fleetmem_entries
WHERE namespace = ?1 AND key IN (
    SELECT key FROM fleetmem_entries
    WHERE namespace = ?1 AND key >= ?2 AND key < ?3
      AND key NOT IN (SELECT value FROM json_each(?4))
    ORDER BY key LIMIT ?5)
RETURNING expires_at, key, partition;
