"""The alembic migrations of the PostgreSQL schema, on real empty databases."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from fleetmem.errors import ConfigurationError

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")
pytest.importorskip("alembic")

from fleetmem.backends.postgres import migrate  # noqa: E402

# The declared schema: (column, data type, nullable, collation).
EXPECTED_COLUMNS = [
    ("namespace", "text", "NO", "C"),
    ("key", "text", "NO", "C"),
    ("partition", "text", "NO", "C"),
    ("value", "jsonb", "NO", None),
    ("version", "bigint", "NO", None),
    ("created_at", "timestamp with time zone", "NO", None),
    ("updated_at", "timestamp with time zone", "NO", None),
    ("expires_at", "timestamp with time zone", "YES", None),
]


# The coordination tables of revision 0003, next to the entries table.
EXPECTED_LEASE_COLUMNS = [
    ("namespace", "text", "NO", "C"),
    ("name", "text", "NO", "C"),
    ("owner", "text", "NO", None),
    ("token", "bigint", "NO", None),
    ("acquired_at", "timestamp with time zone", "NO", None),
    ("expires_at", "timestamp with time zone", "NO", None),
    ("ttl_ms", "bigint", "NO", None),
]
EXPECTED_AGENT_COLUMNS = [
    ("namespace", "text", "NO", "C"),
    ("id", "text", "NO", "C"),
    ("info", "jsonb", "NO", None),
    ("generation", "bigint", "NO", None),
    ("registered_at", "timestamp with time zone", "NO", None),
    ("last_seen", "timestamp with time zone", "NO", None),
    ("expires_at", "timestamp with time zone", "NO", None),
    ("ttl_ms", "bigint", "NO", None),
]


# The job table of revision 0004, next to the entries table.
EXPECTED_JOB_COLUMNS = [
    ("id", "bigint", "NO", None),
    ("namespace", "text", "NO", "C"),
    ("queue", "text", "NO", "C"),
    ("state", "text", "NO", None),
    ("priority", "integer", "NO", None),
    ("due_at", "timestamp with time zone", "NO", None),
    ("attempts", "integer", "NO", None),
    ("max_attempts", "integer", "NO", None),
    ("token", "bigint", "NO", None),
    ("enqueued_at", "timestamp with time zone", "NO", None),
    ("ready_at", "timestamp with time zone", "NO", None),
    ("claimed_at", "timestamp with time zone", "YES", None),
    ("lease_expires_at", "timestamp with time zone", "YES", None),
    ("finished_at", "timestamp with time zone", "YES", None),
    ("consumer", "text", "YES", None),
    ("dedupe_key", "text", "YES", "C"),
    ("last_error", "text", "YES", None),
    ("payload", "jsonb", "NO", None),
    ("result", "jsonb", "YES", None),
]
_LIVE = "(state = ANY (ARRAY['waiting'::text, 'claimed'::text]))"


def _expected_jobs(schema: str, table: str) -> dict[str, Any]:
    jobs = f"{table}_jobs"
    awaited = f"{jobs}_awaited"
    return {
        "jobs": _expected_job_table(schema, table),
        # The marks of awaited jobs: a row each, deleted with its job.
        "awaited": {
            "columns": [("id", "bigint", "NO", None)],
            "indexes": {
                f"{awaited}_pkey": f"CREATE UNIQUE INDEX {awaited}_pkey "
                f"ON {schema}.{awaited} USING btree (id)"
            },
        },
        "foreign_keys": [
            (
                f"{awaited}_id_fkey",
                f"FOREIGN KEY (id) REFERENCES {schema}.{jobs}(id) ON DELETE CASCADE",
            )
        ],
    }


def _expected_job_table(schema: str, table: str) -> dict[str, Any]:
    jobs = f"{table}_jobs"
    on = f"ON {schema}.{jobs} USING btree"
    return {
        "columns": EXPECTED_JOB_COLUMNS,
        "indexes": {
            f"{jobs}_pkey": f"CREATE UNIQUE INDEX {jobs}_pkey {on} (id)",
            f"{jobs}_claim_idx": f"CREATE INDEX {jobs}_claim_idx {on} "
            f"(namespace, queue, priority DESC, due_at, id) WHERE {_LIVE}",
            f"{jobs}_dedupe_idx": f"CREATE UNIQUE INDEX {jobs}_dedupe_idx {on} "
            f"(namespace, queue, dedupe_key) WHERE ((dedupe_key IS NOT NULL) AND {_LIVE})",
            f"{jobs}_last_attempt_idx": f"CREATE INDEX {jobs}_last_attempt_idx {on} "
            "(namespace, queue, due_at) "
            "WHERE ((state = 'claimed'::text) AND (attempts >= max_attempts))",
            f"{jobs}_done_idx": f"CREATE INDEX {jobs}_done_idx {on} (namespace, queue, due_at) "
            "WHERE (state = 'done'::text)",
            f"{jobs}_dead_idx": f"CREATE INDEX {jobs}_dead_idx {on} (namespace, queue, id) "
            "WHERE (state = 'dead'::text)",
        },
    }


_NO_JOBS: dict[str, Any] = {
    "jobs": {"columns": [], "indexes": {}},
    "awaited": {"columns": [], "indexes": {}},
    "foreign_keys": [],
}


# The change-feed tables of revision 0005, next to the entries table.
EXPECTED_FEED_COLUMNS = [
    ("namespace", "text", "NO", "C"),
    ("epoch", "bigint", "NO", None),
    ("retention_ms", "bigint", "NO", None),
    ("head", "bigint", "NO", None),
    ("floor", "bigint", "NO", None),
    ("watched_until", "timestamp with time zone", "YES", None),
]
EXPECTED_CHANGE_COLUMNS = [
    ("id", "bigint", "NO", None),
    ("epoch", "bigint", "NO", None),
    ("pos", "bigint", "YES", None),
    ("version", "bigint", "YES", None),
    ("at", "timestamp with time zone", "NO", None),
    ("expires_at", "timestamp with time zone", "YES", None),
    ("op", '"char"', "NO", None),
    ("namespace", "text", "NO", "C"),
    ("key", "text", "YES", "C"),
    ("partition", "text", "YES", "C"),
    ("value", "jsonb", "YES", None),
]


def _expected_feeds(schema: str, table: str) -> dict[str, Any]:
    feeds, changes = f"{table}_feeds", f"{table}_changes"
    on = f"ON {schema}.{changes} USING btree"
    return {
        "feeds": {
            "columns": EXPECTED_FEED_COLUMNS,
            "indexes": {
                f"{feeds}_pkey": f"CREATE UNIQUE INDEX {feeds}_pkey ON {schema}.{feeds} "
                "USING btree (namespace)"
            },
        },
        "changes": {
            "columns": EXPECTED_CHANGE_COLUMNS,
            "indexes": {
                f"{changes}_pos_idx": f"CREATE UNIQUE INDEX {changes}_pos_idx {on} "
                "(namespace, epoch, pos) WHERE (pos IS NOT NULL)",
                f"{changes}_pending_idx": f"CREATE INDEX {changes}_pending_idx {on} "
                "(namespace, epoch, id) WHERE (pos IS NULL)",
            },
        },
        "functions": [
            (
                f"{table}_changes_read",
                "p_ns text, p_epoch bigint, p_after bigint, p_limit integer, p_trim boolean",
                'TABLE(epoch bigint, pos bigint, op "char", key text, partition text, '
                "version bigint, value jsonb, expires_at timestamp with time zone, "
                "at timestamp with time zone)",
                "v",
            ),
            (f"{table}_clear", "p_ns text, p_partition text", "bigint", "v"),
        ],
        # The change ids come from a sequence without a per-session cache (see 0005).
        "id_cache": [(1,)],
    }


_NO_FEEDS: dict[str, Any] = {
    "feeds": {"columns": [], "indexes": {}},
    "changes": {"columns": [], "indexes": {}},
    "functions": [],
    "id_cache": [],
}


def _feeds_of(dsn: str, schema: str = "fleetmem", table: str = "entries") -> dict[str, Any]:
    """The feed table, the change table and the functions of revision 0005 of ``schema.table``."""
    feeds, changes = f"{table}_feeds", f"{table}_changes"
    return {
        "feeds": _schema_of(dsn, schema, feeds),
        "changes": _schema_of(dsn, schema, changes),
        "functions": _functions_of(dsn, schema, [f"{table}_changes_read", f"{table}_clear"]),
        "id_cache": _query(
            dsn,
            "SELECT cache_size FROM pg_sequences WHERE schemaname = $1 AND sequencename = $2",
            schema,
            f"{changes}_id_seq",
        ),
    }


def _jobs_of(dsn: str, schema: str = "fleetmem", table: str = "entries") -> dict[str, Any]:
    """The job table and the mark table of ``schema.table`` (revision 0004), and the foreign
    keys of the latter."""
    jobs = f"{table}_jobs"
    awaited = f"{jobs}_awaited"
    return {
        "jobs": _schema_of(dsn, schema, jobs),
        "awaited": _schema_of(dsn, schema, awaited),
        "foreign_keys": _query(
            dsn,
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE contype = 'f' AND conrelid = to_regclass(format('%I.%I', $1::text, $2::text)) "
            "ORDER BY conname",
            schema,
            awaited,
        ),
    }


def _coordination_of(dsn: str, schema: str = "fleetmem", table: str = "entries") -> dict[str, Any]:
    """The lease table, the agent table and the fence function of ``schema.table``."""
    leases, agents = f"{table}_leases", f"{table}_agents"
    return {
        "leases": _schema_of(dsn, schema, leases),
        "agents": _schema_of(dsn, schema, agents),
        "functions": _functions_of(dsn, schema, [f"{table}_fence"]),
    }


def _functions_of(dsn: str, schema: str, names: list[str]) -> list[tuple[Any, ...]]:
    """Name, arguments, result and volatility of the functions ``names`` of ``schema``."""
    return _query(
        dsn,
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid), "
        "pg_get_function_result(p.oid), p.provolatile::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = $1 AND p.proname = ANY($2::text[]) ORDER BY 1",
        schema,
        names,
    )


def _expected_coordination(schema: str, table: str) -> dict[str, Any]:
    leases, agents = f"{table}_leases", f"{table}_agents"
    return {
        "leases": {
            "columns": EXPECTED_LEASE_COLUMNS,
            "indexes": {
                f"{leases}_pkey": f"CREATE UNIQUE INDEX {leases}_pkey ON {schema}.{leases} "
                "USING btree (namespace, name)"
            },
        },
        "agents": {
            "columns": EXPECTED_AGENT_COLUMNS,
            "indexes": {
                f"{agents}_pkey": f"CREATE UNIQUE INDEX {agents}_pkey ON {schema}.{agents} "
                "USING btree (namespace, id)"
            },
        },
        "functions": [(f"{table}_fence", "ns text, lease text, tok bigint", "text", "v")],
    }


_NO_COORDINATION: dict[str, Any] = {
    "leases": {"columns": [], "indexes": {}},
    "agents": {"columns": [], "indexes": {}},
    "functions": [],
}


def _expected_indexes(schema: str, table: str) -> dict[str, str]:
    return {
        f"{table}_pkey": f"CREATE UNIQUE INDEX {table}_pkey ON {schema}.{table} "
        "USING btree (namespace, key)",
        f"{table}_partition_idx": f"CREATE INDEX {table}_partition_idx ON {schema}.{table} "
        "USING btree (namespace, partition, key)",
        f"{table}_expires_idx": f"CREATE INDEX {table}_expires_idx ON {schema}.{table} "
        "USING btree (namespace, expires_at) WHERE (expires_at IS NOT NULL)",
    }


def _query(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def _schema_of(dsn: str, schema: str = "fleetmem", table: str = "entries") -> dict[str, Any]:
    columns = _query(
        dsn,
        "SELECT column_name, data_type, is_nullable, collation_name "
        "FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
        "ORDER BY ordinal_position",
        schema,
        table,
    )
    indexes = dict(
        _query(
            dsn,
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
            schema,
            table,
        )
    )
    return {"columns": columns, "indexes": indexes}


def test_upgrade_on_an_empty_database_gives_the_declared_schema(
    fleetmem_postgres_empty_database: str,
) -> None:
    dsn = fleetmem_postgres_empty_database
    assert migrate.current(dsn) is None
    migrate.upgrade(dsn)
    assert migrate.current(dsn) == migrate.HEAD_REVISION
    found = _schema_of(dsn)
    assert found["columns"] == EXPECTED_COLUMNS
    assert found["indexes"] == _expected_indexes("fleetmem", "entries")
    assert _coordination_of(dsn) == _expected_coordination("fleetmem", "entries")
    assert _jobs_of(dsn) == _expected_jobs("fleetmem", "entries")
    assert _feeds_of(dsn) == _expected_feeds("fleetmem", "entries")
    assert _query(dsn, "SELECT version_num FROM fleetmem.alembic_version") == [
        (migrate.HEAD_REVISION,)
    ]


def test_custom_schema_and_table(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn, schema="mem_schema", table="kv")
    assert migrate.current(dsn, schema="mem_schema", table="kv") == migrate.HEAD_REVISION
    assert migrate.current(dsn) is None  # the default table is untouched
    found = _schema_of(dsn, "mem_schema", "kv")
    assert found["columns"] == EXPECTED_COLUMNS
    assert found["indexes"] == _expected_indexes("mem_schema", "kv")
    assert _coordination_of(dsn, "mem_schema", "kv") == _expected_coordination("mem_schema", "kv")
    assert _jobs_of(dsn, "mem_schema", "kv") == _expected_jobs("mem_schema", "kv")
    assert _feeds_of(dsn, "mem_schema", "kv") == _expected_feeds("mem_schema", "kv")
    assert _coordination_of(dsn) == _NO_COORDINATION
    assert _jobs_of(dsn) == _NO_JOBS
    assert _feeds_of(dsn) == _NO_FEEDS


def test_upgrading_twice_is_a_no_op(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn)
    oid = _query(dsn, "SELECT 'fleetmem.entries'::regclass::oid")
    migrate.upgrade(dsn)
    assert _query(dsn, "SELECT 'fleetmem.entries'::regclass::oid") == oid
    assert migrate.current(dsn) == migrate.HEAD_REVISION


def test_downgrade_then_upgrade_round_trips(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn)
    before = _schema_of(dsn), _coordination_of(dsn), _jobs_of(dsn), _feeds_of(dsn)
    migrate.downgrade(dsn, "base")
    assert migrate.current(dsn) is None
    assert _query(dsn, "SELECT to_regclass('fleetmem.entries')") == [(None,)]
    assert _coordination_of(dsn) == _NO_COORDINATION
    assert _jobs_of(dsn) == _NO_JOBS
    assert _feeds_of(dsn) == _NO_FEEDS
    migrate.upgrade(dsn)
    assert (_schema_of(dsn), _coordination_of(dsn), _jobs_of(dsn), _feeds_of(dsn)) == before
    assert migrate.current(dsn) == migrate.HEAD_REVISION


def test_four_concurrent_upgraders_apply_it_once(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database
    script = textwrap.dedent(
        """
        import sys
        from fleetmem.backends.postgres import migrate
        migrate.upgrade(sys.argv[1])
        print(migrate.current(sys.argv[1]))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, dsn],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == migrate.HEAD_REVISION
    assert _query(dsn, "SELECT version_num FROM fleetmem.alembic_version") == [
        (migrate.HEAD_REVISION,)
    ]
    assert _schema_of(dsn)["indexes"] == _expected_indexes("fleetmem", "entries")


def test_upgrade_inside_a_running_event_loop(fleetmem_postgres_empty_database: str) -> None:
    async def main() -> None:
        migrate.upgrade(fleetmem_postgres_empty_database)  # runs in a worker thread

    asyncio.run(main())
    assert migrate.current(fleetmem_postgres_empty_database) == migrate.HEAD_REVISION


def test_offline_sql_names_the_schema_and_takes_the_lock() -> None:
    text = migrate.sql(schema="ops", table="mem")
    assert 'CREATE SCHEMA IF NOT EXISTS "ops"' in text
    assert 'CREATE TABLE "ops"."mem"' in text
    assert 'COLLATE "C"' in text
    assert f"pg_advisory_xact_lock({migrate.advisory_lock_key('ops', 'mem')})" in text
    assert "alembic_version_mem" in text
    assert text.strip().startswith("BEGIN;") and text.strip().endswith("COMMIT;")


def test_offline_sql_applies_cleanly(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database

    async def run_script() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(migrate.sql())  # the simple protocol: a whole script
        finally:
            await conn.close()

    asyncio.run(run_script())
    assert migrate.current(dsn) == migrate.HEAD_REVISION
    assert _schema_of(dsn)["columns"] == EXPECTED_COLUMNS
    assert _coordination_of(dsn) == _expected_coordination("fleetmem", "entries")
    assert _jobs_of(dsn) == _expected_jobs("fleetmem", "entries")
    assert _feeds_of(dsn) == _expected_feeds("fleetmem", "entries")


def test_offline_sql_creates_the_coordination_tables() -> None:
    text = migrate.sql(schema="ops", table="mem", revision="0003", from_revision="0002")
    assert 'CREATE TABLE "ops"."mem_leases"' in text
    assert 'CREATE TABLE "ops"."mem_agents"' in text
    assert 'CREATE FUNCTION "ops"."mem_fence"' in text
    assert "FOR SHARE" in text
    assert 'CREATE TABLE "ops"."mem"' not in text  # from 0002: the entries table exists


@pytest.mark.parametrize("name", ["", "Upper", "a-b", 'a"b', "a b", "1abc", "x" * 41, None])
def test_identifiers_are_validated(name: Any) -> None:
    with pytest.raises(ConfigurationError):
        migrate.sql(schema=name)
    with pytest.raises(ConfigurationError):
        migrate.sql(table=name)


def test_known_revisions_match_the_scripts() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(migrate.migrations_dir()))
    script = ScriptDirectory.from_config(cfg)
    chain = [rev.revision for rev in script.walk_revisions("base", "heads")]
    assert tuple(reversed(chain)) == migrate.REVISIONS
    assert script.get_current_head() == migrate.HEAD_REVISION


def test_db_command(
    fleetmem_postgres_empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = fleetmem_postgres_empty_database
    assert migrate.run_db_command(["current", "--url", dsn]) == 0
    assert capsys.readouterr().out.strip() == "none"
    assert migrate.run_db_command(["upgrade", "--url", dsn]) == 0
    capsys.readouterr()
    assert migrate.run_db_command(["current", "--url", dsn]) == 0
    assert capsys.readouterr().out.strip() == migrate.HEAD_REVISION
    assert migrate.run_db_command(["sql", "--schema", "s2"]) == 0
    assert 'CREATE TABLE "s2"."entries"' in capsys.readouterr().out
    assert migrate.run_db_command(["downgrade", "--url", dsn, "base"]) == 0
    capsys.readouterr()
    assert migrate.current(dsn) is None
    assert migrate.run_db_command(["upgrade", "--url", dsn, "--table", "Bad"]) == 2
    assert "invalid table name" in capsys.readouterr().err


def test_db_command_takes_a_parsed_namespace(
    fleetmem_postgres_empty_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    dsn = fleetmem_postgres_empty_database
    args = argparse.Namespace(
        db_command="upgrade", revision=None, schema="fleetmem", table="entries", url=dsn
    )
    assert migrate.run_db_command(args) == 0
    assert migrate.current(dsn) == migrate.HEAD_REVISION
    args = argparse.Namespace(db_command="current", revision=None, schema=None, table=None, url=dsn)
    capsys.readouterr()
    assert migrate.run_db_command(args) == 0
    assert capsys.readouterr().out.strip() == migrate.HEAD_REVISION


def _fillfactor(dsn: str) -> list[tuple[Any, ...]]:
    return _query(
        dsn,
        "SELECT reloptions FROM pg_class WHERE oid = 'fleetmem.entries'::regclass",
    )


def test_head_leaves_room_for_updates_in_place(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn, revision="0001")
    assert _fillfactor(dsn) == [(None,)]
    migrate.upgrade(dsn)
    assert _fillfactor(dsn) == [(["fillfactor=80"],)]
    migrate.downgrade(dsn, "0001")
    assert _fillfactor(dsn) == [(None,)]
    assert migrate.current(dsn) == "0001"


async def test_an_older_schema_is_migrated_at_connect_or_refused(
    fleetmem_postgres_empty_database: str,
) -> None:
    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.errors import SchemaVersionError

    dsn = fleetmem_postgres_empty_database
    await asyncio.to_thread(migrate.upgrade, dsn, revision="0001")
    refusing = PostgresStore.from_url(dsn, auto_migrate=False)
    with pytest.raises(SchemaVersionError, match="0001"):
        await refusing.connect()
    await refusing.close()
    assert await asyncio.to_thread(migrate.current, dsn) == "0001"
    async with PostgresStore.from_url(dsn) as store:
        await store.set("k", 1)
        assert await store.get("k") == 1
    assert await asyncio.to_thread(migrate.current, dsn) == migrate.HEAD_REVISION


def test_coordination_upgrade_and_downgrade(fleetmem_postgres_empty_database: str) -> None:
    """0003 adds the lease and agent tables and the fence function next to the entries table,
    keeping the entries; downgrading to 0002 drops exactly what it added."""
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn, revision="0002")
    assert _coordination_of(dsn) == _NO_COORDINATION
    _query(dsn, "INSERT INTO fleetmem.entries (namespace, key, value) VALUES ('n', 'k', '1')")
    entries_before = _schema_of(dsn)
    migrate.upgrade(dsn, revision="0003")
    assert migrate.current(dsn) == "0003"
    assert _coordination_of(dsn) == _expected_coordination("fleetmem", "entries")
    assert _schema_of(dsn) == entries_before
    assert _query(dsn, "SELECT key FROM fleetmem.entries") == [("k",)]
    migrate.downgrade(dsn, "0002")
    assert migrate.current(dsn) == "0002"
    assert _coordination_of(dsn) == _NO_COORDINATION
    assert _schema_of(dsn) == entries_before
    assert _query(dsn, "SELECT key FROM fleetmem.entries") == [("k",)]
    migrate.upgrade(dsn, revision="0003")
    assert _coordination_of(dsn) == _expected_coordination("fleetmem", "entries")


def test_the_fence_function_checks_and_locks_the_lease(
    fleetmem_postgres_empty_database: str,
) -> None:
    """The function fenced writes call: the namespace back when the lease is live with the
    token, SQLSTATE FL001 (lease name and token as detail and hint) otherwise."""
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn)

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "INSERT INTO fleetmem.entries_leases VALUES "
                "('n', 'live', 'o', 7, now(), now() + interval '1 hour', 3600000), "
                "('n', 'gone', 'o', 3, now(), now(), 1000)"
            )
            fence = "SELECT fleetmem.entries_fence($1, $2, $3)"
            assert await conn.fetchval(fence, "n", "live", 7) == "n"
            for ns, name, token in (("n", "live", 6), ("n", "gone", 3), ("m", "live", 7)):
                with pytest.raises(asyncpg.PostgresError) as caught:
                    await conn.fetchval(fence, ns, name, token)
                assert caught.value.sqlstate == "FL001"
                assert caught.value.detail == name
                assert caught.value.hint == str(token)
            async with conn.transaction():
                await conn.fetchval(fence, "n", "live", 7)
                locks = await conn.fetch(
                    "SELECT mode FROM pg_locks WHERE relation = "
                    "'fleetmem.entries_leases'::regclass AND pid = pg_backend_pid()"
                )
                assert "RowShareLock" in {r[0] for r in locks}
        finally:
            await conn.close()

    asyncio.run(run())


async def test_a_schema_without_the_coordination_tables_is_migrated_or_refused(
    fleetmem_postgres_empty_database: str,
) -> None:
    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.errors import SchemaVersionError

    dsn = fleetmem_postgres_empty_database
    await asyncio.to_thread(migrate.upgrade, dsn, revision="0002")
    refusing = PostgresStore.from_url(dsn, auto_migrate=False)
    with pytest.raises(SchemaVersionError, match="0002"):
        await refusing.connect()
    await refusing.close()
    assert await asyncio.to_thread(migrate.current, dsn) == "0002"
    async with PostgresStore.from_url(dsn, namespace="n") as store:
        lease = await store.leases.acquire("l", owner="o", ttl=30)
        assert lease is not None and lease.token == 1
        await store.set("k", 1, fence=lease)
        assert (await store.agents.register("a", info={}, ttl=30)).generation == 1
    assert await asyncio.to_thread(migrate.current, dsn) == migrate.HEAD_REVISION


# ------------------------------------------------------------------------------ 0004: queues


def test_queue_upgrade_and_downgrade(fleetmem_postgres_empty_database: str) -> None:
    """0004 adds the job table (and its indexes) next to the entries, lease and agent tables,
    keeping their rows; downgrading to 0003 drops exactly what it added."""
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn, revision="0003")
    assert _jobs_of(dsn) == _NO_JOBS
    _query(dsn, "INSERT INTO fleetmem.entries (namespace, key, value) VALUES ('n', 'k', '1')")
    _query(
        dsn,
        "INSERT INTO fleetmem.entries_leases VALUES "
        "('n', 'l', 'o', 7, now(), now() + interval '1 hour', 3600000)",
    )
    before = _schema_of(dsn), _coordination_of(dsn)
    migrate.upgrade(dsn, revision="0004")
    assert migrate.current(dsn) == "0004"
    assert _jobs_of(dsn) == _expected_jobs("fleetmem", "entries")
    assert (_schema_of(dsn), _coordination_of(dsn)) == before
    _query(
        dsn,
        "INSERT INTO fleetmem.entries_jobs (namespace, queue, state, priority, due_at, "
        "max_attempts, enqueued_at, ready_at, payload) "
        "VALUES ('n', 'q', 'waiting', 0, now(), 5, now(), now(), '{}')",
    )
    migrate.downgrade(dsn, "0003")
    assert migrate.current(dsn) == "0003"
    assert _jobs_of(dsn) == _NO_JOBS
    assert _query(dsn, "SELECT to_regclass('fleetmem.entries_jobs')") == [(None,)]
    assert (_schema_of(dsn), _coordination_of(dsn)) == before
    assert _query(dsn, "SELECT key FROM fleetmem.entries") == [("k",)]
    assert _query(dsn, "SELECT token FROM fleetmem.entries_leases") == [(7,)]
    migrate.upgrade(dsn)
    assert _jobs_of(dsn) == _expected_jobs("fleetmem", "entries")
    # A fresh table: ids start again at 1 (they are unique for the life of a table).
    assert _query(dsn, "SELECT count(*) FROM fleetmem.entries_jobs") == [(0,)]


def test_the_job_table_refuses_an_unknown_state_and_a_second_live_dedupe_key(
    fleetmem_postgres_empty_database: str,
) -> None:
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn)
    insert = (
        "INSERT INTO fleetmem.entries_jobs (namespace, queue, state, priority, due_at, "
        "max_attempts, enqueued_at, ready_at, dedupe_key, payload) "
        "VALUES ('n', 'q', $1, 0, now(), 5, now(), now(), 'k', '{}')"
    )

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(insert, "ready")
            await conn.execute(insert, "waiting")
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(insert, "claimed")
            # Done and dead jobs hold no key: any number of them, next to the live one.
            for state in ("done", "done", "dead"):
                await conn.execute(insert, state)
            assert await conn.fetchval("SELECT count(*) FROM fleetmem.entries_jobs") == 4
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_mark_of_an_awaited_job_goes_with_its_job(
    fleetmem_postgres_empty_database: str,
) -> None:
    """A mark names an existing job (the foreign key refuses another) and is deleted with the
    job, whatever deletes it; dropping the mark table leaves the jobs alone."""
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn)

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            ids = [
                await conn.fetchval(
                    "INSERT INTO fleetmem.entries_jobs (namespace, queue, state, priority, "
                    "due_at, max_attempts, enqueued_at, ready_at, payload) "
                    "VALUES ('n', 'q', 'waiting', 0, now(), 5, now(), now(), '{}') RETURNING id"
                )
                for _ in range(3)
            ]
            await conn.execute(
                "INSERT INTO fleetmem.entries_jobs_awaited SELECT unnest($1::bigint[])", ids
            )
            with pytest.raises(asyncpg.ForeignKeyViolationError):
                await conn.execute("INSERT INTO fleetmem.entries_jobs_awaited VALUES (999)")
            await conn.execute("DELETE FROM fleetmem.entries_jobs WHERE id = ANY($1)", ids[:2])
            marks = await conn.fetch("SELECT id FROM fleetmem.entries_jobs_awaited")
            assert [r[0] for r in marks] == ids[2:]
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_long_table_name_keeps_every_job_index_name_whole(
    fleetmem_postgres_empty_database: str,
) -> None:
    """Every name 0004 derives from the table's fits PostgreSQL's 63 bytes whole (a longer one
    would be truncated, and two could collide); 26 characters is the longest table name the
    earlier revisions take (``<table>_partition_idx`` is a checked identifier of at most 40)."""
    dsn = fleetmem_postgres_empty_database
    table = "t" * 26
    migrate.upgrade(dsn, table=table)
    assert _jobs_of(dsn, "fleetmem", table) == _expected_jobs("fleetmem", table)
    migrate.downgrade(dsn, "0003", table=table)
    assert _jobs_of(dsn, "fleetmem", table) == _NO_JOBS


def test_offline_sql_creates_the_queue_table() -> None:
    text = migrate.sql(schema="ops", table="mem", from_revision="0003")
    assert 'CREATE TABLE "ops"."mem_jobs"' in text
    assert "GENERATED ALWAYS AS IDENTITY" in text
    for index in ("claim", "dedupe", "last_attempt", "done", "dead"):
        assert f'"mem_jobs_{index}_idx" ON "ops"."mem_jobs"' in text
    assert 'CREATE TABLE "ops"."mem_jobs_awaited"' in text
    assert 'REFERENCES "ops"."mem_jobs" (id) ON DELETE CASCADE' in text
    assert "UNLOGGED" not in text  # an acknowledged put survives a crash of the server
    assert 'CREATE TABLE "ops"."mem_leases"' not in text  # from 0003: they exist


async def test_a_schema_without_the_job_table_is_migrated_or_refused(
    fleetmem_postgres_empty_database: str,
) -> None:
    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.errors import SchemaVersionError

    dsn = fleetmem_postgres_empty_database
    await asyncio.to_thread(migrate.upgrade, dsn, revision="0003")
    refusing = PostgresStore.from_url(dsn, auto_migrate=False)
    with pytest.raises(SchemaVersionError, match="0003"):
        await refusing.connect()
    await refusing.close()
    assert await asyncio.to_thread(migrate.current, dsn) == "0003"
    async with PostgresStore.from_url(dsn, namespace="n") as store:
        job_id = await store.queue("q").put({"n": 1})
        job = await store.queue("q").claim()
        assert job is not None and job.id == job_id
    assert await asyncio.to_thread(migrate.current, dsn) == migrate.HEAD_REVISION


async def test_a_newer_schema_than_this_fleetmem_knows_is_refused(
    fleetmem_postgres_empty_database: str,
) -> None:
    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.errors import SchemaVersionError

    dsn = fleetmem_postgres_empty_database
    await asyncio.to_thread(migrate.upgrade, dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE fleetmem.alembic_version SET version_num = '0007'")
    finally:
        await conn.close()
    store = PostgresStore.from_url(dsn)
    with pytest.raises(SchemaVersionError, match=r"0007.*0006"):
        await store.connect()
    await store.close()


# ------------------------------------------------------------------------ 0005: change feeds


def test_feed_upgrade_and_downgrade(fleetmem_postgres_empty_database: str) -> None:
    """0005 adds the feed and change tables and their two functions next to the others,
    keeping every row; downgrading to 0004 drops exactly what it added."""
    dsn = fleetmem_postgres_empty_database
    migrate.upgrade(dsn, revision="0004")
    assert _feeds_of(dsn) == _NO_FEEDS
    _query(dsn, "INSERT INTO fleetmem.entries (namespace, key, value) VALUES ('n', 'k', '1')")
    _query(
        dsn,
        "INSERT INTO fleetmem.entries_jobs (namespace, queue, state, priority, due_at, "
        "max_attempts, enqueued_at, ready_at, payload) "
        "VALUES ('n', 'q', 'waiting', 0, now(), 5, now(), now(), '{}')",
    )
    before = _schema_of(dsn), _coordination_of(dsn), _jobs_of(dsn)
    migrate.upgrade(dsn)
    assert migrate.current(dsn) == migrate.HEAD_REVISION
    assert _feeds_of(dsn) == _expected_feeds("fleetmem", "entries")
    assert (_schema_of(dsn), _coordination_of(dsn), _jobs_of(dsn)) == before
    _query(dsn, "INSERT INTO fleetmem.entries_feeds (namespace, retention_ms) VALUES ('n', 1000)")
    migrate.downgrade(dsn, "0004")
    assert migrate.current(dsn) == "0004"
    assert _feeds_of(dsn) == _NO_FEEDS
    assert (_schema_of(dsn), _coordination_of(dsn), _jobs_of(dsn)) == before
    assert _query(dsn, "SELECT key FROM fleetmem.entries") == [("k",)]
    assert _query(dsn, "SELECT count(*) FROM fleetmem.entries_jobs") == [(1,)]
    migrate.upgrade(dsn)
    assert _feeds_of(dsn) == _expected_feeds("fleetmem", "entries")


def test_a_long_table_name_keeps_every_feed_name_whole(
    fleetmem_postgres_empty_database: str,
) -> None:
    """Every name 0005 derives from the longest table name the earlier revisions take (26
    characters) fits PostgreSQL's 63 bytes whole."""
    dsn = fleetmem_postgres_empty_database
    table = "t" * 26
    migrate.upgrade(dsn, table=table)
    assert _feeds_of(dsn, "fleetmem", table) == _expected_feeds("fleetmem", table)
    migrate.downgrade(dsn, "0004", table=table)
    assert _feeds_of(dsn, "fleetmem", table) == _NO_FEEDS


def test_offline_sql_creates_the_feed_tables() -> None:
    text = migrate.sql(schema="ops", table="mem", from_revision="0004")
    assert 'CREATE TABLE "ops"."mem_feeds"' in text
    assert 'CREATE TABLE "ops"."mem_changes"' in text
    assert "GENERATED ALWAYS AS IDENTITY (CACHE 1)" in text
    for index in ("pos", "pending"):
        assert f'"mem_changes_{index}_idx" ON "ops"."mem_changes"' in text
    assert 'CREATE FUNCTION "ops"."mem_changes_read"' in text
    assert 'CREATE FUNCTION "ops"."mem_clear"' in text
    assert migrate.notify_channel("ops", "mem") in text
    assert "UNLOGGED" not in text  # a change is as durable as its write
    assert 'CREATE TABLE "ops"."mem_jobs"' not in text  # from 0004: it exists


async def test_a_schema_without_the_feed_tables_is_migrated_or_refused(
    fleetmem_postgres_empty_database: str,
) -> None:
    from fleetmem.backends.postgres import PostgresStore
    from fleetmem.errors import SchemaVersionError

    dsn = fleetmem_postgres_empty_database
    await asyncio.to_thread(migrate.upgrade, dsn, revision="0004")
    refusing = PostgresStore.from_url(dsn, auto_migrate=False)
    with pytest.raises(SchemaVersionError, match="0004"):
        await refusing.connect()
    await refusing.close()
    assert await asyncio.to_thread(migrate.current, dsn) == "0004"
    async with PostgresStore.from_url(dsn, namespace="n") as store:
        await store.set("before", 1)
        await store.changes.enable(retention=60)
        cursor = await store.changes.cursor()
        await store.set("k", 1)
        batch = await store.changes.read(since=cursor)
        assert [(c.op, c.key, c.value) for c in batch.changes] == [("set", "k", 1)]
    assert await asyncio.to_thread(migrate.current, dsn) == migrate.HEAD_REVISION


async def test_the_upgrade_gives_the_writers_of_the_entries_what_the_feed_needs(
    fleetmem_postgres_empty_database: str,
) -> None:
    """A least-privilege role granted the entries before 0005 keeps writing after it (its
    writes read the feed table, and record when a feed is enabled) and may use the feed; a
    role that may only read gets nothing new."""
    from urllib.parse import urlsplit, urlunsplit

    from fleetmem.backends.postgres import PostgresStore

    dsn = fleetmem_postgres_empty_database
    database = urlsplit(dsn).path.lstrip("/")
    await asyncio.to_thread(migrate.upgrade, dsn, revision="0004")
    suffix = secrets.token_hex(4)  # roles are the server's: no other test may share them
    writer, reader = f"fm_mig_writer_{suffix}", f"fm_mig_reader_{suffix}"
    conn = await asyncpg.connect(dsn)
    try:
        for role in (writer, reader):
            await conn.execute(f"CREATE ROLE {role} LOGIN")
            await conn.execute(f"GRANT USAGE ON SCHEMA fleetmem TO {role}")
            await conn.execute(f"GRANT SELECT ON fleetmem.alembic_version TO {role}")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries TO {writer}")
        await conn.execute(f'GRANT TEMPORARY ON DATABASE "{database}" TO {writer}')
        await conn.execute(f"GRANT SELECT ON fleetmem.entries TO {reader}")
        await asyncio.to_thread(migrate.upgrade, dsn)
        granted = await conn.fetch(
            "SELECT grantee, table_name, privilege_type FROM information_schema.table_privileges "
            "WHERE table_schema = 'fleetmem' AND grantee = ANY($1::text[]) "
            "AND table_name IN ('entries_feeds', 'entries_changes') ORDER BY 1, 2, 3",
            [writer, reader],
        )
        assert [tuple(r) for r in granted] == [
            (writer, table, privilege)
            for table in ("entries_changes", "entries_feeds")
            for privilege in ("DELETE", "INSERT", "SELECT", "UPDATE")
        ]
        parts = urlsplit(dsn)
        app_dsn = urlunsplit(parts._replace(netloc=f"{writer}@{parts.hostname}:{parts.port}"))
        async with PostgresStore.from_url(app_dsn, namespace="n", auto_migrate=False) as store:
            await store.set("k", 1)
            await store.changes.enable(retention=60)
            cursor = await store.changes.cursor()
            await store.set_many({"a": 1})
            await store.clear()
            batch = await store.changes.read(since=cursor)
            assert [(c.op, c.key) for c in batch.changes] == [("set", "a"), ("clear", None)]
            await store.changes.disable()
    finally:
        for role in (writer, reader):
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE {role}")
        await conn.close()
