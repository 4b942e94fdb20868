-- The change feed, one named block each ("-- name: NAME"). {feeds} is the feed table, {changes}
-- the change table, {changes_read} the read function of migration 0005 (which trims, numbers
-- and returns changes in one round trip); {channel} the table's NOTIFY channel. $1 is always the
-- namespace. Recording is done by the writes themselves (sql/kv.sql).

-- name: enable
-- A new row takes the next epoch (the identity sequence): greater than any before it, so the
-- cursors of an earlier feed of the namespace are expired. An enabled feed only gets the
-- retention ($2, in ms).
INSERT INTO {feeds} (namespace, retention_ms) VALUES ($1, $2)
ON CONFLICT (namespace) DO UPDATE SET retention_ms = EXCLUDED.retention_ms

-- name: disable
-- The flag and the whole log (every epoch), in one statement; watchers asleep in other
-- processes are woken (they read, and learn that the feed is gone). The log is deleted through
-- its two partial indexes: numbered rows, then pending ones. Changes a write inserts after
-- this statement's snapshot (it saw the feed before this commit) are of a stale epoch, never
-- read, and deleted by the sweeper.
WITH feed AS (
    DELETE FROM {feeds} WHERE namespace = $1 RETURNING watched_until > now() AS watched
), numbered AS (
    DELETE FROM {changes}
    WHERE namespace = $1 AND pos IS NOT NULL AND EXISTS (SELECT FROM feed)
), pending AS (
    DELETE FROM {changes}
    WHERE namespace = $1 AND pos IS NULL AND EXISTS (SELECT FROM feed)
)
SELECT (SELECT pg_notify('{channel}', '~' || $1) FROM feed WHERE watched)

-- name: enabled
SELECT 1 FROM {feeds} WHERE namespace = $1

-- name: read
-- $2 epoch, $3 after (NULL, NULL: from the oldest retained), $4 limit. A header row (epoch,
-- head as pos, floor as version), then the changes; none at all when the feed is not enabled.
SELECT * FROM {changes_read}($1, $2, $3, $4, true)

-- name: head
-- The header alone, after numbering what is committed (so that the head covers it).
SELECT epoch, pos FROM {changes_read}($1, NULL, NULL, 0, false)

-- name: mark
-- A watcher is about to sleep: writers NOTIFY until $2 ms from now (never shortened).
UPDATE {feeds} SET watched_until = greatest(watched_until, now() + $2::bigint * interval '1 ms')
WHERE namespace = $1
RETURNING epoch, head

-- name: pending
-- After a mark committed: has anything been recorded after ($2, $3) that the watcher has not
-- read? A changed epoch or a gone feed counts (the next read says what happened).
SELECT coalesce(
    (SELECT f.epoch <> $2 OR f.head > $3
            OR EXISTS (SELECT FROM {changes} c
                       WHERE c.namespace = $1 AND c.epoch = f.epoch AND c.pos IS NULL)
     FROM {feeds} f WHERE f.namespace = $1),
    true)

-- name: feeds
-- The sweeper: every enabled feed of the table.
SELECT namespace FROM {feeds} ORDER BY namespace

-- name: trim
-- The sweeper, per feed: trim what is past retention and number what is committed.
SELECT count(*) FROM {changes_read}($1, NULL, NULL, 0, true)

-- name: sweep_stale
-- The sweeper: pending changes of a stale epoch (recorded by a write that saw a feed a disable
-- removed meanwhile), a bounded batch ($1) at a time, through the index of pending changes.
WITH doomed AS (
    SELECT c.ctid FROM {changes} c
    WHERE c.pos IS NULL
      AND NOT EXISTS (SELECT FROM {feeds} f WHERE f.namespace = c.namespace
                                              AND f.epoch = c.epoch)
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM {changes} WHERE ctid IN (SELECT ctid FROM doomed) RETURNING 1
)
SELECT count(*) FROM gone
