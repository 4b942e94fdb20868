"""Export and import on SQLite, through the backend seam (and the store's front end).

An export is one point in time (one read transaction) while this store, another store on the
same file and another process write during it, and none of them waits for it; its filters and
order; closing it early releases its snapshot. An import batch skips expired ops, keeps the
absolute expiry, follows the version rules and records its changes; ``missing_only`` writes
only keys without a live entry. A replace is one transaction: readers see the old state while
it is paused between pages, writers wait for it, and an exception or a cancellation midway
leaves the file exactly as it was. The same on a private in-memory database. Both reach the
file the store opened, whatever the working directory has become since.

Nothing here depends on an idle machine: a busy timeout that must not be reached is far longer
than any scheduling delay (a wait for the export would last as long as the export is paused,
i.e. forever), and an expiry that must fall during an export is retried with a longer TTL when
the machine was too slow to start the export before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, InvalidArgumentError, copy_namespace
from fleetmem._codec import encode_value
from fleetmem.backends.seam import ImportOp, ImportTally
from fleetmem.backends.sqlite import SQLiteStore
from fleetmem.protocol import Change, Entry

pytestmark = pytest.mark.sqlite

NS = "sqlite-portability"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "portability.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = await SQLiteStore(db_path, namespace=NS, busy_timeout=30).connect()
    try:
        yield opened
    finally:
        await opened.close()


def _raw(path: Path, timeout: float = 10) -> sqlite3.Connection:
    """A plain sqlite3 connection to the same file, as another process would hold it."""
    return sqlite3.connect(path, isolation_level=None, timeout=timeout)


def _rows(path: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    raw = _raw(path)
    try:
        return raw.execute(sql, args).fetchall()
    finally:
        raw.close()


def _dump(path: Path) -> list[list[tuple[Any, ...]]]:
    """Every row of the entries, the change log and the feeds, in a fixed order."""
    return [
        _rows(path, "SELECT * FROM fleetmem_entries ORDER BY namespace, key"),
        _rows(path, "SELECT * FROM fleetmem_changes ORDER BY id"),
        _rows(path, "SELECT * FROM fleetmem_feeds ORDER BY namespace"),
    ]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _op(
    key: str, value: Any, partition: str = "default", expires_at: datetime | None = None
) -> ImportOp:
    return ImportOp(key, encode_value(value), partition, expires_at)


async def _export(
    store: SQLiteStore, prefix: str = "", partition: str | None = None, page_size: int = 1000
) -> list[list[Entry]]:
    async with contextlib.aclosing(store.kv.export_pages(prefix, partition, page_size)) as pages:
        return [page async for page in pages]


def _flat(pages: list[list[Entry]]) -> list[Entry]:
    return [entry for page in pages for entry in page]


async def _pages(*pages: list[ImportOp]) -> AsyncIterator[list[ImportOp]]:
    for page in pages:
        yield page


async def _changes(store: SQLiteStore, since: str | None) -> list[Change]:
    out: list[Change] = []
    while True:
        batch = await store.changes.read(since=since, limit=1000)
        out.extend(batch.changes)
        since = batch.cursor
        if not batch.changes:
            return out


def _brief(changes: list[Change]) -> list[tuple[Any, ...]]:
    return [(c.op, c.key, c.partition, c.version, c.value) for c in changes]


def _expire_now(path: Path, namespace: str, *keys: str) -> None:
    """Make the rows of ``keys`` expired an hour ago (without waiting)."""
    raw = _raw(path)
    try:
        for key in keys:
            raw.execute(
                "UPDATE fleetmem_entries SET expires_at = ?3 WHERE namespace = ?1 AND key = ?2",
                (namespace, key, int(_now().timestamp() * 1000) - 3_600_000),
            )
    finally:
        raw.close()


def _wal_fully_checkpointed(path: Path) -> bool:
    """Whether a checkpoint can copy every frame of the WAL back (no reader's snapshot holds
    an older state of the file)."""
    busy, log, done = _rows(path, "PRAGMA wal_checkpoint(PASSIVE)")[0]
    return bool(busy == 0 and log == done)


async def _eventually(check: Callable[[], bool], seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


# ---------------------------------------------------------------------------- export


async def test_export_is_one_point_in_time_while_others_write(
    store: SQLiteStore, db_path: Path
) -> None:
    """Pages read after other writes still show the state of the first page's instant; this
    store and another store on the file write meanwhile without waiting for the export
    (the export stays paused until those writes are done, so a write waiting for it would
    run into its busy timeout)."""
    await store.set_many({f"a{i:02d}": 0 for i in range(100)})
    async with SQLiteStore(db_path, namespace=NS, busy_timeout=5) as other:
        seen: list[Entry] = []
        async with contextlib.aclosing(store.kv.export_pages("", None, 10)) as pages:
            async for page in pages:
                seen.extend(page)
                if len(seen) == 10:  # the snapshot is fixed: now change everything
                    await other.set_many({f"a{i:02d}": 1 for i in range(100)})
                    await other.delete_many(["a51", "a99"])
                    await other.set("a55x", "new")
                    await other.clear_partition("nothing")
                    # This store's own connection writes during its export too.
                    await store.set_many({f"a{i:02d}": 2 for i in range(0, 100, 2)})
                    await store.set("b-new", 1)
                    assert await other.get("a10") == 2  # committed and visible elsewhere
    assert [e.key for e in seen] == [f"a{i:02d}" for i in range(100)]
    assert all(e.value == 0 and e.version == 1 for e in seen[:100])
    assert await store.get("a10") == 2 and await store.get("a11") == 1
    assert await store.exists("a51") is False


async def _expiring_during_export(store: SQLiteStore, ttl: float) -> list[str] | None:
    """The keys an export of ``store`` yields when its ``zz-short`` expires after the export's
    first page and before its last; ``None`` when the machine was too slow to read the first
    page before the expiry (the attempt proves nothing then)."""
    await store.set_many({f"a{i:02d}": 0 for i in range(30)})
    await store.set("zz-short", "s", ttl=ttl)
    entry = await store.get_entry("zz-short")
    assert entry is not None and entry.expires_at is not None
    seen: list[Entry] = []
    async with contextlib.aclosing(store.kv.export_pages("", None, 10)) as pages:
        async for page in pages:
            if not seen and time.time() >= entry.expires_at.timestamp():
                return None  # the export's `now` may be past the expiry: inconclusive
            seen.extend(page)
            if len(seen) == 10:  # wait, however long it takes, until it has expired
                for _ in range(int((ttl + 60) / 0.02)):
                    if await store.get("zz-short") is None:
                        break
                    await asyncio.sleep(0.02)
                assert await store.get("zz-short") is None
    return [e.key for e in seen]


async def test_export_judges_liveness_at_its_start(store: SQLiteStore) -> None:
    """An entry that expires during an export is in it (liveness is judged against the
    export's start), though every other read no longer sees it. A TTL too short for this
    machine to start the export in time is retried, longer, in a fresh namespace."""
    for attempt, ttl in enumerate((0.5, 2.0, 8.0, 30.0)):
        keys = await _expiring_during_export(store.with_namespace(f"{NS}-{attempt}"), ttl)
        if keys is not None:
            assert keys == [*(f"a{i:02d}" for i in range(30)), "zz-short"]
            return
    pytest.fail("the export never started within 30 s of a write")


_WRITER = r"""
import asyncio, sys
from fleetmem.backends.sqlite import SQLiteStore

async def main(path, rounds):
    async with SQLiteStore(path, namespace="sqlite-portability", busy_timeout=5) as store:
        await store.exists("x")
        print("ready", flush=True)
        sys.stdin.readline()
        for r in range(1, rounds + 1):
            for i in range(100):
                await store.set(f"a{i:02d}", r)
            print(f"round {r}", flush=True)
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


async def test_export_is_one_point_in_time_while_another_process_writes(
    store: SQLiteStore,
) -> None:
    """Another process sets a00..a99 to round r, key after key, round after round (busy
    timeout 5 s: it would fail if the export, paused until whole rounds are written, blocked
    it). The export, paused after its
    first page for whole rounds of those writes, shows one instant: along key order the values
    never increase and differ by at most 1, and they are older than the rounds written
    during it."""
    await store.set_many({f"a{i:02d}": 0 for i in range(100)})
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(store.path), "6"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert await _line(proc) == "ready"
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert await _line(proc) == "round 1"
        seen: list[Entry] = []
        async with contextlib.aclosing(store.kv.export_pages("a", None, 7)) as pages:
            async for page in pages:
                seen.extend(page)
                if len(seen) == 7:  # whole rounds are written while the export is open
                    assert await _line(proc) == "round 2"
                    assert await _line(proc) == "round 3"
        for r in range(4, 7):
            assert await _line(proc) == f"round {r}"
        assert await _line(proc) == "done"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    values = [e.value for e in seen]
    assert [e.key for e in seen] == [f"a{i:02d}" for i in range(100)]
    assert all(isinstance(v, int) for v in values)
    assert values == sorted(values, reverse=True), values
    assert values[0] - values[-1] <= 1 and values[0] <= 2, values
    assert await store.get("a99") == 6


async def test_export_filters_and_order(store: SQLiteStore, db_path: Path) -> None:
    """Live entries only, ascending by code point (also past the BMP, where UTF-16 order
    differs), prefix and partition as keys() filters them, pages of at most page_size that
    together are the same whatever the size."""
    keys = ["a", "Z", "é", "\uffff", "\U0001f600", "ab", "abc", "ab\U0010ffff", "b", "a b"]
    for i, key in enumerate(keys):
        await store.set(key, i, partition="p" if i % 2 else "default")
    await store.set("ab-expired", 1, ttl=60)
    _expire_now(db_path, NS, "ab-expired")
    await store.with_namespace("elsewhere").set("ab-other", 1)
    whole = _flat(await _export(store))
    assert [e.key for e in whole] == sorted(keys)
    for size in (1, 3, 1000):
        pages = await _export(store, page_size=size)
        assert all(0 < len(page) <= size for page in pages)
        assert _flat(pages) == whole
    entry = next(e for e in whole if e.key == "\U0001f600")
    assert (entry.value, entry.partition, entry.version) == (4, "default", 1)
    assert entry.created_at.tzinfo is timezone.utc and entry.expires_at is None
    assert [e.key for e in _flat(await _export(store, prefix="ab"))] == [
        "ab",
        "abc",
        "ab\U0010ffff",
    ]
    in_p = sorted(k for i, k in enumerate(keys) if i % 2)
    assert [e.key for e in _flat(await _export(store, partition="p", page_size=2))] == in_p
    assert [e.key for e in _flat(await _export(store, prefix="a", partition="p"))] == [
        k for k in in_p if k.startswith("a")
    ]
    assert await _export(store, prefix="nothing") == []
    assert await _export(store.with_namespace("empty")) == []
    for prefix, partition in (("", None), ("a", None), ("", "p"), ("a", "p")):
        by_hand = await store.keys(prefix=prefix, partition=partition)
        assert [e.key for e in _flat(await _export(store, prefix, partition, 2))] == by_hand


async def test_closing_an_export_early_releases_its_snapshot(
    store: SQLiteStore, db_path: Path
) -> None:
    """While an export is open, the WAL cannot be checkpointed past its snapshot; once the
    generator is closed early, or its consumer cancelled, it can (and no session is left)."""
    await store.set_many({f"k{i:03d}": i for i in range(50)})
    pages = store.kv.export_pages("", None, 10)
    assert len(await anext(pages)) == 10
    await store.set_many({f"k{i:03d}": -i for i in range(50)})  # frames after the snapshot
    assert not _wal_fully_checkpointed(db_path)
    await pages.aclose()
    await _eventually(lambda: _wal_fully_checkpointed(db_path))
    assert not store.kv.connector._sessions

    got_one = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(store.kv.export_pages("", None, 10)) as it:
            async for _ in it:
                got_one.set()
                await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    await got_one.wait()
    await store.set("k000", "again")
    assert not _wal_fully_checkpointed(db_path)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _eventually(lambda: _wal_fully_checkpointed(db_path))
    assert not store.kv.connector._sessions


async def test_an_export_open_when_the_store_closes_ends(db_path: Path) -> None:
    store = await SQLiteStore(db_path, namespace=NS).connect()
    await store.set_many({f"k{i:03d}": i for i in range(30)})
    pages = store.kv.export_pages("", None, 10)
    try:
        assert len(await anext(pages)) == 10
        await store.close()
        with pytest.raises(Exception, match="closed"):
            await anext(pages)
    finally:
        await pages.aclose()
    await _eventually(lambda: _wal_fully_checkpointed(db_path))


async def test_get_entries_reads_in_one_statement(store: SQLiteStore, db_path: Path) -> None:
    await store.set("a", 1)
    await store.set("b", [2], partition="p", ttl=60)
    await store.set("gone", 3, ttl=60)
    _expire_now(db_path, NS, "gone")
    found = await store.kv.get_entries(["b", "missing", "gone", "a"])
    assert list(found) == ["b", "a"]
    assert (found["b"].value, found["b"].partition, found["b"].expires_at is not None) == (
        [2],
        "p",
        True,
    )
    assert found["a"] == await store.get_entry("a")
    assert await store.kv.get_entries([]) == {}


# ---------------------------------------------------------------------------- import_batch


async def test_import_batch_merge_versions_expiry_and_counts(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.set("live", "old", partition="a", ttl=60)
    await store.set("live", "older")  # version 2, expiry kept
    await store.set("stale", "old", ttl=60)
    await store.set("set", 1)
    _expire_now(db_path, NS, "stale")
    before = await store.get_entry("live")
    assert before is not None and before.version == 2
    unchanged = await store.get_entry("set")
    expires = _now().replace(microsecond=123_456) + timedelta(hours=1)
    tally = await store.kv.import_batch(
        [
            _op("live", {"new": True}, "b", expires),
            _op("stale", "fresh", "c", None),
            _op("new", [1, 2**70], "d", expires),
            _op("set", "expired", "x", _now() - timedelta(milliseconds=1)),
            _op("gone-new", "expired", "x", _now() - timedelta(days=1)),
        ],
        False,
    )
    assert tally == ImportTally(3, 2, 0)
    live = await store.get_entry("live")
    assert live is not None
    assert (live.value, live.partition, live.version) == ({"new": True}, "b", 3)
    assert live.created_at == before.created_at and live.updated_at >= before.updated_at
    # The absolute expiry, to the millisecond (rounded down: never later than the source).
    assert live.expires_at == expires.replace(microsecond=123_000)
    ttl = await store.ttl("live")
    assert ttl is not None and 3500 < ttl <= 3601  # `expires` may be 0.12 s past now + 1 h
    stale = await store.get_entry("stale")  # an expired row is absent: recreated
    assert stale is not None
    assert (stale.value, stale.partition, stale.version, stale.expires_at) == (
        "fresh",
        "c",
        1,
        None,
    )
    assert stale.created_at == stale.updated_at
    new = await store.get_entry("new")
    assert new is not None and (new.value, new.partition, new.version) == ([1, 2**70], "d", 1)
    assert await store.get_entry("set") == unchanged  # its op had expired: nothing written
    assert await store.exists("gone-new") is False
    # A persistent op over an entry with a TTL makes it persistent (nothing kept).
    assert await store.kv.import_batch([_op("live", 1)], False) == ImportTally(1, 0, 0)
    assert await store.ttl("live") is None


async def test_import_batch_missing_only(store: SQLiteStore, db_path: Path) -> None:
    await store.set("live", "mine", partition="a")
    await store.set("stale", "old", ttl=60)
    await store.set("live-too", "mine")
    _expire_now(db_path, NS, "stale")
    keep = await store.get_entry("live")
    tally = await store.kv.import_batch(
        [
            _op("live", "theirs", "b"),
            _op("stale", "theirs", "b"),
            _op("absent", "theirs", "b", _now() + timedelta(minutes=5)),
            _op("live-too", "theirs", "b", _now() - timedelta(seconds=1)),  # expired first
            _op("absent-expired", "theirs", "b", _now() - timedelta(seconds=1)),
        ],
        True,
    )
    assert tally == ImportTally(2, 2, 1)
    assert await store.get_entry("live") == keep
    assert await store.get("live-too") == "mine"
    for key in ("stale", "absent"):
        entry = await store.get_entry(key)
        assert entry is not None and (entry.value, entry.partition, entry.version) == (
            "theirs",
            "b",
            1,
        )
    assert await store.exists("absent-expired") is False
    assert await store.kv.import_batch([], True) == ImportTally(0, 0, 0)


async def test_import_batch_refuses_repeated_keys_before_writing(store: SQLiteStore) -> None:
    with pytest.raises(InvalidArgumentError):
        await store.kv.import_batch([_op("a", 1), _op("b", 1), _op("a", 2)], False)
    assert await store.keys() == []


async def test_import_batch_records_a_set_per_written_entry(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.changes.enable()
    await store.set("live", 0)
    await store.set("stale", 0, ttl=60)
    _expire_now(db_path, NS, "stale")
    head = await store.changes.cursor()
    expires = _now() + timedelta(hours=1)
    await store.kv.import_batch(
        [_op("live", 1, "p", expires), _op("new", 2), _op("old", 3, expires_at=_now())],
        False,
    )
    await store.kv.import_batch([_op("live", 9), _op("stale", 4, "q"), _op("new2", 5)], True)
    changes = await _changes(store, head)
    assert _brief(changes) == [
        ("set", "live", "p", 2, 1),
        ("set", "new", "default", 1, 2),
        ("set", "stale", "q", 1, 4),
        ("set", "new2", "default", 1, 5),
    ]
    assert changes[0].expires_at == (await store.get_entry("live")).expires_at  # type: ignore[union-attr]
    assert [c.expires_at for c in changes[1:]] == [None, None, None]


# ---------------------------------------------------------------------------- import_replace


async def test_replace_makes_the_namespace_hold_exactly_the_pages(
    store: SQLiteStore, db_path: Path
) -> None:
    """Keys below the first page, between pages (more than one deletion chunk), inside a page
    and above the last are deleted, also a key whose op expired; written keys follow the
    version rules; other namespaces are untouched; the feed records each set and each delete
    of a live entry (in key order), nothing for an expired row removed."""
    await store.set_many({f"m{i:05d}": i for i in range(2500)})  # between pages 1 and 2
    await store.set_many({"a-below": 1, "c-inside": 1, "d": "old", "z-above": 1, "zz": 2})
    await store.set("e-expires", "old")
    await store.set("stale", 1, ttl=60)
    _expire_now(db_path, NS, "stale")
    other = store.with_namespace("other")
    await other.set("d", "keep")
    await store.changes.enable()
    head = await store.changes.cursor()
    tally = await store.kv.import_replace(
        _pages(
            [_op("b", 1), _op("d", "new", "p")],
            [],
            [_op("e-expires", 1, expires_at=_now() - timedelta(seconds=1)), _op("n", 2)],
            [_op("y", 3, expires_at=_now() + timedelta(hours=1))],
        )
    )
    assert tally == ImportTally(4, 1, 0)
    assert await store.keys() == ["b", "d", "n", "y"]
    d = await store.get_entry("d")
    assert d is not None and (d.value, d.partition, d.version) == ("new", "p", 2)
    assert (await store.get_entry("b")).version == 1  # type: ignore[union-attr]
    assert await other.get("d") == "keep"
    assert _rows(db_path, "SELECT count(*) FROM fleetmem_entries WHERE namespace = ?", NS) == [(4,)]
    changes = _brief(await _changes(store, head))
    assert changes == [
        ("set", "b", "default", 1, 1),
        ("set", "d", "p", 2, "new"),
        ("delete", "a-below", "default", None, None),
        ("delete", "c-inside", "default", None, None),
        ("set", "n", "default", 1, 2),
        ("delete", "e-expires", "default", None, None),
        *(("delete", f"m{i:05d}", "default", None, None) for i in range(2500)),
        ("set", "y", "default", 1, 3),
        ("delete", "z-above", "default", None, None),
        ("delete", "zz", "default", None, None),
    ]


async def test_replace_with_no_entries_empties_the_namespace(store: SQLiteStore) -> None:
    await store.set_many({f"k{i:04d}": i for i in range(1500)})
    await store.changes.enable()
    head = await store.changes.cursor()
    assert await store.kv.import_replace(_pages()) == ImportTally(0, 0, 0)
    assert await store.keys() == []
    changes = await _changes(store, head)
    assert [(c.op, c.key) for c in changes] == [("delete", f"k{i:04d}") for i in range(1500)]
    assert await store.kv.import_replace(_pages([])) == ImportTally(0, 0, 0)


async def test_replace_is_atomic_readers_see_the_old_state_and_writers_wait(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.set_many({"a": "old", "b": "old", "c": "old", "q": "old"})
    paused, resume = asyncio.Event(), asyncio.Event()

    async def pages() -> AsyncIterator[list[ImportOp]]:
        yield [_op("a", "new"), _op("b2", "new")]  # deletes b
        paused.set()
        await resume.wait()
        yield [_op("p", "new")]  # deletes c; q goes after the last page

    task = asyncio.create_task(store.kv.import_replace(pages()))
    async with (
        SQLiteStore(db_path, namespace=NS, busy_timeout=0.2) as impatient,
        SQLiteStore(db_path, namespace=NS, busy_timeout=30) as patient,
    ):
        await asyncio.wait_for(paused.wait(), 30)
        old = {"a": "old", "b": "old", "c": "old", "q": "old"}
        # The first page is written (uncommitted): nobody sees it, not even this store.
        assert await store.get_many(["a", "b", "b2", "c", "q"]) == old
        assert await impatient.get_many(["a", "b", "b2", "c", "q"]) == old
        assert dict(
            _rows(db_path, "SELECT key, json(value) FROM fleetmem_entries")
        ) == dict.fromkeys(old, '"old"')
        with pytest.raises(BackendUnavailableError):  # writers wait for the lock
            await impatient.set("late", 1)
        late = asyncio.create_task(patient.set("late", 1))
        await asyncio.sleep(0.3)
        assert not late.done()
        resume.set()
        assert await asyncio.wait_for(task, 30) == ImportTally(3, 0, 0)
        await asyncio.wait_for(late, 30)  # written after the commit: it stays
    assert await store.get_many(["a", "b2", "p", "late"]) == {
        "a": "new",
        "b2": "new",
        "p": "new",
        "late": 1,
    }
    assert await store.keys() == ["a", "b2", "late", "p"]


class _Boom(Exception):
    pass


async def test_an_exception_midway_leaves_the_file_exactly_as_before(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.set_many({f"k{i:04d}": i for i in range(1200)})
    await store.set("t", 1, ttl=60, partition="p")
    await store.changes.enable()
    await store.set("last", 1)
    before = _dump(db_path)

    async def failing() -> AsyncIterator[list[ImportOp]]:
        yield [_op("a", 1), _op("k0005", "x")]
        yield [_op("k0600", "y")]
        raise _Boom("the input failed")

    with pytest.raises(_Boom):
        await store.kv.import_replace(failing())
    assert _dump(db_path) == before
    # Keys out of order (the deletions depend on the order): refused, rolled back.
    with pytest.raises(InvalidArgumentError):
        await store.kv.import_replace(_pages([_op("b", 1)], [_op("c", 1), _op("a", 1)]))
    with pytest.raises(InvalidArgumentError):
        await store.kv.import_replace(_pages([_op("b", 1), _op("b", 2)]))
    assert _dump(db_path) == before
    # The lock is released: another connection writes (a lock still held never would be).
    raw = _raw(db_path, timeout=30)  # a lock still held would never be released
    try:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("ROLLBACK")
    finally:
        raw.close()
    assert not store.kv.connector._sessions


async def test_a_cancelled_replace_leaves_the_file_exactly_as_before(
    store: SQLiteStore, db_path: Path
) -> None:
    await store.set_many({f"k{i:04d}": i for i in range(1200)})
    await store.changes.enable()
    await store.set("last", 1)
    before = _dump(db_path)
    paused = asyncio.Event()

    async def pages() -> AsyncIterator[list[ImportOp]]:
        yield [_op("k0100", "x")]
        paused.set()
        await asyncio.sleep(3600)
        yield [_op("k0200", "y")]

    task = asyncio.create_task(store.kv.import_replace(pages()))
    await asyncio.wait_for(paused.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _dump(db_path) == before
    async with SQLiteStore(db_path, namespace=NS, busy_timeout=30) as other:
        await other.set("after", 1)  # the lock was released (a held one would never be)
    assert not store.kv.connector._sessions


# ---------------------------------------------------------------------------- in memory


async def test_in_memory_database_export_and_replace() -> None:
    """A private in-memory database has no second connection: an export reads a copy taken
    at its start (the store writes on meanwhile); a replace holds the store's connection, so
    the store's other calls wait for its commit (and see the new state), and a failure rolls
    it back."""
    async with SQLiteStore(":memory:", namespace=NS) as store:
        await store.set_many({f"k{i:02d}": 0 for i in range(30)})
        seen: list[Entry] = []
        async with contextlib.aclosing(store.kv.export_pages("", None, 10)) as pages:
            async for page in pages:
                seen.extend(page)
                await store.set_many({f"k{i:02d}": len(seen) for i in range(30)})
        assert [e.value for e in seen] == [0] * 30
        assert await store.get("k29") == 30

        paused, resume = asyncio.Event(), asyncio.Event()

        async def pages_() -> AsyncIterator[list[ImportOp]]:
            yield [_op("k00", "new")]
            paused.set()
            await resume.wait()
            yield [_op("k05", "new")]

        task = asyncio.create_task(store.kv.import_replace(pages_()))
        await asyncio.wait_for(paused.wait(), 30)
        read = asyncio.create_task(store.get_many(["k00", "k01"]))
        await asyncio.sleep(0.2)
        assert not read.done()  # waits for the commit
        resume.set()
        assert await asyncio.wait_for(task, 30) == ImportTally(2, 0, 0)
        assert await asyncio.wait_for(read, 30) == {"k00": "new"}
        assert await store.keys() == ["k00", "k05"]

        async def failing() -> AsyncIterator[list[ImportOp]]:
            yield [_op("a", 1)]
            raise _Boom

        with pytest.raises(_Boom):
            await store.kv.import_replace(failing())
        assert await store.get_many(["a", "k00", "k05"]) == {"k00": "new", "k05": "new"}
        await store.set("after", 1)
        assert await store.keys() == ["after", "k00", "k05"]


# ---------------------------------------------------------------------------- which file


async def test_export_and_replace_reach_the_file_the_store_opened(tmp_path: Path) -> None:
    """A store opened by a relative path keeps working on that file after the process
    changes directory: an export reads it and a replace rewrites it, not a database of the
    same name in the new working directory, and none is created where there is none."""
    here, there, empty = tmp_path / "here", tmp_path / "there", tmp_path / "empty"
    for folder in (here, there, empty):
        folder.mkdir()
    async with SQLiteStore(there / "fleetmem.db", namespace=NS) as elsewhere:
        await elsewhere.set("there-only", 1)
    target = tmp_path / "here.jsonl"
    cwd = Path.cwd()
    try:
        os.chdir(here)
        async with SQLiteStore("fleetmem.db", namespace=NS) as store:
            await store.set_many({"a1": 1, "a2": 2})
            os.chdir(there)
            assert [e.key for e in _flat(await _export(store))] == ["a1", "a2"]
            assert (await store.export_to(target)).count == 2
            replaced = await store.kv.import_replace(_pages([_op("new", "v")]))
            assert replaced == ImportTally(1, 0, 0)
            assert await store.keys() == ["new"]
            os.chdir(empty)
            assert [e.key for e in _flat(await _export(store))] == ["new"]
            assert (await store.import_from(target, mode="replace")).written == 2
            assert await store.keys() == ["a1", "a2"]
            assert list(empty.iterdir()) == []
    finally:
        os.chdir(cwd)
    assert _rows(there / "fleetmem.db", "SELECT key FROM fleetmem_entries") == [("there-only",)]
    assert _rows(here / "fleetmem.db", "SELECT key, json(value) FROM fleetmem_entries") == [
        ("a1", "1"),
        ("a2", "2"),
    ]
    assert list(empty.iterdir()) == []


async def test_a_session_never_creates_the_file(tmp_path: Path) -> None:
    """A session opens the store's file read-write, never create: once the file is gone
    (moved away while the store is open), an export fails and leaves no new file behind."""
    path = tmp_path / "odd ?#%20 name.db"  # characters a URI must quote
    async with SQLiteStore(path, namespace=NS) as store:
        await store.set("k", 1)
        assert [e.key for e in _flat(await _export(store))] == ["k"]
        path.rename(tmp_path / "moved.db")
        with pytest.raises(BackendUnavailableError):
            await _export(store)
        with pytest.raises(BackendUnavailableError):
            await store.kv.import_replace(_pages([_op("new", "v")]))
        assert not path.exists()


# ---------------------------------------------------------------------------- end to end


async def _fill(store: SQLiteStore, db_path: Path) -> None:
    await store.set_many({f"k{i:04d}": {"i": i, "big": 2**70 + i} for i in range(1500)})
    await store.set("ttl", "soon", ttl=3600, partition="p")
    await store.set("float", 1.5, partition="p")
    await store.set("ünï\U0001f600", [None, True, "x"])
    await store.set("stale", 1, ttl=60)
    _expire_now(db_path, NS, "stale")


def _state(entries: list[Entry]) -> list[tuple[Any, ...]]:
    return [(e.key, e.value, e.partition, e.expires_at) for e in entries]


async def test_store_export_to_and_import_from_every_mode(
    store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    await _fill(store, db_path)
    target = tmp_path / "fleet.jsonl.gz"
    report = await store.export_to(target)
    assert (report.namespace, report.count, report.consistency) == (NS, 1503, "snapshot")
    source = _flat(await _export(store))
    assert len(source) == 1503

    copy = store.with_namespace("copy")
    await copy.changes.enable()
    await copy.set("k0000", "mine")  # merge: overwritten (version 2)
    await copy.set("extra", 1)  # merge: left alone
    imported = await copy.import_from(target)
    assert (imported.written, imported.skipped_expired, imported.skipped_existing) == (1503, 0, 0)
    copied = _flat(await _export(copy))
    assert _state([e for e in copied if e.key != "extra"]) == _state(source)
    assert (await copy.get_entry("k0000")).version == 2  # type: ignore[union-attr]
    assert (await copy.get_entry("k0001")).version == 1  # type: ignore[union-attr]

    await copy.set("k0001", "changed")
    await copy.delete("k0002")
    missing = await copy.import_from(target, mode="missing")
    assert (missing.written, missing.skipped_existing) == (1, 1502)
    assert await copy.get("k0001") == "changed"
    assert await copy.get("k0002") == {"i": 2, "big": 2**70 + 2}

    head = await copy.changes.cursor()
    replaced = await copy.import_from(target, mode="replace")
    assert replaced.written == 1503
    assert _state(_flat(await _export(copy))) == _state(source)
    changes = await _changes(copy, head)
    assert [c.key for c in changes if c.op == "delete"] == ["extra"]
    assert sum(c.op == "set" for c in changes) == 1503
    # The source namespace is as it was.
    assert _state(_flat(await _export(store))) == _state(source)


async def test_copy_namespace_between_two_files(
    store: SQLiteStore, db_path: Path, tmp_path: Path
) -> None:
    await _fill(store, db_path)
    async with SQLiteStore(tmp_path / "other.db", namespace="renamed") as dst:
        await dst.set("extra", 1)
        report = await copy_namespace(store, dst, mode="replace")
        assert (report.copied, report.verified) == (1503, True)
        assert _state(_flat(await _export(dst))) == _state(_flat(await _export(store)))


# Another process: set_many of every key of the namespace to round r, one transaction a round.
_ROUNDS = r"""
import asyncio, sys
from fleetmem.backends.sqlite import SQLiteStore

async def main(path, count, rounds):
    async with SQLiteStore(path, namespace="sqlite-portability", busy_timeout=5) as store:
        await store.exists("x")
        print("ready", flush=True)
        sys.stdin.readline()
        for r in range(1, rounds + 1):
            await store.set_many({f"a{i:05d}": r for i in range(count)})
            print(f"round {r}", flush=True)
        print("done", flush=True)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_store_export_is_one_point_in_time_while_another_process_writes(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """The export file holds one round of the other process's whole-namespace rewrites, though
    two more rounds commit while it is written (its progress callback waits for them after the
    first page; the writer's busy timeout is 5 s: it would fail if the export, paused until
    two rounds are written, blocked it)."""
    count = 25_000  # more than one export page
    await store.set_many({f"a{i:05d}": 0 for i in range(count)})
    proc = subprocess.Popen(
        [sys.executable, "-c", _ROUNDS, str(store.path), str(count), "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def line() -> str:
        assert proc.stdout is not None
        text = proc.stdout.readline()
        if not text:
            assert proc.stderr is not None
            raise AssertionError(f"child process ended early: {proc.stderr.read()}")
        return text.strip()

    calls: list[int] = []

    def progress(phase: str, done: int) -> None:
        calls.append(done)
        if len(calls) == 1:  # the snapshot is fixed: let two rounds commit
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert line() == "round 1"
            assert line() == "round 2"

    target = tmp_path / "rounds.jsonl"
    try:
        assert await asyncio.to_thread(line) == "ready"
        report = await store.export_to(target, progress=progress)
        for r in (3, 4):
            assert await asyncio.to_thread(line) == f"round {r}"
        assert await asyncio.to_thread(line) == "done"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert report.count == count and len(calls) >= 3
    lines = target.read_text("utf-8").splitlines()
    values = {json.loads(text)["value"] for text in lines[1:-1]}
    assert values == {0}
    assert await store.get(f"a{count - 1:05d}") == 4
