-- The snapshots of a namespace (migration 0006), one named block each ("-- name: NAME").
-- {table} is the entries table, {snapshots} the catalog and {snapshot_records} the records
-- (snapshots.py replaces the last two). $1 is always the namespace. A record is held by the
-- snapshots s with from_seq <= s AND (to_seq IS NULL OR s < to_seq); records with to_seq NULL
-- are open: they hold the newest snapshot's entries (see fleetmem.backends.seam.SnapshotBackend).
-- Creates and deletes run in a transaction that first takes the namespace's snapshot lock
-- (`lock`), so that every statement after it sees the catalog as the last one left it.

-- name: lock
-- The namespace's transaction advisory lock for creates and deletes ("flms", then the
-- namespace's hash): a lock space apart from the change feed's ("flmf") and the migrations'.
SELECT pg_advisory_xact_lock(1718382963, hashtext($1))

-- name: head
-- After the lock: the newest seq (0 when none), and whether $2 is a name already taken.
SELECT coalesce(max(seq), 0) AS newest, coalesce(bool_or(name = $2), false) AS taken
FROM {snapshots} WHERE namespace = $1

-- name: create
-- Snapshot $3 with seq $2 (the newest + 1) in ONE statement, hence one MVCC snapshot of the
-- entries table: every CTE reads the state as of the statement's start, whatever writers do
-- meanwhile (and nobody waits: the entries are read, never locked). `pair` joins the live
-- entries (expiry judged at the statement's time, the instant of the view) with the open
-- records by key; `closed` closes (to_seq = $2) the open records whose key is gone or whose
-- entry differs in any field; `added` inserts a record from $2 for every live entry without an
-- equal open record (both see the records as they were before the statement); `cat` writes
-- the catalog row: keys = the live entries, bytes = the sum of the added records' bytes. A
-- record's bytes are record_bytes of the seam: key, partition, 48, and the value's compact
-- JSON -- jsonb's text without the blank it writes after each ':' and ',' outside strings.
-- created_at is the statement's time on the server's clock: later than that of the create
-- before it, which committed before this transaction got the lock.
WITH live AS (
    SELECT key, value, partition, version, created_at, updated_at, expires_at
    FROM {table}
    WHERE namespace = $1 AND (expires_at IS NULL OR expires_at > statement_timestamp())
), open AS (
    SELECT ctid, key, value, partition, version, created_at, updated_at, expires_at
    FROM {snapshot_records}
    WHERE namespace = $1 AND to_seq IS NULL
), pair AS MATERIALIZED (
    SELECT coalesce(l.key, o.key) AS key,
           l.key IS NOT NULL AS is_live,
           o.key IS NOT NULL AS is_open,
           o.ctid AS open_row,
           coalesce(l.value = o.value AND l.partition = o.partition
                    AND l.version = o.version AND l.created_at = o.created_at
                    AND l.updated_at = o.updated_at
                    AND l.expires_at IS NOT DISTINCT FROM o.expires_at, false) AS same,
           l.value, l.partition, l.version, l.created_at, l.updated_at, l.expires_at
    FROM live l FULL JOIN open o ON o.key = l.key
), closed AS (
    -- The rows to close by their ctid, as one array computed once (a TID scan, whatever the
    -- statistics say) -- not a join with `pair` by key: on tables whose statistics lag (new,
    -- or grown since the last analyze) the planner took `pair` for a few rows and scanned it
    -- once per open record, a create quadratic in the namespace's size. The ctids are those
    -- this statement's snapshot read, and nobody else updates these rows (the lock); no
    -- other condition, which would let the planner scan an index and test each ctid.
    UPDATE {snapshot_records} r SET to_seq = $2
    WHERE r.ctid = ANY (ARRAY(SELECT p.open_row FROM pair p WHERE p.is_open AND NOT p.same))
    RETURNING r.key
), added AS (
    INSERT INTO {snapshot_records} AS r
        (namespace, key, from_seq, to_seq, value, partition, version, created_at, updated_at,
         expires_at, bytes)
    SELECT $1, p.key, $2, NULL, p.value, p.partition, p.version, p.created_at, p.updated_at,
           p.expires_at,
           octet_length(p.key) + octet_length(p.partition) + 48
           + octet_length(j.js) - j.blanks
    FROM pair p
    CROSS JOIN LATERAL (
        -- The blanks outside strings: none in a scalar; in an object or an array, those of
        -- the pieces between strings (split at the quotes once the escapes \\ and \" are
        -- removed, the odd pieces are outside strings). Faster than a regular expression.
        SELECT t.js,
               CASE WHEN jsonb_typeof(p.value) NOT IN ('object', 'array') THEN 0
                    WHEN strpos(t.js, '"') = 0 THEN length(t.js) - length(replace(t.js, ' ', ''))
                    ELSE (SELECT coalesce(sum(length(u.piece)
                                              - length(replace(u.piece, ' ', ''))), 0)
                          FROM unnest(string_to_array(
                                   replace(replace(t.js, '\\', ''), '\"', ''), '"'))
                               WITH ORDINALITY AS u(piece, n)
                          WHERE u.n % 2 = 1) END AS blanks
        FROM (SELECT p.value::text AS js) t
    ) j
    WHERE p.is_live AND NOT p.same
    RETURNING r.bytes
), cat AS (
    INSERT INTO {snapshots} (namespace, name, seq, created_at, keys, bytes)
    SELECT $1, $3, $2, statement_timestamp(),
           (SELECT count(*) FROM pair WHERE is_live),
           (SELECT coalesce(sum(bytes), 0) FROM added)
    RETURNING name, seq, created_at, keys, bytes
)
SELECT name, seq, created_at, keys, bytes, (SELECT count(*) FROM closed) AS closed FROM cat

-- name: bounds
-- After the lock: snapshot $2's seq, the greatest seq below it (0: none) and the least above
-- it (NULL: it is the newest). No row: there is no such snapshot.
SELECT s.seq,
       coalesce((SELECT max(b.seq) FROM {snapshots} b
                 WHERE b.namespace = $1 AND b.seq < s.seq), 0) AS below,
       (SELECT min(a.seq) FROM {snapshots} a WHERE a.namespace = $1 AND a.seq > s.seq) AS above
FROM {snapshots} s WHERE s.namespace = $1 AND s.name = $2

-- name: delete_newest
-- Delete snapshot $2, the newest, whose predecessor is $3 (0: none): its records that the
-- predecessor does not hold (the open ones from above $3) go, the records closed above $3 are
-- open again (the predecessor's entries are the newest again), then the catalog row. The three
-- touch different rows. "Closed above $3", not "closed at $2": a record may have been closed
-- at the seq of a snapshot deleted earlier, which the next create reuses; every record left is
-- held by a remaining snapshot, so one closed above $3 is held by $3.
WITH freed AS (
    DELETE FROM {snapshot_records}
    WHERE namespace = $1 AND to_seq IS NULL AND from_seq > $3
), reopened AS (
    UPDATE {snapshot_records} SET to_seq = NULL
    WHERE namespace = $1 AND to_seq > $3
)
DELETE FROM {snapshots} WHERE namespace = $1 AND seq = $2

-- name: delete_between
-- Delete snapshot $2, with $3 the greatest seq below it (0: none) and $4 the least above it:
-- its records that neither of those holds (from above $3, closed at or before $4) go, then the
-- catalog row.
WITH freed AS (
    DELETE FROM {snapshot_records}
    WHERE namespace = $1 AND to_seq > $2 AND to_seq <= $4 AND from_seq > $3 AND from_seq <= $2
)
DELETE FROM {snapshots} WHERE namespace = $1 AND seq = $2

-- name: list
SELECT name, seq, created_at, keys, bytes FROM {snapshots}
WHERE namespace = $1
ORDER BY created_at, seq

-- name: get
SELECT name, seq, created_at, keys, bytes FROM {snapshots}
WHERE namespace = $1 AND name = $2

-- name: seq
SELECT seq FROM {snapshots} WHERE namespace = $1 AND name = $2

-- name: page
-- One page of snapshot $6: the records it holds with keys in the prefix range [$2, $3) above
-- $4 (exclusive; '' for the first page), ascending, at most $5 -- by the primary key (at most
-- one record of a key is held by a snapshot). The columns are Entry's fields, in order.
SELECT key, value, partition, version, created_at, updated_at, expires_at
FROM {snapshot_records}
WHERE namespace = $1 AND key >= $2 AND key < $3 AND key > $4
  AND from_seq <= $6 AND (to_seq IS NULL OR to_seq > $6)
ORDER BY key
LIMIT $5

-- name: page_partition
SELECT key, value, partition, version, created_at, updated_at, expires_at
FROM {snapshot_records}
WHERE namespace = $1 AND key >= $2 AND key < $3 AND key > $4
  AND from_seq <= $6 AND (to_seq IS NULL OR to_seq > $6) AND partition = $7
ORDER BY key
LIMIT $5

-- name: usage
SELECT count(*) AS records, coalesce(sum(bytes), 0)::bigint AS bytes
FROM {snapshot_records} WHERE namespace = $1
