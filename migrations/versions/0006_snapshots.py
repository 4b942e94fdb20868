"""Snapshots: the catalog of a namespace's named snapshots and their incremental records.

Revision ID: 0006
Revises: 0005
Create Date: 2027-02-20

Next to the entries table ``T`` (same schema, names derived from ``T``, see
``fleetmem.backends.postgres.migrate.snapshot_names``; the record model is the one of
``fleetmem.backends.seam.SnapshotBackend``):

* ``T_snapshots``: one row per snapshot -- ``(namespace, name)`` its primary key, ``seq`` its
  sequence number in the namespace (unique per namespace, greater is newer), ``created_at``
  (the server's clock), ``keys`` (live entries it holds) and ``bytes`` (what its records added
  when it was taken).
* ``T_snapshot_records``: one row per record ``(namespace, key, from_seq)`` (the primary key,
  which also serves the reading of a snapshot by key), held by the snapshots ``s`` with
  ``from_seq <= s`` and (``to_seq`` NULL or ``s < to_seq``): the entry's ``value``,
  ``partition``, ``version``, three timestamps, and ``bytes`` (its size as
  ``fleetmem.backends.seam.record_bytes`` counts it). Two more indexes:
  ``T_snapshot_records_open_idx (namespace, key) WHERE to_seq IS NULL`` -- the open records,
  in key order, which a create compares with the live entries -- and
  ``T_snapshot_records_seq_idx (namespace, to_seq, from_seq)``, which finds what a delete
  frees and reopens.

Nothing else reads these tables: the entries' statements (``keys``, ``stats``,
``namespaces``, ``clear``, exports, the change feed) never see a snapshot. Both tables are
logged: a snapshot survives a crash of the server once its create committed.

Privileges: as in 0005, every role (or ``PUBLIC``) that holds ``INSERT``, ``UPDATE`` or
``DELETE`` on ``T`` when the upgrade runs is granted ``SELECT, INSERT, UPDATE, DELETE`` on both
tables; a role granted later needs them granted too (see ``docs/backends/postgres.md``).
"""

from __future__ import annotations

from alembic import context, op

from fleetmem.backends.postgres.migrate import quote_ident, snapshot_names

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _derived(name: str) -> str:
    """``name`` -- the validated table name and a fixed suffix of ``[a-z_]`` -- double-quoted
    whole (it may pass the 40 characters of a checked identifier; never PostgreSQL's 63)."""
    if len(name) > 63:  # pragma: no cover - table names are at most 40 characters
        raise ValueError(f"{name!r} is longer than PostgreSQL's 63 bytes")
    return f'"{name}"'


def _names() -> tuple[str, str, str, str]:
    attrs = context.config.attributes
    schema, table = attrs["fleetmem_schema"], attrs["fleetmem_table"]
    catalog, records = snapshot_names(table)
    return quote_ident(schema), table, catalog, records


def upgrade() -> None:
    schema, table, catalog, records = _names()
    entries = f"{schema}.{quote_ident(table)}"
    catalog_t = f"{schema}.{_derived(catalog)}"
    records_t = f"{schema}.{_derived(records)}"
    op.execute(
        f"""
        CREATE TABLE {catalog_t} (
            namespace   text        COLLATE "C" NOT NULL,
            name        text        COLLATE "C" NOT NULL,
            seq         bigint      NOT NULL,
            created_at  timestamptz NOT NULL,
            keys        bigint      NOT NULL,
            bytes       bigint      NOT NULL,
            CONSTRAINT {_derived(catalog + "_pkey")} PRIMARY KEY (namespace, name),
            CONSTRAINT {_derived(catalog + "_seq_key")} UNIQUE (namespace, seq)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE {records_t} (
            namespace   text        COLLATE "C" NOT NULL,
            key         text        COLLATE "C" NOT NULL,
            from_seq    bigint      NOT NULL,
            to_seq      bigint,
            value       jsonb       NOT NULL,
            partition   text        COLLATE "C" NOT NULL,
            version     bigint      NOT NULL,
            created_at  timestamptz NOT NULL,
            updated_at  timestamptz NOT NULL,
            expires_at  timestamptz,
            bytes       bigint      NOT NULL,
            CONSTRAINT {_derived(records + "_pkey")} PRIMARY KEY (namespace, key, from_seq)
        )
        """
    )
    op.execute(
        f"CREATE INDEX {_derived(records + '_open_idx')} ON {records_t} "
        "(namespace, key) WHERE to_seq IS NULL"
    )
    op.execute(
        f"CREATE INDEX {_derived(records + '_seq_idx')} ON {records_t} "
        "(namespace, to_seq, from_seq)"
    )
    # A role that may write the entries may take, restore and delete snapshots too (as 0005
    # gives it the feed); the owner runs this; a role that may only read gets nothing new.
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
                EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON {catalog_t}, {records_t} TO '
                        || grantee;
            END LOOP;
        END
        $grants$
        """
    )


def downgrade() -> None:
    schema, _, catalog, records = _names()
    op.execute(f"DROP TABLE {schema}.{_derived(records)}")
    op.execute(f"DROP TABLE {schema}.{_derived(catalog)}")
