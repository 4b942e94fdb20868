"""Change feeds: the feed flags, the change log, and the functions that read and clear.

Revision ID: 0005
Revises: 0004
Create Date: 2027-02-02

Next to the entries table ``T`` (same schema, names derived from ``T``, see
``fleetmem.backends.postgres.migrate.feed_names``):

* ``T_feeds``: one row per namespace whose feed is enabled (the server-side flag every write
  looks up, once per statement): its ``epoch`` (from the identity sequence ``T_feeds_epoch_seq``,
  so an ``enable`` after a ``disable`` starts a greater one), ``retention_ms``, ``head`` (the
  last position handed out), ``floor`` (the highest position trimmed) and ``watched_until``
  (writers ``NOTIFY`` only while it is in the future: a watcher is asleep).
* ``T_changes``: one row per recorded change, inserted by the write's own statement with
  ``pos`` NULL and ``id`` from the identity sequence ``T_changes_id_seq``. Positions are given
  after commit by the reader's sequencer (``T_changes_read``), never by writers, so writers are
  not serialised. The sequence must keep ``CACHE 1``: the order argument below needs every id
  drawn after another one's commit to be greater, which per-session caches would break.
  Indexes, both partial: ``T_changes_pos_idx`` (unique, ``(namespace, epoch, pos)`` of
  sequenced rows) serves reads and trimming; ``T_changes_pending_idx`` (``(namespace, epoch,
  id)`` of rows not sequenced yet) serves the sequencer. A write touches only the second.
* ``T_changes_read(ns, epoch, after, lim, trim)``: one round trip for a read (or ``head``,
  with ``lim`` 0). It reads the feed row and checks cheaply, without a lock and in the same
  statement (one snapshot, so that a head seen with nothing left to number is current),
  whether there is anything to trim or to sequence; only then it locks the feed row ``FOR
  UPDATE`` (serialising sequencers), trims the prefix of positions older than the retention
  (``floor`` becomes the highest trimmed), and in a new statement -- a fresh READ COMMITTED
  snapshot -- gives every visible unsequenced change of the current epoch ``pos = head +
  row_number() OVER (ORDER BY id)`` and advances ``head``.
  It returns a header row (``epoch``, ``pos`` = head, ``version`` = floor, ``op`` NULL), then up
  to ``lim`` changes after ``after`` when that is a position of the current epoch between floor
  and head (or ``after`` is NULL: from the floor); the caller validates the cursor against the
  header. No header row: the feed is not enabled.

  Why positions follow the order writes took effect: two writes of one key are ordered by the
  key's row lock, so the later one draws its change id after the earlier one committed (it
  waited for the row): the later id is greater. A sequencer that sees the later change sees the
  earlier one too (committed before), so within a batch id order keeps per-key order, and a
  change committed after a sequencer's snapshot gets a later batch, hence a greater position.
  A reader never sees a position below one it was given: positions are only handed out above
  ``head``, under the lock, and committed with it.
* ``T_clear(ns, partition)``: ``clear``/``clear_partition``. A clear removes the rows its
  snapshot sees, so a concurrent insert of a new key that its snapshot misses must come after
  its change in the feed. Every recording write holds a transaction advisory lock on the
  namespace in shared mode (taken by the statement before it writes); the clear function takes
  it exclusively, then deletes in a new statement: the writes that recorded before it are
  committed and seen (their ids are smaller), the later ones wait for its commit (greater ids).
  A namespace without a feed takes no lock.

Both tables are logged: a change is as durable as its write.

Privileges: every write reads ``T_feeds`` and may insert into ``T_changes``, so a role that may
write ``T`` must get them too. The upgrade grants ``SELECT, INSERT, UPDATE, DELETE`` on both
tables and ``EXECUTE`` on both functions to every role (or ``PUBLIC``) that holds ``INSERT``,
``UPDATE`` or ``DELETE`` on ``T`` when it runs; a role granted later needs them granted too (see
``docs/backends/postgres.md``). The change ids' identity sequence needs no grant.
"""

from __future__ import annotations

from alembic import context, op

from fleetmem.backends.postgres.migrate import feed_names, notify_channel, quote_ident

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: The first key of the transaction advisory lock of a namespace's feed ("flmf"); the second is
#: ``hashtext(namespace)``. The two-key form has a lock space of its own, apart from the bigint
#: form (migrations' lock).
FEED_LOCK_CLASS = 1718382950


def _derived(name: str) -> str:
    """``name`` -- the validated table name and a fixed suffix of ``[a-z_]`` -- double-quoted
    whole (it may pass the 40 characters of a checked identifier; never PostgreSQL's 63)."""
    if len(name) > 63:  # pragma: no cover - table names are at most 40 characters
        raise ValueError(f"{name!r} is longer than PostgreSQL's 63 bytes")
    return f'"{name}"'


def _names() -> tuple[str, str, str, str, str, str, str]:
    attrs = context.config.attributes
    schema, table = attrs["fleetmem_schema"], attrs["fleetmem_table"]
    feeds, changes, read, clear = feed_names(table)
    return (
        quote_ident(schema),
        table,
        feeds,
        changes,
        read,
        clear,
        notify_channel(schema, table),
    )


def upgrade() -> None:
    schema, table, feeds, changes, read, clear, channel = _names()
    entries = f"{schema}.{quote_ident(table)}"
    feeds_t = f"{schema}.{_derived(feeds)}"
    changes_t = f"{schema}.{_derived(changes)}"
    op.execute(
        f"""
        CREATE TABLE {feeds_t} (
            namespace      text        COLLATE "C" NOT NULL,
            epoch          bigint      GENERATED BY DEFAULT AS IDENTITY,
            retention_ms   bigint      NOT NULL,
            head           bigint      NOT NULL DEFAULT 0,
            floor          bigint      NOT NULL DEFAULT 0,
            watched_until  timestamptz,
            CONSTRAINT {_derived(feeds + "_pkey")} PRIMARY KEY (namespace)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE {changes_t} (
            id          bigint      GENERATED ALWAYS AS IDENTITY (CACHE 1),
            epoch       bigint      NOT NULL,
            pos         bigint,
            version     bigint,
            at          timestamptz NOT NULL,
            expires_at  timestamptz,
            op          "char"      NOT NULL,
            namespace   text        COLLATE "C" NOT NULL,
            key         text        COLLATE "C",
            partition   text        COLLATE "C",
            value       jsonb,
            CONSTRAINT {_derived(changes + "_op_check")} CHECK (op IN ('s', 'd', 't', 'c'))
        )
        """
    )
    op.execute(
        f"CREATE UNIQUE INDEX {_derived(changes + '_pos_idx')} ON {changes_t} "
        "(namespace, epoch, pos) WHERE pos IS NOT NULL"
    )
    op.execute(
        f"CREATE INDEX {_derived(changes + '_pending_idx')} ON {changes_t} "
        "(namespace, epoch, id) WHERE pos IS NULL"
    )
    # Columns are qualified everywhere: the OUT columns are variables of the function too.
    op.execute(
        f"""
        CREATE FUNCTION {schema}.{_derived(read)}(
            p_ns text, p_epoch bigint, p_after bigint, p_limit integer, p_trim boolean)
        RETURNS TABLE (epoch bigint, pos bigint, op "char", key text, partition text,
                       version bigint, value jsonb, expires_at timestamptz, at timestamptz)
        LANGUAGE plpgsql VOLATILE
        -- Plans made for each call's values: a plan cached for generic values turned the
        -- numbering of a 10,000-change batch into a nested loop of 11 s (25 ms as planned).
        SET plan_cache_mode = force_custom_plan
        AS $read$
        #variable_conflict use_column
        DECLARE
            cur bigint;
            keep_ms bigint;
            hd bigint;
            fl bigint;
            upto bigint;
            ids bigint[];
            busy boolean;
        BEGIN
            -- Without a lock first: a read with nothing to trim or to sequence writes nothing.
            -- The head and the checks come from ONE statement, hence one snapshot: when it
            -- sees no unnumbered change, every change committed before it is numbered at or
            -- below the head it sees (numbers and head are committed together). Read in two
            -- statements, a sequencer committing between them made a stale head look current:
            -- a read after acknowledged writes came back empty, "at the head".
            SELECT f.epoch, f.retention_ms, f.head, f.floor,
                   (p_trim AND (SELECT c.at FROM {changes_t} c
                                WHERE c.namespace = p_ns AND c.epoch = f.epoch AND c.pos > f.floor
                                ORDER BY c.pos LIMIT 1)
                               < statement_timestamp() - f.retention_ms * interval '1 millisecond')
                   OR EXISTS (SELECT FROM {changes_t} c
                              WHERE c.namespace = p_ns AND c.epoch = f.epoch AND c.pos IS NULL)
            INTO cur, keep_ms, hd, fl, busy
            FROM {feeds_t} f WHERE f.namespace = p_ns;
            IF NOT FOUND THEN
                RETURN;
            END IF;
            IF busy THEN
                SELECT f.epoch, f.retention_ms, f.head, f.floor INTO cur, keep_ms, hd, fl
                FROM {feeds_t} f WHERE f.namespace = p_ns FOR UPDATE;
                IF NOT FOUND THEN
                    RETURN;
                END IF;
                IF p_trim THEN
                    -- The prefix of positions older than the retention: up to the first young
                    -- change (or the head).
                    SELECT c.pos - 1 INTO upto FROM {changes_t} c
                    WHERE c.namespace = p_ns AND c.epoch = cur AND c.pos > fl
                      AND c.at >= statement_timestamp() - keep_ms * interval '1 millisecond'
                    ORDER BY c.pos LIMIT 1;
                    upto := coalesce(upto, hd);
                    IF upto > fl THEN
                        DELETE FROM {changes_t} c
                        WHERE c.namespace = p_ns AND c.epoch = cur AND c.pos > fl
                          AND c.pos <= upto;
                        fl := upto;
                    END IF;
                END IF;
                -- A new statement, hence a snapshot taken after the lock: every change
                -- committed by then is numbered, in id order, from head + 1. (Numbered through
                -- an array: a join of the table with its own ranking may be planned as a
                -- nested loop that ranks again for every row.)
                SELECT array_agg(p.id ORDER BY p.id) INTO ids FROM (
                    SELECT c.id FROM {changes_t} c
                    WHERE c.namespace = p_ns AND c.epoch = cur AND c.pos IS NULL
                    ORDER BY c.id
                    LIMIT 100000
                ) p;
                IF ids IS NOT NULL THEN
                    UPDATE {changes_t} c SET pos = hd + b.n
                    FROM unnest(ids) WITH ORDINALITY AS b(id, n)
                    WHERE c.namespace = p_ns AND c.epoch = cur AND c.pos IS NULL
                      AND c.id = b.id;
                    hd := hd + cardinality(ids);
                END IF;
                UPDATE {feeds_t} f SET head = hd, floor = fl WHERE f.namespace = p_ns;
            END IF;
            epoch := cur;
            pos := hd;
            version := fl;
            RETURN NEXT;
            IF p_limit > 0
               AND (p_after IS NULL OR (p_epoch = cur AND p_after >= fl AND p_after <= hd)) THEN
                RETURN QUERY
                SELECT NULL::bigint, c.pos, c.op, c.key, c.partition, c.version, c.value,
                       c.expires_at, c.at
                FROM {changes_t} c
                WHERE c.namespace = p_ns AND c.epoch = cur AND c.pos > coalesce(p_after, fl)
                  AND c.pos <= hd
                ORDER BY c.pos
                LIMIT p_limit;
            END IF;
        END
        $read$
        """
    )
    entries_live = "e.expires_at IS NULL OR e.expires_at > now()"
    op.execute(
        f"""
        CREATE FUNCTION {schema}.{_derived(clear)}(p_ns text, p_partition text)
        RETURNS bigint LANGUAGE plpgsql VOLATILE AS $clear$
        DECLARE
            live bigint;
        BEGIN
            -- Wait for the recording writes in flight (they hold the lock shared); the DELETE
            -- below, a new statement, sees them all.
            PERFORM pg_advisory_xact_lock({FEED_LOCK_CLASS}, hashtext(p_ns))
            FROM {feeds_t} f WHERE f.namespace = p_ns;
            IF p_partition IS NULL THEN
                WITH gone AS (
                    DELETE FROM {entries} e WHERE e.namespace = p_ns
                    RETURNING {entries_live} AS live
                )
                SELECT count(*) FILTER (WHERE gone.live) INTO live FROM gone;
            ELSE
                WITH gone AS (
                    DELETE FROM {entries} e WHERE e.namespace = p_ns AND e.partition = p_partition
                    RETURNING {entries_live} AS live
                )
                SELECT count(*) FILTER (WHERE gone.live) INTO live FROM gone;
            END IF;
            IF live > 0 THEN
                INSERT INTO {changes_t} (namespace, epoch, op, partition, at)
                SELECT p_ns, f.epoch, 'c', p_partition, now()
                FROM {feeds_t} f WHERE f.namespace = p_ns;
                IF FOUND AND EXISTS (SELECT FROM {feeds_t} f
                                     WHERE f.namespace = p_ns AND f.watched_until > now()) THEN
                    PERFORM pg_notify('{channel}', '~' || p_ns);
                END IF;
            END IF;
            RETURN live;
        END
        $clear$
        """
    )
    # Every write now reads the feed table and may insert into the change table: a role that
    # may write the entries (a least-privilege application role) gets what the feed needs, so
    # that the upgrade does not stop its writes. The owner runs this; others have nothing new.
    op.execute(
        f"""
        DO $grants$
        DECLARE
            r record;
            grantee text;
        BEGIN
            FOR r IN
                SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
                WHERE c.oid = '{entries}'::regclass AND a.grantee <> c.relowner
                  AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE')
            LOOP
                grantee := CASE WHEN r.grantee = 0 THEN 'PUBLIC'
                                ELSE r.grantee::regrole::text END;
                EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON {feeds_t}, {changes_t} TO '
                        || grantee;
                EXECUTE 'GRANT EXECUTE ON FUNCTION {schema}.{_derived(read)}(text, bigint, '
                        'bigint, integer, boolean), {schema}.{_derived(clear)}(text, text) TO '
                        || grantee;
            END LOOP;
        END
        $grants$
        """
    )


def downgrade() -> None:
    schema, _, feeds, changes, read, clear, _ = _names()
    op.execute(f"DROP FUNCTION {schema}.{_derived(clear)}(text, text)")
    op.execute(f"DROP FUNCTION {schema}.{_derived(read)}(text, bigint, bigint, integer, boolean)")
    op.execute(f"DROP TABLE {schema}.{_derived(changes)}")
    op.execute(f"DROP TABLE {schema}.{_derived(feeds)}")
