"""SQLiteStore behaviour the shared conformance suite does not cover.

Restarts, several processes on one file, the event loop staying free while SQLite works,
lock timeouts, in-memory databases, URL parsing and the schema version check.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetmem import (
    BackendUnavailableError,
    ConfigurationError,
    FleetmemError,
    SchemaVersionError,
    StoreClosedError,
    open_store,
)
from fleetmem.backends.sqlite import SCHEMA_VERSION, SQLiteStore

pytestmark = pytest.mark.sqlite


@pytest.fixture
async def db_path(tmp_path: Path) -> Path:
    return tmp_path / "fleetmem.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore(db_path, namespace="unit").connect()
    try:
        yield opened
    finally:
        await opened.close()


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the same file, as another process would hold it."""
    return sqlite3.connect(path, isolation_level=None, timeout=0.1)


# ---------------------------------------------------------------------------- durability


async def test_entries_survive_close_and_reopen(db_path: Path) -> None:
    first = await SQLiteStore(db_path, namespace="a").connect()
    await first.set("plain", {"n": [1, 2.5, "x", None, True]})
    await first.set("moved", 1)
    await first.set("moved", 2, partition="runs")
    await first.set("short", "v", ttl=3600)
    assert await first.incr("count", 41) == 41
    await first.with_namespace("b").set("plain", "other namespace")
    before = {k: await first.get_entry(k) for k in ("plain", "moved", "short", "count")}
    await first.close()

    second = await SQLiteStore(db_path, namespace="a").connect()
    try:
        for key, entry in before.items():
            assert await second.get_entry(key) == entry
        assert (await second.get_entry("moved")).version == 2  # type: ignore[union-attr]
        remaining = await second.ttl("short")
        assert remaining is not None and 3500 < remaining <= 3600
        assert await second.incr("count") == 42
        assert await second.partitions() == ["default", "runs"]
        assert await second.with_namespace("b").get("plain") == "other namespace"
    finally:
        await second.close()


async def test_expired_rows_stay_invisible_until_cleanup(store: SQLiteStore, db_path: Path) -> None:
    other = store.with_namespace("unit-other")
    await store.set("gone", 1, ttl=0.05)
    await other.set("gone", 1, ttl=0.05)
    await store.set("kept", 2)
    await asyncio.sleep(0.1)
    raw = _raw(db_path)
    try:
        assert raw.execute("SELECT count(*) FROM fleetmem_entries").fetchone()[0] == 3
        assert await store.get("gone") is None
        stats = await store.stats()
        assert (stats.keys, stats.expired_pending) == (1, 1)
        assert await store.cleanup_expired() == 1
        # Only this namespace's expired row was removed.
        rows = raw.execute("SELECT namespace, key FROM fleetmem_entries ORDER BY 1, 2").fetchall()
        assert rows == [("unit", "kept"), ("unit-other", "gone")]
    finally:
        raw.close()


async def test_database_runs_in_wal_mode(store: SQLiteStore, db_path: Path) -> None:
    await store.set("k", 1)
    health = await store.health()
    assert health.ok
    assert health.details["journal_mode"] == "wal"
    assert health.details["path"] == str(db_path)
    raw = _raw(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


# ---------------------------------------------------------------------------- several processes

_CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path
from fleetmem.backends.sqlite import SQLiteStore

path, mode, ident, sync_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])

async def main():
    store = await SQLiteStore(path, namespace="procs", busy_timeout=30).connect()
    (sync_dir / f"ready-{ident}").touch()
    deadline = time.monotonic() + 60
    while not (sync_dir / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        await asyncio.sleep(0.005)
    out = []
    if mode == "incr":
        for _ in range(50):
            out.append(await store.incr("counter"))
    elif mode == "absent":
        for i in range(20):
            out.append(await store.set_if_absent(f"race/{i}", ident))
    elif mode == "cas":
        for _ in range(25):
            for _attempt in range(10_000):
                entry = await store.get_entry("cas")
                version = 0 if entry is None else entry.version
                value = 0 if entry is None else entry.value
                try:
                    await store.compare_and_set("cas", value + 1, version=version)
                    break
                except Exception as exc:
                    if type(exc).__name__ != "VersionConflictError":
                        raise
            else:
                raise SystemExit("compare_and_set never succeeded")
    await store.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def _run_processes(db_path: Path, mode: str, count: int = 4) -> list[list[object]]:
    """Run ``count`` processes on one file, released together; return each one's results."""
    sync_dir = db_path.parent / f"sync-{mode}"
    sync_dir.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(db_path), mode, str(i), str(sync_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(sync_dir.glob("ready-*"))) < count:
            assert all(p.poll() is None for p in procs), "a child process died before starting"
            assert time.monotonic() < deadline, "child processes did not start"
            time.sleep(0.01)
        (sync_dir / "go").touch()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            results.append(__import__("json").loads(out))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def _read(db_path: Path, key: str) -> object:
    async with SQLiteStore(db_path, namespace="procs") as reader:
        return await reader.get(key)


async def test_incr_is_exact_across_processes(db_path: Path) -> None:
    results = await asyncio.to_thread(_run_processes, db_path, "incr")
    returned = sorted(n for per_process in results for n in per_process)  # type: ignore[type-var]
    # Every increment saw a distinct value: none was lost or applied twice.
    assert returned == list(range(1, 201))
    assert await _read(db_path, "counter") == 200


async def test_set_if_absent_has_one_winner_across_processes(db_path: Path) -> None:
    results = await asyncio.to_thread(_run_processes, db_path, "absent")
    for i in range(20):
        winners = [ident for ident, per_process in enumerate(results) if per_process[i] is True]
        assert len(winners) == 1, f"race/{i} had winners {winners}"
        assert await _read(db_path, f"race/{i}") == winners[0]


async def test_compare_and_set_is_exact_across_processes(db_path: Path) -> None:
    await asyncio.to_thread(_run_processes, db_path, "cas")
    async with SQLiteStore(db_path, namespace="procs") as reader:
        entry = await reader.get_entry("cas")
    assert entry is not None
    assert (entry.value, entry.version) == (100, 100)


# ---------------------------------------------------------------------------- the event loop


async def test_event_loop_runs_while_a_write_waits_for_the_lock(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.set("k", "before")
    blocker = _raw(db_path)
    blocker.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
    try:
        ticks = 0
        write = asyncio.create_task(store.set("k", "after"))
        for _ in range(20):
            await asyncio.sleep(0.005)
            ticks += 1
        # The loop kept running while the write could not proceed.
        assert ticks == 20
        assert not write.done()
        # Readers on other connections do not wait for the writer (WAL).
        async with SQLiteStore(db_path, namespace="unit") as reader:
            assert await asyncio.wait_for(reader.get("k"), 5) == "before"
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    entry = await asyncio.wait_for(write, 10)
    assert (entry.value, entry.version) == ("after", 2)


async def test_event_loop_ticks_during_a_large_set_many(store: SQLiteStore) -> None:
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks = 0
    try:
        # set_many validates on the loop; the SQLite work must leave the loop free to run the
        # ticker. Were it run on the loop, no tick could happen before it returned.
        assert await store.set_many({f"bulk/{i:05d}": {"i": i} for i in range(20_000)}) == 20_000
        during = ticks
    finally:
        running = False
        await task
    assert during >= 1
    assert (await store.stats()).keys == 20_000


# ---------------------------------------------------------------------------- errors


async def test_lock_held_past_busy_timeout_is_backend_unavailable(db_path: Path) -> None:
    store = await SQLiteStore(db_path, namespace="unit", busy_timeout=0.05).connect()
    blocker = _raw(db_path)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(BackendUnavailableError, match="locked") as caught:
            await store.incr("n")
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)
        blocker.execute("COMMIT")
        assert await store.incr("n") == 1  # nothing was applied by the failed call
    finally:
        blocker.close()
        await store.close()


async def test_unopenable_path_is_backend_unavailable(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing-dir" / "x.db")
    with pytest.raises(BackendUnavailableError):
        await store.connect()
    health = await store.health()
    assert not health.ok
    assert "sqlite3" not in type(health).__module__
    await store.close()


async def test_file_that_is_not_a_database_is_a_fleetmem_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a.db"
    path.write_bytes(b"this is not a database file, just some text " * 100)
    store = SQLiteStore(path)
    with pytest.raises(FleetmemError) as caught:
        await store.connect()
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)
    await store.close()


async def test_newer_schema_is_refused(db_path: Path) -> None:
    async with SQLiteStore(db_path) as first:
        await first.set("k", 1)
    raw = _raw(db_path)
    raw.execute(
        "UPDATE fleetmem_meta SET value = ? WHERE name = 'schema_version'",
        (str(SCHEMA_VERSION + 1),),
    )
    raw.close()
    store = SQLiteStore(db_path)
    with pytest.raises(SchemaVersionError, match="newer"):
        await store.connect()
    # The refused file was left as it was.
    raw = _raw(db_path)
    try:
        assert raw.execute("SELECT value FROM fleetmem_meta").fetchall() == [
            (str(SCHEMA_VERSION + 1),)
        ]
        assert raw.execute("SELECT count(*) FROM fleetmem_entries").fetchone()[0] == 1
    finally:
        raw.close()
        await store.close()


async def test_schema_creation_is_idempotent(db_path: Path) -> None:
    for _ in range(3):
        async with SQLiteStore(db_path) as store:
            await store.incr("n")
    async with SQLiteStore(db_path) as store:
        assert await store.get("n") == 3


# ---------------------------------------------------------------------------- lifecycle


async def test_operations_open_the_database_without_connect(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    try:
        await store.set("k", 1)
        assert await store.get("k") == 1
    finally:
        await store.close()


async def test_closing_a_view_keeps_the_owner_open(store: SQLiteStore) -> None:
    view = store.with_namespace("view")
    await view.set("k", 1)
    await view.close()
    with pytest.raises(StoreClosedError):
        await view.get("k")
    assert await store.with_namespace("view").get("k") == 1
    await store.close()
    with pytest.raises(StoreClosedError):
        await store.get("k")
    await store.close()  # idempotent


# ---------------------------------------------------------------------------- in memory and URLs


async def test_in_memory_database_is_shared_by_views_only() -> None:
    async with open_store("sqlite://", namespace="a") as store:
        assert isinstance(store, SQLiteStore)
        assert store.path == ":memory:"
        await store.set("k", 1)
        view = store.with_namespace("b")
        await view.set("k", 2)
        assert await store.with_namespace("b").get("k") == 2
        assert await store.get("k") == 1
        assert (await store.health()).details["journal_mode"] == "memory"
        async with open_store("sqlite:///:memory:", namespace="a") as separate:
            assert await separate.get("k") is None


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///relative/path.db", "relative/path.db"),
        ("sqlite:///./fleetmem.db", "./fleetmem.db"),
        ("sqlite:////abs/path.db", "/abs/path.db"),
        ("SQLITE:////abs/path.db", "/abs/path.db"),
        ("sqlite:///with%20space.db", "with space.db"),
        ("sqlite://", ":memory:"),
        ("sqlite:///", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_from_url_paths(url: str, path: str) -> None:
    store = SQLiteStore.from_url(url, namespace="n")
    assert store.path == path
    assert store.namespace == "n"


def test_from_url_options() -> None:
    store = SQLiteStore.from_url("sqlite:///x.db?busy_timeout=0.5&synchronous=full")
    assert store.kv.connector.busy_timeout == 0.5
    assert store.kv.connector.synchronous == "full"
    assert (
        SQLiteStore.from_url(
            "sqlite:///x.db?busy_timeout=0.5", busy_timeout=2
        ).kv.connector.busy_timeout
        == 2
    )
    with pytest.raises(ConfigurationError, match="unknown"):
        SQLiteStore.from_url("sqlite:///x.db?cache=shared")
    with pytest.raises(ConfigurationError, match="host"):
        SQLiteStore.from_url("sqlite://somehost/x.db")
    with pytest.raises(ConfigurationError):
        SQLiteStore.from_url("sqlite:///x.db?busy_timeout=soon")
    with pytest.raises(ConfigurationError):
        SQLiteStore("x.db", busy_timeout=-1)
    with pytest.raises(ConfigurationError):
        SQLiteStore("x.db", synchronous="off")


# ---------------------------------------------------------------------------- key ranges


async def test_prefix_and_cursor_ranges_at_the_edges_of_unicode(store: SQLiteStore) -> None:
    keys = [
        "a",
        "a\U0010ffff",
        "a\U0010ffffz",
        "ab",
        "b",
        "\ud7ff",
        "\ud7ffx",
        "\ue000",
        "\U0010ffff",
        "\U0010ffff\U0010ffff",
        "x/1",
        "x/10",
        "x/1/a",
        "x/2",
    ]
    await store.set_many(dict.fromkeys(keys, 0))
    ordered = sorted(keys)  # Python orders str by code point
    assert await store.keys() == ordered
    for prefix in ("a", "a\U0010ffff", "\ud7ff", "\U0010ffff", "x/1", "x/", "zz"):
        expected = [k for k in ordered if k.startswith(prefix)]
        assert await store.keys(prefix) == expected, prefix
        assert list(await store.search(prefix + "*")) == expected, prefix
    # Paging with ``after`` visits every key once, also after a key that is a prefix of others.
    for prefix in ("", "x/", "a"):
        seen: list[str] = []
        after: str | None = None
        for _ in range(len(keys) + 1):
            page = await store.keys(prefix, limit=2, after=after)
            if not page:
                break
            seen.extend(page)
            after = page[-1]
        assert seen == [k for k in ordered if k.startswith(prefix)], prefix
