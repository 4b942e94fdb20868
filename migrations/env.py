"""alembic environment for fleetmem's PostgreSQL schema.

The schema and table names come from ``-x schema=... -x table=...`` or, when run through
``fleetmem.backends.postgres.migrate``, from the config's attributes; both are validated as plain
identifiers. Online runs use asyncpg (SQLAlchemy's ``postgresql+asyncpg`` dialect) and take a
transaction-scoped advisory lock first, so concurrent upgraders apply each migration once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from fleetmem.backends.postgres.migrate import (
    DEFAULT_SCHEMA,
    DEFAULT_TABLE,
    advisory_lock_key,
    quote_ident,
    validate_identifier,
    version_table_name,
)

config = context.config
_x = context.get_x_argument(as_dictionary=True)
schema = validate_identifier(
    _x.get("schema") or config.attributes.get("fleetmem_schema") or DEFAULT_SCHEMA,
    "schema name",
)
table = validate_identifier(
    _x.get("table") or config.attributes.get("fleetmem_table") or DEFAULT_TABLE, "table name"
)
# The migration scripts read the resolved names from here.
config.attributes["fleetmem_schema"] = schema
config.attributes["fleetmem_table"] = table

_LOCK = f"SELECT pg_advisory_xact_lock({advisory_lock_key(schema, table)})"
_CREATE_SCHEMA = f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"
_OPTIONS: dict[str, Any] = {
    "version_table": version_table_name(table),
    "version_table_schema": schema,
    "transactional_ddl": True,
    "target_metadata": None,
}


def run_migrations_offline() -> None:
    context.configure(
        url="postgresql://",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_OPTIONS,
    )
    with context.begin_transaction():
        context.execute(_LOCK)
        context.execute(_CREATE_SCHEMA)
        context.run_migrations()


def _run_on(connection: Any) -> None:
    context.configure(connection=connection, **_OPTIONS)
    with context.begin_transaction():
        connection.execute(text(_LOCK))
        connection.execute(text(_CREATE_SCHEMA))
        context.run_migrations()


async def _run_async(dsn: str) -> None:
    import asyncpg
    from sqlalchemy.ext.asyncio import create_async_engine

    async def connect() -> Any:
        # asyncpg parses the libpq-style URL itself (sslmode, passfile, ...).
        return await asyncpg.connect(dsn, timeout=10)

    engine = create_async_engine("postgresql+asyncpg://", async_creator=connect, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_on)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    shared = config.attributes.get("connection")
    if shared is not None:
        _run_on(shared)
        return
    dsn = config.attributes.get("fleetmem_dsn") or _x.get("url")
    if not dsn:
        raise RuntimeError("no database: pass the DSN via fleetmem's migrate functions")
    asyncio.run(_run_async(dsn))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
