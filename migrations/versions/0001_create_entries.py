"""Create the entries table and its indexes.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

``key`` and ``partition`` are ``COLLATE "C"``: the primary key then serves equality, prefix
ranges and ``ORDER BY key`` in code-point order, whatever the database's default collation.
"""

from __future__ import annotations

from alembic import context, op

from fleetmem.backends.postgres.migrate import quote_ident

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _names() -> tuple[str, str, str]:
    attrs = context.config.attributes
    schema, table = attrs["fleetmem_schema"], attrs["fleetmem_table"]
    return quote_ident(schema), quote_ident(table), table


def upgrade() -> None:
    schema, table, bare = _names()
    qualified = f"{schema}.{table}"
    op.execute(
        f"""
        CREATE TABLE {qualified} (
            namespace   text        COLLATE "C" NOT NULL,
            key         text        COLLATE "C" NOT NULL,
            partition   text        COLLATE "C" NOT NULL DEFAULT 'default',
            value       jsonb       NOT NULL,
            version     bigint      NOT NULL DEFAULT 1,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now(),
            expires_at  timestamptz,
            CONSTRAINT {quote_ident(bare + "_pkey")} PRIMARY KEY (namespace, key)
        )
        """
    )
    op.execute(
        f"CREATE INDEX {quote_ident(bare + '_partition_idx')} "
        f"ON {qualified} (namespace, partition, key)"
    )
    op.execute(
        f"CREATE INDEX {quote_ident(bare + '_expires_idx')} "
        f"ON {qualified} (namespace, expires_at) WHERE expires_at IS NOT NULL"
    )


def downgrade() -> None:
    schema, table, _ = _names()
    op.execute(f"DROP TABLE {schema}.{table}")
