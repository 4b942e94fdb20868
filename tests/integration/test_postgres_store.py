"""PostgresStore beyond the conformance suite: schema checks, SQL plans, bulk calls, pool
hygiene, server-clock expiry, multi-process atomicity. Every test talks to a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from fleetmem import (
    BackendUnavailableError,
    ConfigurationError,
    SchemaVersionError,
    SerializationError,
)
from fleetmem.testing.servers import find_free_port

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore, init_connection  # noqa: E402
from fleetmem.backends.postgres.connector import statements  # noqa: E402
from fleetmem.backends.postgres.migrate import HEAD_REVISION  # noqa: E402


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


# ------------------------------------------------------------------------- construction


def test_from_url_accepts_both_schemes_and_does_no_io() -> None:
    for scheme in ("postgres", "postgresql"):
        store = PostgresStore.from_url(f"{scheme}://u:pw@127.0.0.1:1/db", namespace="n")
        assert store.namespace == "n"
        assert not store.closed


@pytest.mark.parametrize(
    "options",
    [
        {"schema": "bad schema"},
        {"schema": 'x"; DROP TABLE y; --'},
        {"table": "Entries"},
        {"table": "a" * 41},
        {"max_size": 0},
        {"min_size": 5, "max_size": 2},
        {"acquire_timeout": 0},
        {"sweeper_interval": -1.0},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        PostgresStore.from_url("postgresql://127.0.0.1/db", **options)


def test_other_schemes_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        PostgresStore.from_url("mysql://u:secret@host/db")


async def test_unreachable_server_is_backend_unavailable_without_password() -> None:
    port = find_free_port()
    store = PostgresStore.from_url(
        f"postgresql://fleet:s3cret-pw@127.0.0.1:{port}/db", acquire_timeout=1.0
    )
    assert "s3cret-pw" not in repr(store)
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        await store.connect()
    assert time.monotonic() - started < 3
    assert "s3cret-pw" not in str(info.value)
    assert "s3cret-pw" not in repr(info.value)
    health = await store.health()
    assert not health.ok
    assert "s3cret-pw" not in json.dumps(health.details)
    await store.close()


# ------------------------------------------------------------------------- schema version


async def test_fresh_database_is_migrated_at_connect(fleetmem_postgres_empty_database: str) -> None:
    dsn = fleetmem_postgres_empty_database
    async with PostgresStore.from_url(dsn, namespace="a") as store:
        await store.set("k", 1)
        assert await store.get("k") == 1
    rows = await _fetch(dsn, "SELECT version_num FROM fleetmem.alembic_version")
    assert [r[0] for r in rows] == [HEAD_REVISION]


async def test_auto_migrate_false_refuses_a_fresh_database(
    fleetmem_postgres_empty_database: str,
) -> None:
    store = PostgresStore.from_url(fleetmem_postgres_empty_database, auto_migrate=False)
    with pytest.raises(SchemaVersionError, match="fleetmem db upgrade"):
        await store.connect()
    await store.close()
    rows = await _fetch(
        fleetmem_postgres_empty_database, "SELECT to_regclass('fleetmem.entries') IS NULL"
    )
    assert rows[0][0] is True


async def test_auto_migrate_false_accepts_a_migrated_database(
    fleetmem_postgres_database: str,
) -> None:
    async with PostgresStore.from_url(fleetmem_postgres_database, auto_migrate=False) as store:
        assert await store.set_if_absent("k", "v")


async def test_newer_schema_is_refused(fleetmem_postgres_database: str) -> None:
    dsn = fleetmem_postgres_database
    await _fetch(dsn, "UPDATE fleetmem.alembic_version SET version_num = '9999_future'")
    for auto in (True, False):
        store = PostgresStore.from_url(dsn, auto_migrate=auto)
        with pytest.raises(SchemaVersionError, match="newer"):
            await store.connect()
        await store.close()


async def test_custom_schema_and_table_are_separate(
    fleetmem_postgres_empty_database: str,
) -> None:
    dsn = fleetmem_postgres_empty_database
    async with (
        PostgresStore.from_url(dsn, schema="agents", table="memory") as one,
        PostgresStore.from_url(dsn, schema="agents", table="memory2") as two,
    ):
        await one.set("k", "one")
        await two.set("k", "two")
        assert await one.get("k") == "one"
        assert await two.get("k") == "two"
    tables = await _fetch(
        dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'agents' "
        "ORDER BY table_name",
    )
    assert [r[0] for r in tables] == [
        "alembic_version_memory",
        "alembic_version_memory2",
        "memory",
        "memory2",
        "memory2_agents",
        "memory2_changes",
        "memory2_feeds",
        "memory2_jobs",
        "memory2_jobs_awaited",
        "memory2_leases",
        "memory2_snapshot_records",
        "memory2_snapshots",
        "memory_agents",
        "memory_changes",
        "memory_feeds",
        "memory_jobs",
        "memory_jobs_awaited",
        "memory_leases",
        "memory_snapshot_records",
        "memory_snapshots",
    ]


async def test_four_processes_migrate_a_fresh_database_once(
    fleetmem_postgres_empty_database: str,
) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        from fleetmem.backends.postgres import PostgresStore

        async def main() -> None:
            async with PostgresStore.from_url(sys.argv[1], namespace=sys.argv[2]) as store:
                await store.set("k", sys.argv[2])
                print(await store.get("k"))

        asyncio.run(main())
        """
    )
    dsn = fleetmem_postgres_empty_database
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, dsn, f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for index, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, err
        assert out.strip() == f"p{index}"
    rows = await _fetch(dsn, "SELECT version_num FROM fleetmem.alembic_version")
    assert [r[0] for r in rows] == [HEAD_REVISION]


# ------------------------------------------------------------------------- injected pool


async def test_injected_pool_without_codec_is_refused(fleetmem_postgres_database: str) -> None:
    pool = await asyncpg.create_pool(fleetmem_postgres_database, min_size=1, max_size=2)
    try:
        store = PostgresStore(pool=pool)
        with pytest.raises(ConfigurationError, match="init_connection"):
            await store.connect()
        await store.close()
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_injected_pool_migrates_a_fresh_database_and_stays_open(
    fleetmem_postgres_empty_database: str,
) -> None:
    pool = await asyncpg.create_pool(
        fleetmem_postgres_empty_database, min_size=1, max_size=2, init=init_connection
    )
    try:
        async with PostgresStore(pool=pool, namespace="x") as store:
            await store.set("k", [1, 2])
            assert await store.get("k") == [1, 2]
        # The pool is still usable and its connections still carry the codec.
        assert await pool.fetchval("SELECT '{\"a\": 1}'::jsonb") == {"a": 1}
    finally:
        await pool.close()


# ------------------------------------------------------------------------- SQL shape


async def test_key_order_is_code_point_order(fleetmem_postgres_database: str) -> None:
    keys = ["B", "a", "\u00e9", "Z", "\U0001f600", "\uffff", "a/b", "a b", "_", "~"]
    async with PostgresStore.from_url(fleetmem_postgres_database) as store:
        await store.set_many(dict.fromkeys(keys, 1))
        assert await store.keys() == sorted(keys)
        assert list(await store.search("*")) == sorted(keys)


async def _plan(dsn: str, name: str, *args: Any) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET enable_seqscan = off")
        # A generic plan, as a cached prepared statement gets after a few executions.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        query = statements("kv.sql", "fleetmem", "entries")[name]
        rows = await conn.fetch("EXPLAIN " + query, *args)
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.close()


async def test_prefix_and_partition_listing_use_their_indexes(
    fleetmem_postgres_database: str,
) -> None:
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="plans") as store:
        await store.set_many({f"user/{i:05d}": i for i in range(2000)}, partition="p1")
    await _fetch(dsn, "ANALYZE fleetmem.entries")
    plan = await _plan(dsn, "keys", "plans", "user/", "user0", "", 10)
    assert "entries_pkey" in plan and "Sort" not in plan, plan
    plan = await _plan(dsn, "keys_partition", "plans", "user/", "user0", "", 10, "p1")
    assert "entries_partition_idx" in plan and "Sort" not in plan, plan
    plan = await _plan(dsn, "cleanup_expired", "plans")
    assert "entries_expires_idx" in plan, plan


async def test_columns_hold_jsonb_and_server_timestamps(fleetmem_postgres_database: str) -> None:
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="cols") as store:
        entry = await store.set("k", {"n": 1, "s": "x"}, ttl=30)
    rows = await _fetch(
        dsn,
        "SELECT jsonb_typeof(value), value ->> 's', expires_at - updated_at, now() - updated_at "
        "FROM fleetmem.entries WHERE namespace = 'cols' AND key = 'k'",
    )
    kind, text, lifetime, age = rows[0]
    assert (kind, text) == ("object", "x")
    assert abs(lifetime.total_seconds() - 30) < 0.01
    assert age.total_seconds() < 5
    assert entry.expires_at is not None
    assert abs((entry.expires_at - entry.updated_at).total_seconds() - 30) < 0.01


async def test_expiry_follows_the_server_clock(fleetmem_postgres_database: str) -> None:
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="clock") as store:
        await store.set("k", 1)
        # Move the expiry into the server's past directly: the store must treat it as gone.
        await _fetch(
            dsn,
            "UPDATE fleetmem.entries SET expires_at = now() - interval '1 ms' "
            "WHERE namespace = 'clock'",
        )
        assert await store.get("k") is None
        assert not await store.exists("k")
        assert await store.keys() == []
        assert (await store.stats()).expired_pending == 1
        entry = await store.set("k", 2, partition="p")
        assert entry.version == 1 and entry.partition == "p" and entry.expires_at is None


async def test_get_entries_ttl_is_postgresqls_view(fleetmem_postgres_database: str) -> None:
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="ttlview") as store:
        await store.set("a", {"v": 1}, ttl=60, partition="p")
        await store.set("b", [1, 2])
        await store.set("c", "gone", ttl=60)
        await _fetch(
            dsn,
            "UPDATE fleetmem.entries SET expires_at = now() - interval '1 ms' "
            "WHERE namespace = 'ttlview' AND key = 'c'",
        )
        a, b = await store.get_entry("a"), await store.get_entry("b")
        batch = await store.kv.get_entries_ttl(["a", "b", "c", "missing"])
        assert set(batch) == {"a", "b"}  # expired and missing omitted
        assert batch["a"][0] == a and batch["b"][0] == b  # the entries as get_entry reads them
        assert 59_000 <= batch["a"][1] <= 60_000, batch["a"][1]  # type: ignore[operator]
        assert batch["b"][1] is None  # persistent
        # The single-key form (a primary-key lookup) answers the same.
        lone = await store.kv.get_entries_ttl(["a"])
        assert lone["a"][0] == a and 59_000 <= lone["a"][1] <= 60_000  # type: ignore[operator]
        assert await store.kv.get_entries_ttl(["b"]) == {"b": (b, None)}
        assert await store.kv.get_entries_ttl(["c"]) == {}
        assert await store.kv.get_entries_ttl(["missing"]) == {}
        # Many keys (the statement prepared for its array) read the same way.
        await store.set_many({f"m{i}": i for i in range(600)}, ttl=30)
        many = await store.kv.get_entries_ttl([f"m{i}" for i in range(600)])
        assert len(many) == 600
        assert all(29_000 <= left <= 30_000 for _, left in many.values())  # type: ignore[operator]
        assert many["m7"][0].value == 7


async def test_get_entries_ttl_matches_the_servers_subtraction(
    fleetmem_postgres_database: str,
) -> None:
    # Whatever the store reads, it is what the server computes with now(): move the expiry
    # of an entry far from what any clock-based guess from its ttl would give.
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="ttlsrv") as store:
        await store.set("k", 1, ttl=60)
        await _fetch(
            dsn,
            "UPDATE fleetmem.entries SET expires_at = now() + interval '12345.678 s' "
            "WHERE namespace = 'ttlsrv'",
        )
        before = await _fetch(
            dsn,
            "SELECT floor(extract(epoch FROM expires_at - now()) * 1000)::bigint "
            "FROM fleetmem.entries WHERE namespace = 'ttlsrv'",
        )
        left = (await store.kv.get_entries_ttl(["k"]))["k"][1]
        after = await _fetch(
            dsn,
            "SELECT floor(extract(epoch FROM expires_at - now()) * 1000)::bigint "
            "FROM fleetmem.entries WHERE namespace = 'ttlsrv'",
        )
        assert left is not None
        assert after[0][0] <= left <= before[0][0] <= 12_345_678


_SKEWED_TTL_WORKER = textwrap.dedent(
    """
    import asyncio, datetime, json, sys
    from fleetmem.backends.seam import KVBackend
    from fleetmem.backends.postgres import PostgresStore

    async def main():
        async with PostgresStore.from_url(sys.argv[1], namespace="skew") as store:
            await store.set("k", 1, ttl=60)
            server_now = await store.kv.connector.run(0, "SELECT now()", (), write=False)
            app_now = datetime.datetime.now(datetime.timezone.utc)
            server = (await store.kv.get_entries_ttl(["k"]))["k"][1]
            batch = (await store.kv.get_entries_ttl(["k", "other"]))["k"][1]
            local = (await KVBackend.get_entries_ttl(store.kv, ["k"]))["k"][1]
            skew = (app_now - server_now[0][0]).total_seconds()
            print(json.dumps({"skew": skew, "server": server, "batch": batch, "local": local}))

    asyncio.run(main())
    """
)


async def test_get_entries_ttl_ignores_a_skewed_application_clock(
    fleetmem_postgres_database: str,
) -> None:
    import shutil

    if shutil.which("faketime") is None:
        pytest.skip("faketime (libfaketime) is not installed")
    # The application runs an hour behind PostgreSQL (issue 14, bug C: a cache TTL computed
    # with the application's clock would keep an expired entry an hour too long).
    proc = await asyncio.create_subprocess_exec(
        "faketime",
        "-f",
        "-1h",
        sys.executable,
        "-c",
        _SKEWED_TTL_WORKER,
        fleetmem_postgres_database,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    if abs(result["skew"] + 3600) > 60:
        pytest.skip(f"faketime did not move the clock here (skew {result['skew']:.0f} s)")
    assert 59_000 <= result["server"] <= 60_000, result
    assert 59_000 <= result["batch"] <= 60_000, result
    # The application's clock would have said an hour more: the test can tell them apart.
    assert result["local"] > 3_600_000, result


async def test_nul_is_refused_before_any_io(fleetmem_postgres_database: str) -> None:
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="nul") as store:
        for value in ("a\x00b", {"k\x00": 1}, ["\x00"]):
            with pytest.raises(SerializationError):
                await store.set("k", value)
        assert await store.stats() == await store.stats()
        assert (await store.stats()).keys == 0


# ------------------------------------------------------------------------- bulk


async def test_set_get_delete_many_of_100k(fleetmem_postgres_database: str) -> None:
    items = {f"bulk/{i:06d}": {"i": i} for i in range(100_000)}
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="bulk") as store:
        assert await store.set_many(items, partition="b") == 100_000
        got = await store.get_many(list(items))  # one statement, planned for this array
        assert got == items and list(got) == list(items)
        assert (await store.stats()).partitions == {"b": 100_000}
        # Writing them again bumps every version.
        assert await store.set_many(dict(list(items.items())[:10]), ttl=60) == 10
        entry = await store.get_entry("bulk/000003")
        assert entry is not None and entry.version == 2 and entry.partition == "b"
        assert entry.expires_at is not None
        assert await store.delete_many(list(items)) == 100_000
        assert (await store.stats()).keys == 0


# ------------------------------------------------------------------------- pool hygiene


async def test_acquire_timeout_is_backend_unavailable(fleetmem_postgres_database: str) -> None:
    pool = await asyncpg.create_pool(
        fleetmem_postgres_database, min_size=1, max_size=1, init=init_connection
    )
    try:
        store = await PostgresStore(pool=pool, acquire_timeout=0.3).connect()
        held = await pool.acquire()
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                await store.get("k")
            assert 0.25 < time.monotonic() - started < 2
        finally:
            await pool.release(held)
        assert await store.get("k") is None
        await store.close()
    finally:
        await pool.close()


async def test_queue_is_fair_and_bounded(fleetmem_postgres_database: str) -> None:
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace="fifo", min_size=1, max_size=1, acquire_timeout=10
    ) as store:
        finished: list[int] = []
        await asyncio.gather(store.get("warm"), store.get("up"))

        async def write(i: int) -> None:
            await store.set(f"k{i}", i)
            finished.append(i)

        await asyncio.gather(*(write(i) for i in range(40)))
        # One connection: callers are served strictly in arrival order.
        assert finished == list(range(40))
        health = await store.health()
        assert health.ok and health.details["pool_size"] == 1


async def test_sweeper_frees_expired_rows(fleetmem_postgres_database: str) -> None:
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="sweep", sweeper_interval=0.1) as store:
        await store.set_many({f"k{i}": i for i in range(50)}, ttl=0.05)
        await store.set("kept", 1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            rows = await _fetch(
                dsn, "SELECT count(*) FROM fleetmem.entries WHERE namespace = 'sweep'"
            )
            if rows[0][0] == 1:
                break
            await asyncio.sleep(0.1)
        assert rows[0][0] == 1
        assert await store.get("kept") == 1
    # Closing the store stopped the sweeper task.
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "fleetmem-pg-sweeper"]


async def test_cleanup_expired_counts_this_namespace_only(
    fleetmem_postgres_database: str,
) -> None:
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="c1") as one:
        two = one.with_namespace("c1x")
        await one.set_many({f"k{i}": i for i in range(5)}, ttl=0.05)
        await two.set_many({f"k{i}": i for i in range(3)}, ttl=0.05)
        await asyncio.sleep(0.15)
        assert await one.cleanup_expired() == 5
        assert await two.cleanup_expired() == 3
        await two.close()
        assert not one.closed


# ------------------------------------------------------------------------- atomicity


_INCR_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from fleetmem.backends.postgres import PostgresStore

    async def main() -> None:
        dsn, ns, coroutines, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        async with PostgresStore.from_url(dsn, namespace=ns, max_size=10) as store:
            async def worker(index: int) -> int:
                wins = 0
                for _ in range(rounds):
                    await store.incr("counter")
                    await store.incr("floats", 0.5)
                    if await store.set_if_absent(f"once", index):
                        wins += 1
                return wins
            wins = await asyncio.gather(*(worker(i) for i in range(coroutines)))
        print(sum(wins))

    asyncio.run(main())
    """
)


async def test_incr_is_exact_across_four_processes(fleetmem_postgres_database: str) -> None:
    processes, coroutines, rounds = 4, 50, 5
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _INCR_WORKER,
                fleetmem_postgres_database,
                "atomic",
                str(coroutines),
                str(rounds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    assert sum(int(out) for out, _ in outputs) == 1  # set_if_absent won exactly once
    total = processes * coroutines * rounds
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="atomic") as store:
        assert await store.get("counter") == total
        assert await store.get("floats") == total * 0.5
        entry = await store.get_entry("counter")
        assert entry is not None and entry.version == total


# ------------------------------------------------------------------------- the choke point


def _lost_after_server_error(state_error: Any) -> Any:
    exc = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    exc.__cause__ = state_error
    return exc


@pytest.mark.parametrize(
    ("make", "write", "expected"),
    [
        # Died in flight: a read may run again, a write's outcome is unknown.
        (lambda: asyncpg.ConnectionDoesNotExistError("closed in the middle"), False, "retry"),
        (
            lambda: asyncpg.ConnectionDoesNotExistError("closed in the middle"),
            True,
            "OutcomeUnknownError",
        ),
        (lambda: ConnectionResetError(), True, "OutcomeUnknownError"),
        (lambda: asyncio.TimeoutError(), True, "OutcomeUnknownError"),
        (lambda: asyncio.TimeoutError(), False, "BackendUnavailableError"),
        # The server ended the session before running the statement: safe to run again.
        (
            lambda: _lost_after_server_error(asyncpg.AdminShutdownError("terminating")),
            True,
            "retry",
        ),
        (lambda: asyncpg.CannotConnectNowError("starting up"), True, "retry"),
        # Known closed before sending.
        (
            lambda: asyncpg.InterfaceError("cannot perform operation: connection is closed"),
            True,
            "retry",
        ),
        (
            lambda: asyncpg.UndefinedTableError("relation does not exist"),
            False,
            "SchemaVersionError",
        ),
        (lambda: asyncpg.DiskFullError("disk full"), True, "BackendUnavailableError"),
        # Opening a connection refused: not a lost connection.
        (
            lambda: asyncpg.TooManyConnectionsError("sorry, too many clients already"),
            False,
            "BackendUnavailableError",
        ),
        # A data exception (class 22) is a bad argument, a ValueError.
        (lambda: asyncpg.DataError("invalid input"), False, "InvalidArgumentError"),
        (
            lambda: asyncpg.CharacterNotInRepertoireError("invalid byte sequence"),
            True,
            "InvalidArgumentError",
        ),
    ],
)
def test_driver_errors_are_translated_at_one_place(make: Any, write: bool, expected: str) -> None:
    from fleetmem.backends.postgres.connector import _RETRY, _translate

    result = _translate(make(), write=write, sent=True, can_retry=True)
    assert ("retry" if result is _RETRY else type(result).__name__) == expected
    if expected == "retry":
        # The second attempt never retries again.
        final = _translate(make(), write=write, sent=True, can_retry=False)
        assert isinstance(final, BackendUnavailableError)
        assert not isinstance(final, asyncpg.PostgresError)


def test_a_refused_connection_is_never_called_lost() -> None:
    from fleetmem.backends.postgres.connector import _translate

    exc = asyncpg.TooManyConnectionsError("sorry, too many clients already")
    err = _translate(exc, write=True, sent=False, can_retry=False)
    assert isinstance(err, BackendUnavailableError)
    assert "refused a new connection: too many clients" in str(err)
    assert "lost" not in str(err)


async def test_least_privilege_role_from_the_docs_is_enough(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    dsn = fleetmem_postgres_database
    database = urlsplit(dsn).path.lstrip("/")
    role = "fm_app_" + fleetmem_namespace.replace("-", "_").lower()[:40]
    await _fetch(dsn, f'CREATE ROLE "{role}" LOGIN')
    try:
        for grant in (
            f'GRANT USAGE ON SCHEMA fleetmem TO "{role}"',
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries TO "{role}"',
            # Every write looks its namespace's change feed up (migration 0005).
            "GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries_feeds, "
            f'fleetmem.entries_changes TO "{role}"',
            f'GRANT SELECT ON fleetmem.alembic_version TO "{role}"',
            f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"',
        ):
            await _fetch(dsn, grant)
        parts = urlsplit(dsn)
        app_dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        async with PostgresStore.from_url(app_dsn, namespace="lp", auto_migrate=False) as store:
            await store.set("k", 1, ttl=60)
            assert await store.incr("k") == 2
            assert await store.set_many({"a": 1, "b": 2}) == 2
            assert await store.search("*") == {"a": 1, "b": 2, "k": 2}
            assert await store.cleanup_expired() == 0
            assert await store.clear() == 3
    finally:
        await _fetch(dsn, f'DROP OWNED BY "{role}"')
        await _fetch(dsn, f'DROP ROLE "{role}"')


async def test_command_timeout_bounds_a_blocked_statement(fleetmem_postgres_database: str) -> None:
    from fleetmem import OutcomeUnknownError

    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace="slow", command_timeout=0.3) as store:
        await store.set("k", 1)
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM fleetmem.entries WHERE namespace = 'slow' FOR UPDATE"
                )
                started = time.monotonic()
                with pytest.raises(OutcomeUnknownError, match="timed out"):
                    await store.set("k", 2)
                assert 0.25 < time.monotonic() - started < 1.5
                assert await store.get("k") == 1  # reads still work meanwhile
                # The server was asked to cancel the statement: wait for it to be gone.
                for _ in range(100):
                    waiting = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    )
                    if waiting == 0:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await conn.close()
        assert (await store.set("k", 3)).version == 2
        health = await store.health()
        assert health.ok
