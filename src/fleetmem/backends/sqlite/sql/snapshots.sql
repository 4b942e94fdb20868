-- SQL of SQLiteStore's named snapshots (schema version 5), as named blocks.
--
-- fleetmem_snapshots is the catalog: one row per snapshot of a namespace, seq 1, 2, ... in
-- creation order (greater is newer). fleetmem_snapshot_records holds the records of every
-- snapshot of the namespace (fleetmem.backends.seam.SnapshotBackend): a record is an entry as
-- fleetmem_entries held it (value, partition, version, created_at, updated_at, expires_at)
-- from snapshot from_seq to the one before to_seq; to_seq NULL: open, held by the newest
-- snapshot. Snapshot s holds the records with from_seq <= s AND (to_seq IS NULL OR s < to_seq).
-- Nothing else reads these tables: keys, search, stats, namespaces, exports and clear() read
-- fleetmem_entries only, and no statement here records a change in the change feed.
--
-- A create or a delete is one BEGIN IMMEDIATE transaction (the write lock serialises them
-- across processes and holds the live entries still while the create reads them). Times are
-- integer milliseconds on this process's wall clock; an entry is live while expires_at IS NULL
-- OR expires_at > now, as in sql/kv.sql.

-- name: create_snapshots
CREATE TABLE IF NOT EXISTS fleetmem_snapshots (
    namespace  TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    keys       INTEGER NOT NULL,  -- live entries when it was taken
    bytes      INTEGER NOT NULL,  -- sum of the records it added (seam.record_bytes)
    PRIMARY KEY (namespace, name),
    UNIQUE (namespace, seq)
);

-- name: create_snapshot_records
CREATE TABLE IF NOT EXISTS fleetmem_snapshot_records (
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    from_seq   INTEGER NOT NULL,
    to_seq     INTEGER,           -- NULL: open (held by the newest snapshot)
    value      BLOB    NOT NULL,  -- as fleetmem_entries stores it (compact UTF-8 JSON)
    partition  TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,           -- NULL: persistent
    bytes      INTEGER NOT NULL,  -- seam.record_bytes of the record
    PRIMARY KEY (namespace, key, from_seq)
);

-- name: create_snapshot_records_index
-- The records of a namespace by end: the open ones (to_seq IS NULL) in key order, seekable by
-- key (a create's comparison with the live entries), and those closed after a given seq (the
-- reopening when the newest snapshot is deleted).
CREATE INDEX IF NOT EXISTS fleetmem_snapshot_records_open
    ON fleetmem_snapshot_records (namespace, to_seq, key);

-- name: snapshot_row
-- ?1 namespace, ?2 name
SELECT name, seq, created_at, keys, bytes FROM fleetmem_snapshots
WHERE namespace = ?1 AND name = ?2;

-- name: snapshot_list
-- ?1 namespace
SELECT name, seq, created_at, keys, bytes FROM fleetmem_snapshots
WHERE namespace = ?1 ORDER BY created_at, seq;

-- name: snapshot_next_seq
-- ?1 namespace
SELECT coalesce(max(seq), 0) + 1 FROM fleetmem_snapshots WHERE namespace = ?1;

-- name: snapshot_close_records
-- ?1 namespace, ?2 the new seq, ?3 now. Close every open record whose key has no live entry
-- equal to it in every field (one walk of the open records, one primary-key seek each).
UPDATE fleetmem_snapshot_records AS r SET to_seq = ?2
WHERE r.namespace = ?1 AND r.to_seq IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM fleetmem_entries AS e
      WHERE e.namespace = ?1 AND e.key = r.key
        AND (e.expires_at IS NULL OR e.expires_at > ?3)
        AND e.value = r.value AND e.partition = r.partition AND e.version = r.version
        AND e.created_at = r.created_at AND e.updated_at = r.updated_at
        AND e.expires_at IS r.expires_at);

-- name: snapshot_add_records
-- ?1 namespace, ?2 the new seq, ?3 now. A record from ?2 for every live entry without an open
-- record: after snapshot_close_records, the open records left are exactly those equal to a
-- live entry. bytes: the key, the stored value (compact JSON) and the partition in UTF-8
-- bytes, + 48 (seam.RECORD_OVERHEAD).
INSERT INTO fleetmem_snapshot_records
    (namespace, key, from_seq, to_seq, value, partition, version, created_at, updated_at,
     expires_at, bytes)
SELECT ?1, e.key, ?2, NULL, e.value, e.partition, e.version, e.created_at, e.updated_at,
       e.expires_at,
       length(CAST(e.key AS BLOB)) + length(CAST(e.value AS BLOB))
           + length(CAST(e.partition AS BLOB)) + 48
FROM fleetmem_entries AS e
WHERE e.namespace = ?1 AND (e.expires_at IS NULL OR e.expires_at > ?3)
  AND NOT EXISTS (
      SELECT 1 FROM fleetmem_snapshot_records AS r
      WHERE r.namespace = ?1 AND r.to_seq IS NULL AND r.key = e.key);

-- name: snapshot_insert
-- ?1 namespace, ?2 name, ?3 seq, ?4 now. The catalog row, written last: keys = the live
-- entries, bytes = the sum over the records just added (open, from ?3).
INSERT INTO fleetmem_snapshots (namespace, name, seq, created_at, keys, bytes)
VALUES (
    ?1, ?2, ?3, ?4,
    (SELECT count(*) FROM fleetmem_entries
     WHERE namespace = ?1 AND (expires_at IS NULL OR expires_at > ?4)),
    (SELECT coalesce(sum(bytes), 0) FROM fleetmem_snapshot_records
     WHERE namespace = ?1 AND to_seq IS NULL AND from_seq = ?3))
RETURNING name, seq, created_at, keys, bytes;

-- name: snapshot_neighbours
-- ?1 namespace, ?2 name: its seq, the greatest seq below it (0: none) and the least above it
-- (NULL: it is the newest).
SELECT s.seq,
       (SELECT coalesce(max(seq), 0) FROM fleetmem_snapshots
        WHERE namespace = ?1 AND seq < s.seq),
       (SELECT min(seq) FROM fleetmem_snapshots WHERE namespace = ?1 AND seq > s.seq)
FROM fleetmem_snapshots AS s WHERE s.namespace = ?1 AND s.name = ?2;

-- name: snapshot_free_records
-- ?1 namespace, ?2 the deleted seq s, ?3 the previous seq p (0: none), ?4 the next seq n
-- (NULL: none). The records s holds that neither p nor n holds.
DELETE FROM fleetmem_snapshot_records
WHERE namespace = ?1 AND from_seq > ?3 AND from_seq <= ?2
  AND (to_seq IS NULL OR to_seq > ?2)
  AND (?4 IS NULL OR to_seq <= ?4);

-- name: snapshot_delete
-- ?1 namespace, ?2 name
DELETE FROM fleetmem_snapshots WHERE namespace = ?1 AND name = ?2;

-- name: snapshot_reopen_records
-- ?1 namespace, ?2 the seq that is now the newest (0: none). After the newest snapshot was
-- deleted: every record closed after ?2 is held by ?2 (what no remaining snapshot held was
-- freed), so it is open again. That is the records closed at the deleted seq, and also those
-- closed at the seq of a snapshot deleted earlier between the two.
UPDATE fleetmem_snapshot_records SET to_seq = NULL
WHERE namespace = ?1 AND to_seq > ?2;

-- name: snapshot_page
-- ?1 namespace, ?2 inclusive lower bound, ?3 exclusive upper bound, ?4 seq, ?5 limit
SELECT key, value, partition, version, created_at, updated_at, expires_at
FROM fleetmem_snapshot_records
WHERE namespace = ?1 AND key >= ?2 AND key < ?3
  AND from_seq <= ?4 AND (to_seq IS NULL OR to_seq > ?4)
ORDER BY key LIMIT ?5;

-- name: snapshot_page_in_partition
-- as snapshot_page, ?6 partition
SELECT key, value, partition, version, created_at, updated_at, expires_at
FROM fleetmem_snapshot_records
WHERE namespace = ?1 AND partition = ?6 AND key >= ?2 AND key < ?3
  AND from_seq <= ?4 AND (to_seq IS NULL OR to_seq > ?4)
ORDER BY key LIMIT ?5;

-- name: snapshot_usage
-- ?1 namespace
SELECT count(*), coalesce(sum(bytes), 0) FROM fleetmem_snapshot_records WHERE namespace = ?1;
