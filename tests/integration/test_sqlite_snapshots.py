"""Snapshots on SQLite, through the backend seam (``store.kv.snapshots()``), beyond the shared
conformance suite.

The record model on the file itself (every record held by a remaining snapshot, at most one
record of a key per snapshot, the open records exactly the newest snapshot's), checked after
every step of a random history against what an export showed when each snapshot was taken;
the deletions that reopen records closed by snapshots deleted earlier; expiry judged as the KV
judges it; nothing else of the store sees the tables; snapshots survive closing and reopening
the file; the in-place upgrade of a version 4 file; two processes creating and deleting
snapshots of one namespace at once; and a process killed in the middle of a create, while it
holds the write lock, which leaves no snapshot and no record behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, SnapshotExistsError, SnapshotNotFoundError
from fleetmem._codec import encode_value
from fleetmem.backends.seam import SnapshotBackend, record_bytes
from fleetmem.backends.sqlite import SCHEMA_VERSION, SQLiteStore
from fleetmem.protocol import Entry

pytestmark = pytest.mark.sqlite

NS = "sqlite-snapshots"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "snapshots.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore(db_path, namespace=NS, busy_timeout=30).connect()
    try:
        yield opened
    finally:
        await opened.close()


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the same file, as another process would hold it."""
    return sqlite3.connect(path, isolation_level=None, timeout=30)


def _rows(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    raw = _raw(path)
    try:
        return raw.execute(sql, args).fetchall()
    finally:
        raw.close()


def _schema(path: Path) -> set[tuple[str, str]]:
    return {
        (str(name), str(sql))
        for name, sql in _rows(path, "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL")
    }


#: An entry as a snapshot must keep it: every field, the value as its stored JSON (so that
#: ``1``, ``1.0`` and ``True`` differ).
State = dict[str, tuple[Any, ...]]


def _state(entries: list[Entry]) -> State:
    keys = [e.key for e in entries]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), keys
    return {
        e.key: (
            encode_value(e.value),
            e.partition,
            e.version,
            e.created_at,
            e.updated_at,
            e.expires_at,
        )
        for e in entries
    }


async def _pages(
    snaps: SnapshotBackend,
    name: str,
    prefix: str = "",
    partition: str | None = None,
    page_size: int = 1000,
) -> list[Entry]:
    out: list[Entry] = []
    async with contextlib.aclosing(snaps.pages(name, prefix, partition, page_size)) as pages:
        async for page in pages:
            assert 0 < len(page) <= page_size
            out.extend(page)
    return out


async def _live(store: SQLiteStore) -> list[Entry]:
    out: list[Entry] = []
    async with contextlib.aclosing(store.kv.export_pages("", None, 1000)) as pages:
        async for page in pages:
            out.extend(page)
    return out


def _added_bytes(taken: State, previous: State) -> int:
    """What a snapshot of ``taken`` stores after one of ``previous``: a record per entry
    without an equal one in it."""
    return sum(
        record_bytes(key, len(fields[0]), fields[1])
        for key, fields in taken.items()
        if previous.get(key) != fields
    )


_HELD = """
    r.from_seq <= s.seq AND (r.to_seq IS NULL OR s.seq < r.to_seq)
"""


def _check_records(path: Path, namespace: str = NS) -> None:
    """The invariants of the record model, read from the file."""
    garbage = _rows(
        path,
        f"""SELECT r.key, r.from_seq, r.to_seq FROM fleetmem_snapshot_records r
            WHERE r.namespace = ?1 AND NOT EXISTS (
                SELECT 1 FROM fleetmem_snapshots s WHERE s.namespace = ?1 AND {_HELD})""",
        namespace,
    )
    assert garbage == [], "records no snapshot holds"
    doubled = _rows(
        path,
        f"""SELECT s.seq, r.key FROM fleetmem_snapshots s JOIN fleetmem_snapshot_records r
            ON r.namespace = s.namespace AND {_HELD}
            WHERE s.namespace = ?1 GROUP BY s.seq, r.key HAVING count(*) > 1""",
        namespace,
    )
    assert doubled == [], "a snapshot holding two records of one key"
    opened = _rows(
        path,
        """SELECT key, from_seq FROM fleetmem_snapshot_records
           WHERE namespace = ?1 AND to_seq IS NULL ORDER BY key""",
        namespace,
    )
    newest = _rows(
        path,
        f"""SELECT r.key, r.from_seq FROM fleetmem_snapshot_records r
            JOIN fleetmem_snapshots s ON s.namespace = r.namespace AND {_HELD}
            WHERE r.namespace = ?1
              AND s.seq = (SELECT max(seq) FROM fleetmem_snapshots WHERE namespace = ?1)
            ORDER BY r.key""",
        namespace,
    )
    assert opened == newest, "the open records are not the newest snapshot's"


async def _usage_matches_file(snaps: SnapshotBackend, path: Path) -> None:
    expected = _rows(
        path,
        "SELECT count(*), coalesce(sum(bytes), 0) FROM fleetmem_snapshot_records"
        " WHERE namespace = ?1",
        snaps.namespace,
    )[0]
    assert await snaps.usage() == expected


def _expire_now(path: Path, *keys: str) -> None:
    """Make the entries of ``keys`` expired a minute ago, rows still in the file (as an entry
    whose TTL ran out and that no cleanup has removed yet)."""
    raw = _raw(path)
    try:
        for key in keys:
            raw.execute(
                "UPDATE fleetmem_entries SET expires_at = ?3 WHERE namespace = ?1 AND key = ?2",
                (NS, key, int(time.time() * 1000) - 60_000),
            )
    finally:
        raw.close()


# ---------------------------------------------------------------------------- the model


async def test_a_random_history_keeps_every_snapshot_exact(
    store: SQLiteStore, db_path: Path
) -> None:
    """Writes, deletes, expiry changes, entries expiring in place, clears of a partition,
    creates and deletes of snapshots (the newest, the oldest, one between): after every step
    each remaining snapshot reads back exactly what an export showed when it was taken, the
    catalog row is what the create returned, and the file keeps the model's invariants (so no
    snapshot's deletion frees what another holds, and nothing no snapshot holds stays)."""
    rng = random.Random(20)
    snaps = store.kv.snapshots()
    keys = [f"k{i:02d}" for i in range(16)]
    taken: dict[str, State] = {}  # name -> what it must hold
    rows: dict[str, tuple[Any, ...]] = {}
    order: list[str] = []  # remaining names, oldest first
    counter = 0
    for step in range(160):
        roll = rng.random()
        if roll < 0.30:
            await store.set(
                rng.choice(keys),
                rng.choice([1, 1.0, True, "1", [1], {"a": 1}, 2**70, step]),
                partition=rng.choice(["default", "p"]),
            )
        elif roll < 0.40:
            await store.set_many(
                dict.fromkeys(rng.sample(keys, 4), step), ttl=rng.choice([None, 3600])
            )
        elif roll < 0.47:
            await store.delete(rng.choice(keys))
        elif roll < 0.52:
            if rng.random() < 0.5:
                await store.persist(rng.choice(keys))
            else:
                await store.expire(rng.choice(keys), 7200)
        elif roll < 0.56:
            _expire_now(db_path, rng.choice(keys))
        elif roll < 0.58:
            await store.clear_partition("p")
        elif roll < 0.82 or not order:
            counter += 1
            name = f"s{counter}"
            previous = taken[order[-1]] if order else {}
            row = await snaps.create(name)
            live = _state(await _live(store))
            taken[name] = live
            rows[name] = tuple(row)
            order.append(name)
            assert row.keys == len(live)
            assert row.bytes == _added_bytes(live, previous)
            with pytest.raises(SnapshotExistsError):
                await snaps.create(name)
        else:
            victim = rng.choice([order[0], order[-1], order[len(order) // 2]])
            assert await snaps.delete(victim) is True
            assert await snaps.delete(victim) is False
            order.remove(victim)
            del taken[victim]
        listed = await snaps.list()
        assert [r.name for r in listed] == order
        assert [tuple(r) for r in listed] == [rows[n] for n in order]
        for name in order:
            assert _state(await _pages(snaps, name, page_size=5)) == taken[name], (step, name)
        _check_records(db_path)
        await _usage_matches_file(snaps, db_path)
    for name in list(order):
        assert await snaps.delete(name)
    assert await snaps.usage() == (0, 0)
    assert _rows(db_path, "SELECT count(*) FROM fleetmem_snapshot_records") == [(0,)]


async def test_deleting_the_newest_reopens_records_closed_by_deleted_snapshots(
    store: SQLiteStore, db_path: Path
) -> None:
    """k is "A" in s1 and s2, "B" in s3 and s4. Deleting s2, s3, then s4 leaves s1, whose
    record of k was closed by s3: it must be open again (a record closed at a seq that a new
    snapshot would reuse, or above it, would be held by that snapshot next to its own)."""
    snaps = store.kv.snapshots()
    await store.set("k", "A")
    await store.set("same", 0)
    await snaps.create("s1")
    await snaps.create("s2")
    await store.set("k", "B")
    await snaps.create("s3")
    await snaps.create("s4")
    for name in ("s2", "s3", "s4"):
        assert await snaps.delete(name)
        _check_records(db_path)
    one = await _pages(snaps, "s1")
    assert [(e.key, e.value) for e in one] == [("k", "A"), ("same", 0)]
    assert _rows(
        db_path, "SELECT key FROM fleetmem_snapshot_records WHERE to_seq IS NULL ORDER BY key"
    ) == [("k",), ("same",)]
    await store.set("k", "C")
    row = await snaps.create("s5")
    assert row.seq == 2  # the next after the newest remaining one
    assert row.bytes == record_bytes("k", len(b'"C"'), "default")
    assert [(e.key, e.value) for e in await _pages(snaps, "s5")] == [("k", "C"), ("same", 0)]
    assert await _pages(snaps, "s1") == one
    _check_records(db_path)


async def test_an_entry_differing_in_any_one_field_gets_a_new_record(
    store: SQLiteStore, db_path: Path
) -> None:
    """Equal means equal in every field: an entry of which only one field changed (written
    straight into the file, so that nothing else changes with it) is stored again, and the
    new snapshot shows it while the previous one keeps the old record."""
    snaps = store.kv.snapshots()
    await store.set_many({"a": 1, "b": 2}, ttl=3600)
    await snaps.create("s0")
    changes = [
        ("value", "CAST('3' AS BLOB)"),
        ("partition", "'other'"),
        ("version", "version + 1"),
        ("created_at", "created_at - 1"),
        ("updated_at", "updated_at + 1"),
        ("expires_at", "expires_at + 1"),
        ("expires_at", "NULL"),
    ]
    for i, (column, expression) in enumerate(changes, start=1):
        old = _state(await _pages(snaps, f"s{i - 1}"))
        raw = _raw(db_path)
        try:
            raw.execute(
                f"UPDATE fleetmem_entries SET {column} = {expression}"
                " WHERE namespace = ?1 AND key = 'a'",
                (NS,),
            )
        finally:
            raw.close()
        live = _state(await _live(store))
        assert live["a"] != old["a"] and live["b"] == old["b"], column
        row = await snaps.create(f"s{i}")
        assert row.bytes == record_bytes("a", len(live["a"][0]), live["a"][1]), column
        assert _state(await _pages(snaps, f"s{i}")) == live, column
        assert _state(await _pages(snaps, f"s{i - 1}")) == old, column
    assert await snaps.usage() == (2 + len(changes), await _sum_bytes(snaps))
    _check_records(db_path)


async def _sum_bytes(snaps: SnapshotBackend) -> int:
    return sum(row.bytes for row in await snaps.list())


async def test_incremental_storage_and_what_a_delete_frees(
    store: SQLiteStore, db_path: Path
) -> None:
    """After 1% of 2,000 entries changed, a second snapshot stores 20 records, about 1% of
    the first's bytes; deleting the first frees exactly the 20 records the second replaced;
    deleting the second then frees everything."""
    snaps = store.kv.snapshots()
    values = {f"e{i:04d}": {"n": i, "pad": "x" * 40} for i in range(2000)}
    await store.set_many(values)
    first = await snaps.create("first")
    assert first.keys == 2000
    assert first.bytes == sum(
        record_bytes(k, len(encode_value(v)), "default") for k, v in values.items()
    )
    assert await snaps.usage() == (2000, first.bytes)
    changed = [f"e{i:04d}" for i in range(0, 2000, 100)]
    await store.set_many(dict.fromkeys(changed, "changed"))
    second = await snaps.create("second")
    assert second.keys == 2000
    assert second.bytes == 20 * record_bytes("e0000", len(b'"changed"'), "default")
    assert second.bytes < first.bytes * 0.02
    assert await snaps.usage() == (2020, first.bytes + second.bytes)
    assert await snaps.delete("first")
    replaced = sum(record_bytes(k, len(encode_value(values[k])), "default") for k in changed)
    assert await snaps.usage() == (2000, first.bytes + second.bytes - replaced)
    _check_records(db_path)
    assert await snaps.delete("second")
    assert await snaps.usage() == (0, 0)


# ---------------------------------------------------------------------------- reading


async def test_pages_filter_order_decode_and_unknown_names(store: SQLiteStore) -> None:
    """Ascending by code point (past the BMP too), prefix and partition as an export
    filters, pages of at most page_size, integers beyond 64 bits exact, every field kept; an
    unknown name raises on the first iteration."""
    snaps = store.kv.snapshots()
    keys = ["a", "Z", "é", "\uffff", "\U0001f600", "ab", "abc", "ab\U0010ffff", "b", "a b"]
    for i, key in enumerate(keys):
        await store.set(key, [i, 2**70 + i], partition="p" if i % 2 else "default")
    await store.set("ttl", "t", ttl=3600)
    await snaps.create("s")
    live = await _live(store)
    for size in (1, 3, 100):
        assert _state(await _pages(snaps, "s", page_size=size)) == _state(live)
    got = await _pages(snaps, "s")
    assert [e.key for e in got] == sorted([*keys, "ttl"])
    assert next(e for e in got if e.key == "b").value == [8, 2**70 + 8]
    assert [e.key for e in await _pages(snaps, "s", prefix="ab")] == ["ab", "abc", "ab\U0010ffff"]
    assert [e.key for e in await _pages(snaps, "s", prefix="a", partition="p")] == [
        "a b",
        "ab",
        "ab\U0010ffff",
    ]
    assert await _pages(snaps, "s", prefix="zzz") == []
    pages = snaps.pages("missing", "", None, 10)
    with pytest.raises(SnapshotNotFoundError):
        await pages.__anext__()
    await pages.aclose()
    assert await snaps.get("missing") is None
    assert await snaps.delete("missing") is False


async def test_expiry_is_judged_as_the_kv_judges_it(store: SQLiteStore, db_path: Path) -> None:
    """An entry whose expiry has passed (its row still in the file) is not taken; one taken
    and expired since stays in the snapshot, as it was, and the next snapshot leaves it out."""
    snaps = store.kv.snapshots()
    await store.set_many({"a": 1, "b": 2, "c": 3})
    await store.set("soon", "s", ttl=3600)
    _expire_now(db_path, "b")
    one = await snaps.create("one")
    assert one.keys == 3
    assert [e.key for e in await _pages(snaps, "one")] == ["a", "c", "soon"]
    _expire_now(db_path, "soon")
    assert await store.get("soon") is None
    two = await snaps.create("two")
    assert two.keys == 2 and two.bytes == 0
    kept = await _pages(snaps, "one")
    assert [e.key for e in kept] == ["a", "c", "soon"]
    assert kept[-1].expires_at is not None and kept[-1].value == "s"
    assert [e.key for e in await _pages(snaps, "two")] == ["a", "c"]
    _check_records(db_path)


async def test_pages_are_one_reading_while_the_snapshot_is_deleted(store: SQLiteStore) -> None:
    """Pages come from one read transaction: deleting the snapshot (and taking others) while
    its pages are read does not cut them short, and nobody waits for the reading."""
    snaps = store.kv.snapshots()
    await store.set_many({f"a{i:02d}": i for i in range(50)})
    await snaps.create("s")
    seen: list[Entry] = []
    async with contextlib.aclosing(snaps.pages("s", "", None, 10)) as pages:
        async for page in pages:
            seen.extend(page)
            if len(seen) == 10:
                await store.clear()
                assert await snaps.delete("s")
                await snaps.create("empty")
    assert [e.value for e in seen] == list(range(50))
    assert await snaps.get("s") is None


# ---------------------------------------------------------------------------- isolation


async def test_nothing_else_sees_the_snapshot_tables(store: SQLiteStore, db_path: Path) -> None:
    """keys, search, stats, namespaces, export, the change feed see no snapshot; clear() and
    clear_partition() leave them alone; a create changes no entry; each namespace has its own
    snapshots (of the same names)."""
    snaps = store.kv.snapshots()
    await store.changes.enable()
    await store.set_many({"a": 1, "b": 2}, partition="p")
    before = await store.changes.read(since=None, limit=100)
    entries = _rows(db_path, "SELECT * FROM fleetmem_entries ORDER BY key")
    stats = await store.stats()
    await snaps.create("s")
    assert _rows(db_path, "SELECT * FROM fleetmem_entries ORDER BY key") == entries
    assert await store.stats() == stats
    after = await store.changes.read(since=before.cursor, limit=100)
    assert after.changes == []
    assert await store.clear_partition("p") == 2
    await store.set("c", 3)
    assert await store.clear() == 1
    assert await store.keys() == [] and await store.search("*") == {}
    assert (await store.stats()).keys == 0 and (await store.stats()).bytes == 0
    assert NS not in await store.namespaces()
    assert await _live(store) == []
    assert [(e.key, e.value) for e in await _pages(snaps, "s")] == [("a", 1), ("b", 2)]
    other = store.with_namespace(f"{NS}-other")
    other_snaps = other.kv.snapshots()
    assert await other_snaps.list() == [] and await other_snaps.get("s") is None
    await other.set("x", "other")
    assert (await other_snaps.create("s")).keys == 1
    assert await other_snaps.usage() == (1, record_bytes("x", len(b'"other"'), "default"))
    assert [e.key for e in await _pages(snaps, "s")] == ["a", "b"]
    assert await other_snaps.delete("s")
    assert await snaps.get("s") is not None
    _check_records(db_path)
    _check_records(db_path, f"{NS}-other")


async def test_in_memory_database(tmp_path: Path) -> None:
    async with SQLiteStore(":memory:", namespace=NS) as mem:
        snaps = mem.kv.snapshots()
        await mem.set_many({"a": 1, "b": 2})
        await snaps.create("s")
        await mem.set("a", 10)
        assert [(e.key, e.value) for e in await _pages(snaps, "s")] == [("a", 1), ("b", 2)]
        assert (await snaps.create("t")).keys == 2
        assert await snaps.delete("s") and [r.name for r in await snaps.list()] == ["t"]


# ---------------------------------------------------------------------------- durability


async def test_snapshots_survive_closing_and_reopening_the_file(db_path: Path) -> None:
    async with SQLiteStore(db_path, namespace=NS) as first:
        snaps = first.kv.snapshots()
        await first.set_many({f"k{i}": i for i in range(10)})
        await snaps.create("one")
        await first.set("k1", "changed")
        await first.delete("k2")
        await snaps.create("two")
        listed = await snaps.list()
        contents = {n: _state(await _pages(snaps, n)) for n in ("one", "two")}
        usage = await snaps.usage()
    async with SQLiteStore(db_path, namespace=NS) as second:
        snaps = second.kv.snapshots()
        assert await snaps.list() == listed
        assert {n: _state(await _pages(snaps, n)) for n in ("one", "two")} == contents
        assert await snaps.usage() == usage
        await second.set("k3", "again")
        three = await snaps.create("three")
        assert three.seq == 3 and three.keys == 9
        assert await snaps.delete("two")
        assert _state(await _pages(snaps, "one")) == contents["one"]
    _check_records(db_path)


async def test_version_4_file_is_upgraded_in_place(tmp_path: Path) -> None:
    """A file of version 4 (everything but the snapshot tables) is upgraded when opened --
    by one of two stores opening it at once -- keeping its entries, change feed and leases,
    and ends with exactly the objects of a file created at version 5."""
    assert SCHEMA_VERSION == 5
    fresh = tmp_path / "fresh.db"
    async with SQLiteStore(fresh, namespace=NS) as created:
        await created.connect()
    old = tmp_path / "v4.db"
    async with SQLiteStore(old, namespace=NS) as writer:
        await writer.changes.enable()
        await writer.set("old", {"kept": 2**70}, partition="p", ttl=3600)
        await writer.set("old", {"kept": 2**70}, partition="p", keep_ttl=True)
        lease = await writer.leases.acquire("L", owner="a", ttl=60)
        assert lease is not None
    entries = _rows(old, "SELECT * FROM fleetmem_entries")
    raw = _raw(old)
    try:  # back to version 4: everything but the snapshots
        raw.execute("DROP TABLE fleetmem_snapshot_records")
        raw.execute("DROP TABLE fleetmem_snapshots")
        raw.execute("UPDATE fleetmem_meta SET value = '4' WHERE name = 'schema_version'")
    finally:
        raw.close()
    assert not {n for n, _ in _schema(old) if "snapshot" in n}

    first = SQLiteStore(old, namespace=NS)
    second = SQLiteStore(old, namespace=NS)
    try:
        await asyncio.gather(first.connect(), second.connect())
        entry = await first.get_entry("old")
        assert entry is not None
        assert (entry.value, entry.partition, entry.version) == ({"kept": 2**70}, "p", 2)
        assert await second.leases.acquire("L", owner="b", ttl=60) is None  # still held
        assert len((await second.changes.read(since=None, limit=10)).changes) == 2
        snaps = second.kv.snapshots()
        assert await snaps.list() == []
        row = await snaps.create("after-upgrade")
        assert row.seq == 1 and row.keys == 1
        got = await _pages(first.kv.snapshots(), "after-upgrade")
        assert _state(got) == _state([entry])
    finally:
        await first.close()
        await second.close()
    assert _rows(old, "SELECT * FROM fleetmem_entries") == entries
    assert _rows(old, "SELECT value FROM fleetmem_meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    assert _schema(old) == _schema(fresh)


# ---------------------------------------------------------------------------- processes


async def _line(proc: subprocess.Popen[str], seconds: float = 120) -> str:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), seconds)
    if not line:
        assert proc.stderr is not None
        raise AssertionError(f"child process ended early: {proc.stderr.read()}")
    return line.strip()


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


_KEYS = 12

_CREATOR = r"""
import asyncio, json, sys
from fleetmem import SnapshotExistsError
from fleetmem.backends.sqlite import SQLiteStore

async def main(path, worker, rounds, keys):
    async with SQLiteStore(path, namespace="sqlite-snapshots", busy_timeout=120) as store:
        snaps = store.kv.snapshots()
        await store.exists("x")
        print("ready", flush=True)
        sys.stdin.readline()
        creates, deletes = {}, {}
        for r in range(rounds):
            # One transaction: every key gets this round's value (and the same version).
            await store.set_many({f"k{i:02d}": f"w{worker}r{r}" for i in range(keys)})
            for name in (f"w{worker}-{r}", f"shared-{r}", f"shared-{r // 2}"):
                try:
                    await snaps.create(name)
                    creates[name] = creates.get(name, 0) + 1
                except SnapshotExistsError:
                    pass
            for name in (f"w{worker}-{r - 1}" if r % 3 else "", f"shared-{r - 1}"):
                if name and await snaps.delete(name):
                    deletes[name] = deletes.get(name, 0) + 1
        print(json.dumps({"creates": creates, "deletes": deletes}), flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


async def test_two_processes_creating_and_deleting_stay_consistent(
    store: SQLiteStore, db_path: Path
) -> None:
    """Two processes each write rounds (all keys to one value, in one transaction) and
    create and delete snapshots of the namespace, also of the same names. Every name was
    created exactly as often as it was deleted, plus once if it remains; every remaining
    snapshot holds one instant (all keys at one value and version), in seq order of those
    instants; and the file keeps the model's invariants."""
    rounds = 20
    procs = [_spawn(_CREATOR, str(db_path), str(w), str(rounds), str(_KEYS)) for w in (1, 2)]
    try:
        for proc in procs:
            assert await _line(proc) == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [json.loads(await _line(proc, 300)) for proc in procs]
        for proc in procs:
            assert proc.wait(60) == 0
    finally:
        for proc in procs:
            _reap(proc)
    snaps = store.kv.snapshots()
    remaining = await snaps.list()
    names = {r.name for r in remaining}
    for name in {n for rep in reports for n in rep["creates"]}:
        created = sum(rep["creates"].get(name, 0) for rep in reports)
        deleted = sum(rep["deletes"].get(name, 0) for rep in reports)
        assert created == deleted + (name in names), name
    assert len(remaining) >= 2 * rounds // 3
    versions = []
    for row in sorted(remaining, key=lambda r: r.seq):
        got = await _pages(snaps, row.name)
        assert [e.key for e in got] == [f"k{i:02d}" for i in range(_KEYS)], row.name
        assert len({(e.value, e.version) for e in got}) == 1, (row.name, got)
        assert row.keys == _KEYS
        versions.append(got[0].version)
    assert versions == sorted(versions)
    _check_records(db_path)
    await _usage_matches_file(snaps, db_path)


_KILLED = r"""
import asyncio, sys, time
import fleetmem.backends.sqlite.snapshots as module
from fleetmem.backends.sqlite import SQLiteStore


class PauseBeforeTheCatalogRow(dict):
    # The records are closed and added (inside the create's transaction, under the write
    # lock): say so and wait to be killed.
    def __getitem__(self, name):
        if name == "snapshot_insert":
            print("mid-create", flush=True)
            time.sleep(3600)
        return super().__getitem__(name)


module.SQL = PauseBeforeTheCatalogRow(module.SQL)


async def main(path):
    async with SQLiteStore(path, namespace="sqlite-snapshots", busy_timeout=30) as store:
        await store.kv.snapshots().create("doomed")

asyncio.run(main(sys.argv[1]))
"""


async def test_a_process_killed_mid_create_leaves_no_snapshot(
    store: SQLiteStore, db_path: Path
) -> None:
    """A process is killed inside a create, its records closed and added (more than the page
    cache holds, so some reached the WAL), its catalog row not yet written. Meanwhile it held
    the write lock (a writer with a short busy timeout fails; readers go on and see no
    trace). Afterwards: no snapshot, the records exactly as before, and the next create of
    the same name is right."""
    snaps = store.kv.snapshots()
    count = 12_000
    await store.set_many({f"e{i:05d}": {"i": i, "pad": "p" * 100} for i in range(count)})
    await snaps.create("before")
    await store.set_many({f"e{i:05d}": {"i": -i} for i in range(count)})
    await store.delete_many([f"e{i:05d}" for i in range(0, count, 7)])
    records = _rows(db_path, "SELECT * FROM fleetmem_snapshot_records ORDER BY key, from_seq")
    before = await _pages(snaps, "before")
    usage = await snaps.usage()
    wal = db_path.with_name(db_path.name + "-wal")
    assert _rows(db_path, "PRAGMA wal_checkpoint(TRUNCATE)") == [(0, 0, 0)]
    assert wal.stat().st_size == 0
    proc = _spawn(_KILLED, str(db_path))
    try:
        assert await _line(proc) == "mid-create"
        assert wal.stat().st_size > 0  # uncommitted pages of the create spilled to the WAL
        async with SQLiteStore(db_path, namespace=NS, busy_timeout=0.2) as impatient:
            with pytest.raises(BackendUnavailableError):
                await impatient.set("x", 1)
        assert await snaps.get("doomed") is None
        assert [r.name for r in await snaps.list()] == ["before"]
        proc.kill()
        proc.wait(60)
    finally:
        _reap(proc)
    assert await snaps.get("doomed") is None
    assert [r.name for r in await snaps.list()] == ["before"]
    assert _rows(db_path, "SELECT * FROM fleetmem_snapshot_records ORDER BY key, from_seq") == (
        records
    )
    assert await snaps.usage() == usage
    live = _state(await _live(store))
    row = await snaps.create("doomed")
    assert row.seq == 2 and row.keys == len(live)
    assert row.bytes == _added_bytes(live, _state(before))
    assert _state(await _pages(snaps, "doomed")) == live
    assert await _pages(snaps, "before") == before
    _check_records(db_path)
    with pytest.raises(SnapshotExistsError):
        await snaps.create("doomed")
