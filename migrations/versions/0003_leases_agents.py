"""Leases with fencing tokens, the agent registry, and the fence check of fenced writes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Next to the entries table ``T`` (same schema, names derived from ``T``, see
``fleetmem.backends.postgres.migrate.coordination_names``):

* ``T_leases``: one row per lease name ever granted in a namespace. The row outlives its lease
  (a release sets ``expires_at`` to ``now()``) so that ``token`` only ever grows: a new grant
  is ``token + 1`` of the same row, durable like any row.
* ``T_agents``: one row per agent id ever registered; ``generation`` grows each time a gone
  agent registers again.
* ``T_fence(namespace, name, token)``: checks that lease ``name`` is live with ``token`` and
  locks its row ``FOR SHARE`` until the calling transaction ends, or raises SQLSTATE ``FL001``
  (the lease name as its detail, the token as its hint).
  A fenced write calls it in the write's own statement (see ``sql/kv.sql``), so a takeover of the
  lease (an ``UPDATE`` of the row) waits for the fenced write to commit.

``name`` and ``id`` are ``COLLATE "C"`` like the entries' keys: the primary key serves prefix
ranges and code-point order.
"""

from __future__ import annotations

from alembic import context, op

from fleetmem.backends.postgres.migrate import coordination_names, quote_ident

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _names() -> tuple[str, str, str, str, str]:
    attrs = context.config.attributes
    schema, table = attrs["fleetmem_schema"], attrs["fleetmem_table"]
    leases, agents, fence = coordination_names(table)
    return quote_ident(schema), leases, agents, fence, schema


def upgrade() -> None:
    schema, leases, agents, fence, _ = _names()
    op.execute(
        f"""
        CREATE TABLE {schema}.{quote_ident(leases)} (
            namespace    text        COLLATE "C" NOT NULL,
            name         text        COLLATE "C" NOT NULL,
            owner        text        NOT NULL,
            token        bigint      NOT NULL,
            acquired_at  timestamptz NOT NULL,
            expires_at   timestamptz NOT NULL,
            ttl_ms       bigint      NOT NULL,
            CONSTRAINT {quote_ident(leases + "_pkey")} PRIMARY KEY (namespace, name)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE {schema}.{quote_ident(agents)} (
            namespace      text        COLLATE "C" NOT NULL,
            id             text        COLLATE "C" NOT NULL,
            info           jsonb       NOT NULL,
            generation     bigint      NOT NULL,
            registered_at  timestamptz NOT NULL,
            last_seen      timestamptz NOT NULL,
            expires_at     timestamptz NOT NULL,
            ttl_ms         bigint      NOT NULL,
            CONSTRAINT {quote_ident(agents + "_pkey")} PRIMARY KEY (namespace, id)
        )
        """
    )
    # PL/pgSQL keeps the plan of its query per session; the lock is held to the end of the
    # caller's transaction. SQLSTATE FL001 becomes LeaseLostError in the connector. Liveness is
    # judged at statement_timestamp(), the start of the statement that writes: now() would be
    # the start of its transaction, and set_many writes at the end of one (after its COPY), so
    # a lease that expired during the COPY would still pass.
    op.execute(
        f"""
        CREATE FUNCTION {schema}.{quote_ident(fence)}(ns text, lease text, tok bigint)
        RETURNS text LANGUAGE plpgsql VOLATILE AS $fence$
        BEGIN
            PERFORM 1 FROM {schema}.{quote_ident(leases)} l
            WHERE l.namespace = ns AND l.name = lease AND l.token = tok
              AND l.expires_at > statement_timestamp()
            FOR SHARE;
            IF NOT FOUND THEN
                RAISE EXCEPTION USING ERRCODE = 'FL001',
                    MESSAGE = 'fleetmem: lease is no longer held with this token',
                    DETAIL = lease, HINT = tok::text;
            END IF;
            RETURN ns;
        END
        $fence$
        """
    )


def downgrade() -> None:
    schema, leases, agents, fence, _ = _names()
    op.execute(f"DROP FUNCTION {schema}.{quote_ident(fence)}(text, text, bigint)")
    op.execute(f"DROP TABLE {schema}.{quote_ident(agents)}")
    op.execute(f"DROP TABLE {schema}.{quote_ident(leases)}")
