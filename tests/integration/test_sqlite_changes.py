"""The change feed on SQLite, beyond the shared conformance suite.

What each KV write records (and what records nothing), the one probe of the feed's flag per
write transaction and nothing remembered between them (a feed enabled by another store or
process is honoured by the next write), a second process writing while this one watches
(every change exactly once, in order), trimming past retention, epochs across disable and
enable, a write whose change cannot be recorded changes nothing, and the in-place upgrade of
files written before change feeds existed (schema version 3).
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest

from fleetmem import (
    ChangesExpiredError,
    ChangesNotEnabledError,
    FleetmemError,
    InvalidArgumentError,
    LeaseLostError,
    NotANumberError,
    VersionConflictError,
)
from fleetmem.backends.seam import SetOp, decode_cursor
from fleetmem.backends.sqlite import SCHEMA_VERSION, SQLiteStore
from fleetmem.backends.sqlite import changes as changes_module
from fleetmem.backends.sqlite.changes import SQLiteChanges
from fleetmem.protocol import Change

pytestmark = pytest.mark.sqlite

NS = "sqlite-changes"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "changes.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore(db_path, namespace=NS, busy_timeout=30).connect()
    try:
        yield opened
    finally:
        await opened.close()


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the same file, as another process would hold it."""
    return sqlite3.connect(path, isolation_level=None, timeout=10)


def _rows(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    raw = _raw(path)
    try:
        return raw.execute(sql, args).fetchall()
    finally:
        raw.close()


def _brief(changes: list[Change]) -> list[tuple[Any, ...]]:
    """(op, key, partition, version, value, has expiry) of each change."""
    return [
        (c.op, c.key, c.partition, c.version, c.value, c.expires_at is not None) for c in changes
    ]


async def _all(store: SQLiteStore, since: str | None = None) -> list[Change]:
    out: list[Change] = []
    while True:
        batch = await store.changes.read(since=since, limit=1000)
        out.extend(batch.changes)
        since = batch.cursor
        if not batch.changes:
            return out


def _backend(store: SQLiteStore) -> SQLiteChanges:
    backend = store._kv.changes()
    assert isinstance(backend, SQLiteChanges)
    return backend


# ---------------------------------------------------------------------------- recording


async def test_each_write_records_its_changes(store: SQLiteStore) -> None:
    await store.changes.enable()
    lease = await store.leases.acquire("L", owner="me", ttl=60)
    assert lease is not None

    await store.set("a", {"n": 1}, ttl=60)
    await store.set("a", {"n": 2}, keep_ttl=True, partition="p")
    assert await store.set_many({"b": 1, "c": [1, 2]}, partition="q") == 2
    assert await store.set_if_absent("a", "lost") is False
    assert await store.set_if_absent("d", "won") is True
    with pytest.raises(VersionConflictError):
        await store.compare_and_set("d", "x", version=7)
    await store.compare_and_set("d", "cas", version=1)
    assert await store.incr("n", 5) == 5
    await store.set("s", "text")
    with pytest.raises(NotANumberError):
        await store.incr("s", 1)
    assert await store.expire("b", 30) is True
    assert await store.persist("b") is True
    assert await store.expire("nope", 30) is False
    assert await store.delete("nope") is False
    assert await store.delete("s") is True
    assert await store.delete_many(["c", "nope", "d"]) == 2
    await store.set("f", 1, fence=lease)
    await store.delete("f", fence=lease)
    assert await store.leases.release(lease)
    with pytest.raises(LeaseLostError):
        await store.set("f", 2, fence=lease)
    assert await store.clear_partition("q") == 1  # b
    assert await store.clear_partition("q") == 0  # nothing: no change
    assert await store.cleanup_expired() == 0
    assert await store.clear() == 2  # a and n
    assert await store.clear() == 0

    changes = await _all(store)
    assert _brief(changes) == [
        ("set", "a", "default", 1, {"n": 1}, True),
        ("set", "a", "p", 2, {"n": 2}, True),  # keep_ttl: the expiry stays
        ("set", "b", "q", 1, 1, False),
        ("set", "c", "q", 1, [1, 2], False),
        ("set", "d", "default", 1, "won", False),
        ("set", "d", "default", 2, "cas", False),
        ("set", "n", "default", 1, 5, False),
        ("set", "s", "default", 1, "text", False),
        ("ttl", "b", "q", 1, None, True),
        ("ttl", "b", "q", 1, None, False),
        ("delete", "s", "default", None, None, False),
        ("delete", "c", "q", None, None, False),
        ("delete", "d", "default", None, None, False),
        ("set", "f", "default", 1, 1, False),
        ("delete", "f", "default", None, None, False),
        ("clear", None, "q", None, None, False),
        ("clear", None, None, None, None, False),
    ]
    cursors = [c.cursor for c in changes]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    assert all(c.at.tzinfo is timezone.utc for c in changes)
    entry_a = changes[0]
    assert entry_a.expires_at is not None and entry_a.expires_at > entry_a.at
    assert await store.changes.cursor() == cursors[-1]


async def test_expired_entries_removed_record_nothing(store: SQLiteStore, db_path: Path) -> None:
    await store.changes.enable()
    await store.set("gone", 1, ttl=60)
    await store.set("gone2", 1, ttl=60)
    await store.set("gone3", 1, ttl=60, partition="x")
    raw = _raw(db_path)
    try:  # expired an hour ago, without waiting
        raw.execute("UPDATE fleetmem_entries SET expires_at = expires_at - 7200000")
    finally:
        raw.close()
    head = await store.changes.cursor()
    assert await store.delete("gone") is False
    assert await store.delete_many(["gone2"]) == 0
    assert await store.expire("gone3", 10) is False
    assert await store.clear_partition("x") == 0
    assert await store.clear() == 0
    assert await store.cleanup_expired() == 0
    assert (await store.changes.read(since=head)).changes == []
    # Overwriting an expired entry is a new entry: version 1.
    await store.set("gone", 2)
    assert _brief((await store.changes.read(since=head)).changes) == [
        ("set", "gone", "default", 1, 2, False)
    ]


async def test_batches_and_chunks_record_every_key(store: SQLiteStore) -> None:
    await store.changes.enable()
    kv = store._kv
    results = await kv.set_batch(
        [SetOp("x", b"1", None, None, False), SetOp("y", b"2", None, "p", False)]
    )
    assert not any(isinstance(r, BaseException) for r in results)
    assert await kv.delete_batch(["x", "absent"]) == [True, False]
    chunks = iter([[("c1", b"1"), ("c2", b"2")], [], [("c3", b"3")]])
    assert await kv.set_many(chunks, None, None) == 3
    many = {f"k{i:05d}": i for i in range(2500)}
    assert await store.set_many(many) == 2500
    changes = await _all(store)
    assert _brief(changes[:6]) == [
        ("set", "x", "default", 1, 1, False),
        ("set", "y", "p", 1, 2, False),
        ("delete", "x", "default", None, None, False),
        ("set", "c1", "default", 1, 1, False),
        ("set", "c2", "default", 1, 2, False),
        ("set", "c3", "default", 1, 3, False),
    ]
    assert [(c.key, c.value) for c in changes[6:]] == list(many.items())


async def test_nothing_is_recorded_without_a_feed(store: SQLiteStore, db_path: Path) -> None:
    assert await store.changes.enabled() is False
    with pytest.raises(ChangesNotEnabledError):
        await store.changes.read()
    with pytest.raises(ChangesNotEnabledError):
        await store.changes.cursor()
    await store.changes.disable()  # nothing to disable: nothing happens
    await store.set("a", 1)
    await store.set_many({"b": 1, "c": 2})
    await store.delete("a")
    await store.clear()
    assert _rows(db_path, "SELECT count(*) FROM fleetmem_changes") == [(0,)]
    # Another namespace's feed records only its own namespace.
    other = store.with_namespace("other")
    await other.changes.enable()
    await store.set("a", 2)
    await other.set("o", 1)
    assert _rows(db_path, "SELECT namespace, key FROM fleetmem_changes") == [("other", "o")]
    await store.changes.enable()
    assert (await store.changes.read()).changes == []  # nothing from before the enable


async def test_one_probe_per_write_transaction_and_nothing_cached(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write reads the feed's flag once, inside its transaction (never once per row);
    without a feed that probe is all it pays."""
    monkeypatch.setattr(changes_module, "TRIM_EVERY", 3600.0)  # no trim but the first
    statements: list[str] = []

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(statements.append)

    await store._kv.connector.call(trace)
    try:
        for enabled in (False, True):
            if enabled:
                await store.changes.enable()
            statements.clear()
            chunks = [[(f"{enabled}{c}{i}", b"1") for i in range(50)] for c in "ab"]
            assert await store._kv.set_many(iter(chunks), None, None) == 100
            await store.set("one", 1)
            await store.delete("one")
            probes = [s for s in statements if "FROM fleetmem_feeds" in s]
            assert len(probes) == 3, statements
    finally:
        await store._kv.connector.call(lambda conn: conn.set_trace_callback(None))


async def test_a_write_whose_change_cannot_be_recorded_changes_nothing(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.changes.enable()
    await store.set("a", 1)
    raw = _raw(db_path)
    try:
        raw.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON fleetmem_changes "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    finally:
        raw.close()
    with pytest.raises(FleetmemError, match="refused"):
        await store.set("a", 2)
    with pytest.raises(FleetmemError, match="refused"):
        await store.set_many({"a": 3, "b": 3})
    with pytest.raises(FleetmemError, match="refused"):
        await store.delete("a")
    with pytest.raises(FleetmemError, match="refused"):
        await store.clear()
    entry = await store.get_entry("a")
    assert entry is not None and (entry.value, entry.version) == (1, 1)
    assert await store.exists("b") is False


# ---------------------------------------------------------------------------- several stores


async def test_a_feed_enabled_by_one_store_is_honoured_by_another(db_path: Path) -> None:
    """Two stores on one file are two connections, as two processes would hold them: the
    second one, opened and written through before, records from its next write on."""
    async with (
        SQLiteStore(db_path, namespace=NS) as first,
        SQLiteStore(db_path, namespace=NS) as second,
    ):
        await second.set("before", 1)
        await first.changes.enable()
        assert await second.changes.enabled() is True
        await second.set("after", 2)
        await second.delete("before")
        assert _brief(await _all(first)) == [
            ("set", "after", "default", 1, 2, False),
            ("delete", "before", "default", None, None, False),
        ]
        # A watcher of one store sees the other's writes (by polling the file).
        cursor = await first.changes.cursor()
        seen: list[Change] = []

        async def watch() -> None:
            async for change in first.changes.watch(since=cursor):
                seen.append(change)
                if len(seen) == 2:
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        await second.set("live", 1)
        await second.incr("live2", 1)
        await asyncio.wait_for(watcher, 30)
        assert [(c.key, c.version) for c in seen] == [("live", 1), ("live2", 1)]
        # Disabled by the first: the second's writes record nothing from then on.
        await first.changes.disable()
        await second.set("unrecorded", 1)
        assert _rows(db_path, "SELECT count(*) FROM fleetmem_changes") == [(0,)]
        with pytest.raises(ChangesNotEnabledError):
            await second.changes.read()


async def test_watchers_of_this_process_are_woken_at_once(store: SQLiteStore) -> None:
    await store.changes.enable()
    backend = _backend(store)
    epoch, pos = await backend.head()
    with backend.watch() as w:
        waiting = asyncio.create_task(backend.wait(w, epoch, pos, 60))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await store.set("k", 1)
        await asyncio.wait_for(waiting, 10)
    # Without a wake-up, wait ends at its timeout.
    epoch, pos = await backend.head()
    with backend.watch() as w:
        await asyncio.wait_for(backend.wait(w, epoch, pos, 0.2), 10)


# A process of its own on the file, in namespace NS: say "ready", wait for a line on stdin, then
# write COUNT changes (sets of keys c0..c6 with increasing values, every 10th a delete of the
# key just set), sleeping a little now and then so the reader overlaps; say "done".
_CHILD = r"""
import asyncio, sys
from fleetmem.backends.sqlite import SQLiteStore

async def main(path, count):
    async with SQLiteStore(path, namespace="sqlite-changes", busy_timeout=30) as store:
        await store.exists("x")
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(count):
            key = f"c{i % 7}"
            if i % 10 == 9:
                await store.delete(key)
            else:
                await store.set(key, i)
            if i % 25 == 0:
                await asyncio.sleep(0.005)
        print("done", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"child process ended early: {proc.stderr.read()}")
    return line.strip()


async def test_another_process_writing_while_this_one_watches(store: SQLiteStore) -> None:
    """Every change of the other process and of this one arrives exactly once, in the order
    they took effect (per key the versions increase), through a live watch and a plain read."""
    count = 400
    await store.changes.enable()
    start = await store.changes.cursor()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(store.path), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert await _line(proc) == "ready"
        seen: list[Change] = []
        expected = count + count // 2

        async def watch() -> None:
            async for change in store.changes.watch(since=start):
                seen.append(change)
                if len(seen) == expected:
                    return

        watcher = asyncio.create_task(watch())
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        for i in range(count // 2):  # this process writes too, interleaved
            await store.set(f"p{i % 5}", i)
            if i % 20 == 0:
                await asyncio.sleep(0.01)
        assert await _line(proc) == "done"
        await asyncio.wait_for(watcher, 60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    read = await _all(store, since=start)
    assert read == seen
    cursors = [c.cursor for c in seen]
    assert cursors == sorted(cursors) and len(set(cursors)) == expected
    child = [c for c in seen if c.key is not None and c.key.startswith("c")]
    mine = [c for c in seen if c.key is not None and c.key.startswith("p")]
    assert [c.value for c in mine] == list(range(count // 2))
    assert [(c.op, c.key, c.value) for c in child] == [
        ("delete", f"c{i % 7}", None) if i % 10 == 9 else ("set", f"c{i % 7}", i)
        for i in range(count)
    ]
    # Per key, versions go up by one between deletes (a set after a delete starts at 1).
    last: dict[str, int] = {}
    for c in seen:
        assert c.key is not None
        if c.op == "delete":
            last.pop(c.key, None)
        else:
            assert c.version == last.get(c.key, 0) + 1
            last[c.key] = c.version


# ---------------------------------------------------------------------------- retention


def _age(path: Path, up_to: int, ms: int) -> None:
    """Make the changes with an id up to ``up_to`` ``ms`` older (no waiting in tests)."""
    raw = _raw(path)
    try:
        raw.execute("UPDATE fleetmem_changes SET at = at - ?1 WHERE id <= ?2", (ms, up_to))
    finally:
        raw.close()


async def test_changes_past_retention_are_trimmed(store: SQLiteStore, db_path: Path) -> None:
    await store.changes.enable(retention=60)
    empty = await store.changes.cursor()
    for i in range(5):
        await store.set(f"k{i}", i)
    changes = await _all(store)
    ids = [decode_cursor(NS, c.cursor)[1] for c in changes]
    _age(db_path, ids[2], 61_000)  # the first three are past retention
    with pytest.raises(ChangesExpiredError) as caught:
        await store.changes.read(since=empty)
    assert caught.value.oldest == changes[2].cursor
    with pytest.raises(ChangesExpiredError):
        await store.changes.read(since=changes[1].cursor)
    # From the oldest readable cursor, or from None: what is left, nothing skipped silently.
    assert (await store.changes.read(since=caught.value.oldest)).changes == changes[3:]
    assert (await store.changes.read()).changes == changes[3:]
    assert (await store.changes.read(since=changes[3].cursor)).changes == changes[4:]
    assert _rows(db_path, "SELECT count(*) FROM fleetmem_changes") == [(2,)]
    # All trimmed: the head stays where it was (the floor), and reads from it are fine.
    _age(db_path, ids[4], 61_000)
    batch = await store.changes.read()
    assert batch.changes == [] and batch.cursor == changes[4].cursor
    assert await store.changes.cursor() == changes[4].cursor
    assert (await store.changes.read(since=changes[4].cursor)).changes == []
    with pytest.raises(ChangesExpiredError):
        await store.changes.read(since=changes[3].cursor)
    await store.set("next", 1)
    assert [c.key for c in (await store.changes.read(since=changes[4].cursor)).changes] == ["next"]


async def test_writes_trim_a_log_nobody_reads(store: SQLiteStore, db_path: Path) -> None:
    await store.changes.enable(retention=60)
    for i in range(3):
        await store.set(f"k{i}", i)
    _age(db_path, 2**62, 120_000)
    store._kv.connector.feed_trims.clear()  # a write trims when TRIM_EVERY has passed
    await store.set("new", 1)
    assert _rows(db_path, "SELECT key FROM fleetmem_changes") == [("new",)]


async def test_changing_the_retention_keeps_the_epoch(store: SQLiteStore, db_path: Path) -> None:
    await store.changes.enable(retention=60)
    await store.set("a", 1)
    before = await store.changes.cursor()
    await store.changes.enable(retention=7200)
    assert await store.changes.cursor() == before
    assert _rows(db_path, "SELECT retention_ms FROM fleetmem_feeds") == [(7_200_000,)]
    assert len((await store.changes.read()).changes) == 1


# ---------------------------------------------------------------------------- epochs, cursors


async def test_disable_drops_the_log_and_enable_starts_a_greater_epoch(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.changes.enable()
    await store.set("a", 1)
    old = await store.changes.cursor()
    old_epoch = decode_cursor(NS, old)[0]
    await store.changes.disable()
    assert await store.changes.enabled() is False
    assert _rows(db_path, "SELECT count(*) FROM fleetmem_changes") == [(0,)]
    with pytest.raises(ChangesNotEnabledError):
        await store.changes.read(since=old)
    await store.changes.disable()
    await store.set("b", 1)  # not recorded
    # Another namespace enabling in between takes an epoch too: epochs only grow.
    await store.with_namespace("other").changes.enable()
    await store.changes.enable()
    new = await store.changes.cursor()
    new_epoch = decode_cursor(NS, new)[0]
    assert new_epoch > old_epoch + 1 and new > old
    with pytest.raises(ChangesExpiredError) as caught:
        await store.changes.read(since=old)
    assert caught.value.oldest == new
    await store.set("c", 1)
    assert [c.key for c in (await store.changes.read(since=caught.value.oldest)).changes] == ["c"]
    assert [c.key for c in (await store.changes.read()).changes] == ["c"]


async def test_cursors_this_feed_never_gave_are_refused(store: SQLiteStore) -> None:
    await store.changes.enable()
    await store.set("a", 1)
    backend = _backend(store)
    epoch, head = await backend.head()
    with pytest.raises(InvalidArgumentError):
        await backend.read(epoch, head + 1, 10)
    with pytest.raises(InvalidArgumentError):
        await backend.read(epoch + 1, 0, 10)
    with pytest.raises(ChangesExpiredError):
        await backend.read(epoch - 1, 0, 10)
    page = await backend.read(epoch, head, 10)
    assert page.events == [] and page.last == head and page.epoch == epoch


async def test_reads_page_through_the_log(store: SQLiteStore) -> None:
    await store.changes.enable()
    backend = _backend(store)
    empty = await backend.read(None, None, 10)
    assert empty.events == [] and empty.last == (await backend.head())[1]
    for i in range(5):
        await store.set(f"k{i}", i)
    first = await backend.read(None, None, 2)
    assert [e.key for e in first.events] == ["k0", "k1"] and first.last == first.events[-1].pos
    second = await backend.read(first.epoch, first.last, 10)
    assert [e.key for e in second.events] == ["k2", "k3", "k4"]
    assert second.last == (await backend.head())[1]


# ---------------------------------------------------------------------------- schema


def _schema(path: Path) -> set[tuple[str, str]]:
    return {
        (str(name), str(sql))
        for name, sql in _rows(path, "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
    }


async def test_version_3_file_is_upgraded_in_place(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 5
    fresh = tmp_path / "fresh.db"
    async with SQLiteStore(fresh, namespace=NS) as store:
        await store.connect()
    old = tmp_path / "v3.db"
    async with SQLiteStore(old, namespace=NS) as store:
        await store.set("old", "kept")
        lease = await store.leases.acquire("L", owner="a", ttl=60)
        assert lease is not None
        job_id = await store.queue("q").put({"n": 1})
    raw = _raw(old)
    try:  # back to version 3: everything but the change feeds
        raw.execute("DROP TABLE fleetmem_changes")
        raw.execute("DROP TABLE fleetmem_feeds")
        raw.execute("UPDATE fleetmem_meta SET value = '3' WHERE name = 'schema_version'")
    finally:
        raw.close()
    assert "fleetmem_changes" not in {name for name, _ in _schema(old)}

    # Two stores (two connections) opening it at once: one upgrades, the other sees it done.
    first = SQLiteStore(old, namespace=NS)
    second = SQLiteStore(old, namespace=NS)
    try:
        await asyncio.gather(first.connect(), second.connect())
        assert await first.get("old") == "kept"
        job = await second.queue("q").claim()
        assert job is not None and job.id == job_id
        renewed = await first.leases.acquire("L", owner="b", ttl=60)
        assert renewed is None  # the lease held before the upgrade still holds
        assert await first.changes.enabled() is False
        await second.changes.enable()
        await first.set("old", "new")
        assert _brief(await _all(second)) == [("set", "old", "default", 2, "new", False)]
    finally:
        await first.close()
        await second.close()
    assert _rows(old, "SELECT value FROM fleetmem_meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    # The upgraded file has exactly the objects of a file created at the current version.
    assert _schema(old) == _schema(fresh)
