"""Export and import on PostgreSQL through the backend seam (``PostgresKV.export_pages``,
``import_batch``, ``import_replace``), beyond the conformance suite: an export is one point in
time while other connections write; its filters; import modes, counts, version and expiry rules;
the change feed records what an import writes and what a replace deletes; a replace is one
transaction (nobody sees it half done, and a failure -- raised by the pages, a lost connection,
keys out of order -- changes nothing); and the same end to end through ``Store.export_to``,
``Store.import_from`` and ``copy_namespace``. Every test talks to a real server."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fleetmem import (
    BackendUnavailableError,
    CopyReport,
    ImportReport,
    OutcomeUnknownError,
    copy_namespace,
)
from fleetmem._codec import encode_value
from fleetmem.backends.seam import ImportOp, ImportTally
from fleetmem.errors import InvalidArgumentError
from fleetmem.protocol import Change, Entry

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore  # noqa: E402

_ENTRIES = "fleetmem.entries"


@pytest.fixture
async def store(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=4
    ) as opened:
        yield opened


@pytest.fixture
async def other(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[PostgresStore]:
    """A second store on the same namespace, with a pool of its own: another client."""
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=4
    ) as opened:
        yield opened


async def _sql(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _rows(dsn: str, ns: str) -> list[tuple[Any, ...]]:
    """Every row of the namespace, expired ones too, exactly as stored."""
    rows = await _sql(
        dsn,
        "SELECT key, value::text, partition, version, created_at, updated_at, expires_at "
        f"FROM {_ENTRIES} WHERE namespace = $1 ORDER BY key",
        ns,
    )
    return [tuple(row) for row in rows]


async def _expire_now(dsn: str, ns: str, *keys: str) -> None:
    """Make the rows of ``keys`` expired (a second ago), without deleting them."""
    await _sql(
        dsn,
        f"UPDATE {_ENTRIES} SET expires_at = now() - interval '1 second' "
        "WHERE namespace = $1 AND key = ANY($2::text[])",
        ns,
        list(keys),
    )


def _op(key: str, value: Any, partition: str = "default", expires_at: Any = None) -> ImportOp:
    return ImportOp(key, encode_value(value), partition, expires_at)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def _export(store: PostgresStore, page_size: int, **filters: Any) -> list[list[Entry]]:
    pages = []
    async with contextlib.aclosing(
        store.kv.export_pages(filters.get("prefix", ""), filters.get("partition"), page_size)
    ) as it:
        async for page in it:
            pages.append(page)
    return pages


async def _read_all(store: PostgresStore, since: str | None) -> list[Change]:
    out: list[Change] = []
    while True:
        batch = await store.changes.read(since=since, limit=500)
        if not batch.changes:
            return out
        out.extend(batch.changes)
        since = batch.cursor


async def _idle_in_transaction(dsn: str) -> int:
    rows = await _sql(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND state LIKE 'idle in transaction%'",
    )
    return int(rows[0][0])


async def _no_transaction_left_open(dsn: str, deadline: float = 30.0) -> None:
    """Wait (up to a generous ``deadline``) until no session of the database is idle in a
    transaction: a rollback, or the end of a session dropped after a cancel, reaches the
    server a moment after the call returned, later on a busy machine."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while (count := await _idle_in_transaction(dsn)) != 0:
        assert loop.time() < until, f"{count} session(s) still idle in a transaction"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ export


async def test_export_is_one_point_in_time_while_another_connection_writes(
    store: PostgresStore, other: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """Between the first and the other pages another client rewrites every key, deletes some,
    adds new ones and makes an entry expired; an entry's TTL runs out: the export still shows
    the namespace as it was when it started -- including the entry made expired meanwhile,
    which was live then, and the short-lived one exactly when it was live at the export's
    start (judged against the start of its transaction, so the test does not depend on how
    fast the export started) -- and the writers were never blocked by it."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set_many({f"k{i:03d}": 0 for i in range(200)})
    await store.set("k150", "doomed", ttl=600)
    short_meta = await store.set("k151", "short", ttl=1.0)
    assert short_meta.expires_at is not None
    pages: list[list[Entry]] = []
    short_live_at_start: bool | None = None
    async with contextlib.aclosing(store.kv.export_pages("", None, 40)) as it:
        async for page in it:
            pages.append(page)
            if len(pages) == 1:
                # The export's transaction (the only one open in the database): its instant.
                started = await _sql(
                    dsn,
                    "SELECT xact_start FROM pg_stat_activity WHERE datname = "
                    "current_database() AND state LIKE 'idle in transaction%'",
                )
                assert len(started) == 1
                short_live_at_start = short_meta.expires_at > started[0][0]
                # Another client, while the export's transaction is open: not blocked by it.
                rewrite = {f"k{i:03d}": 1 for i in range(200) if i not in (150, 151)}
                await asyncio.wait_for(other.set_many(rewrite), timeout=30)
                assert await asyncio.wait_for(other.delete_many(["k100", "k199"]), 30) == 2
                await asyncio.wait_for(other.set_many({"k100x": 1, "zzz": 1}), 30)
                await _expire_now(dsn, ns, "k150")
                assert await other.get("k150") is None
                # The short entry's TTL runs out while the export is still running.
                loop = asyncio.get_running_loop()
                until = loop.time() + 30
                while await other.get("k151") is not None:
                    assert loop.time() < until
                    await asyncio.sleep(0.05)
    entries = [entry for page in pages for entry in page]
    expected = [f"k{i:03d}" for i in range(200) if short_live_at_start or i != 151]
    assert [e.key for e in entries] == expected
    assert [len(page) for page in pages] == [40, 40, 40, 40, len(expected) - 160]
    assert {e.value for e in entries if e.key not in ("k150", "k151")} == {0}
    doomed = next(e for e in entries if e.key == "k150")
    assert doomed.value == "doomed" and doomed.expires_at is not None
    if short_live_at_start:
        short = next(e for e in entries if e.key == "k151")
        assert short.value == "short" and short.expires_at == short_meta.expires_at
    assert all(e.version == 1 for e in entries if e.key not in ("k150", "k151"))
    # The writes did land; the export's snapshot is gone with its transaction.
    assert await store.get("k000") == 1 and await store.get("zzz") == 1
    await _no_transaction_left_open(dsn)
    later = [e.key for page in await _export(store, 1000) for e in page]
    assert "k100" not in later and "k100x" in later
    assert "k150" not in later and "k151" not in later
    assert (await store.kv.get_entries(["k001"]))["k001"].version == 2
    assert ns == other.namespace


async def test_export_filters_prefix_partition_and_expiry(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set_many({f"a{i}": i for i in range(10)}, partition="pa")
    await store.set_many({f"b{i}": i for i in range(5)}, partition="pb")
    await store.set_many({"ab": "x", "a\U0010ffff": "top", "b": "plain"})
    await store.set("a5", {"n": 5}, partition="pb", ttl=100)
    await _expire_now(dsn, ns, "a3", "b1")

    everything = await _export(store, 4)
    keys = [e.key for page in everything for e in page]
    assert keys == await store.keys()  # live keys, ascending by code point
    assert "a3" not in keys and "b1" not in keys
    assert all(len(page) == 4 for page in everything[:-1]) and 0 < len(everything[-1]) <= 4
    # Each entry is exactly what get_entry says.
    for entry in (e for page in everything for e in page):
        assert entry == await store.get_entry(entry.key)

    prefixed = [e.key for page in await _export(store, 3, prefix="a") for e in page]
    assert prefixed == await store.keys(prefix="a")
    assert "a\U0010ffff" in prefixed and "b" not in prefixed
    in_pb = [e for page in await _export(store, 2, partition="pb") for e in page]
    assert [e.key for e in in_pb] == ["a5", "b0", "b2", "b3", "b4"]
    assert all(e.partition == "pb" for e in in_pb)
    both = [e.key for page in await _export(store, 2, prefix="a", partition="pb") for e in page]
    assert both == ["a5"]
    assert await _export(store, 5, prefix="nothing") == []
    # A page count that divides the namespace exactly ends without an empty page.
    exact = await _export(store, 1, prefix="a5")
    assert [[e.key for e in page] for page in exact] == [["a5"]]


async def test_an_export_closed_early_or_cancelled_gives_its_connection_back(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """With a pool of one connection: an export stopped after one page, or cancelled while it
    reads, leaves no transaction open and the connection usable at once."""
    dsn = fleetmem_postgres_database
    async with PostgresStore.from_url(dsn, namespace=fleetmem_namespace, max_size=1) as store:
        await store.set_many({f"k{i:04d}": i for i in range(2000)})
        async with contextlib.aclosing(store.kv.export_pages("", None, 10)) as it:
            async for page in it:
                assert page[0].key == "k0000"
                assert await _idle_in_transaction(dsn) == 1  # the export's snapshot
                break
        await _no_transaction_left_open(dsn)
        await asyncio.wait_for(store.set("after", 1), timeout=10)

        async def drain() -> int:
            count = 0
            async with contextlib.aclosing(store.kv.export_pages("", None, 1)) as it:
                async for page in it:
                    count += len(page)
            return count

        for delay in (0.0, 0.01, 0.05):
            task = asyncio.create_task(drain())
            await asyncio.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.wait_for(store.get("after"), timeout=10) == 1
            await _no_transaction_left_open(dsn)
        assert await drain() == 2001


# ------------------------------------------------------------------------------ import_batch


async def test_import_batch_merge_counts_versions_and_expiry(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn, ns = fleetmem_postgres_database, store.namespace
    live = await store.set("live", "old", partition="px", ttl=50)
    await store.set("live", "old2", partition="px")  # version 2
    await store.set("gone", "old")
    await _expire_now(dsn, ns, "gone")
    await store.set("keep", "untouched")
    now = _utcnow()
    far = now + timedelta(seconds=100)
    ops = [
        _op("gone", [1, 2], "pg", far),  # an expired row: recreated at version 1
        _op("live", {"v": 2**70}, "default", None),  # live: version + 1, partition replaced
        _op("new", 1.5, "pn", far),
        _op("past", "x", "default", now - timedelta(milliseconds=1)),  # expired on the file
    ]
    before = _utcnow()
    tally = await store.kv.import_batch(ops, False)
    assert tally == ImportTally(written=3, expired=1, existing=0)

    entry = await store.get_entry("live")
    assert entry is not None
    assert entry.value == {"v": 2**70} and entry.partition == "default" and entry.version == 3
    assert entry.created_at == live.created_at and entry.updated_at > live.updated_at
    assert entry.expires_at is None  # the op's (absolute) expiry, not the entry's old one

    gone = await store.get_entry("gone")
    assert gone is not None
    assert gone.value == [1, 2] and gone.version == 1 and gone.partition == "pg"
    assert gone.created_at >= before - timedelta(seconds=5)
    assert gone.expires_at == far  # absolute, to the microsecond
    ttl = await store.ttl("gone")
    assert ttl is not None and 90 < ttl <= 100

    new = await store.get_entry("new")
    assert new is not None and new.value == 1.5 and new.version == 1 and new.partition == "pn"
    assert new.expires_at == far
    assert await store.exists("past") is False
    assert [r[0] for r in await _rows(dsn, ns)] == ["gone", "keep", "live", "new"]
    assert await store.get("keep") == "untouched"
    assert await store.kv.import_batch([], False) == ImportTally(0, 0, 0)


async def test_import_batch_missing_only_writes_keys_without_a_live_entry(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set("live", "mine", partition="p")
    await store.set("stale", "old")
    await store.set("both", "mine")
    await _expire_now(dsn, ns, "stale")
    before = await _rows(dsn, ns)
    now = _utcnow()
    ops = [
        _op("both", "file", "default", now - timedelta(seconds=1)),  # expired and existing
        _op("live", "file", "q", None),
        _op("new", "file", "q", now + timedelta(seconds=30)),
        _op("past", "file", "q", now - timedelta(seconds=1)),
        _op("stale", "file", "q", None),
    ]
    tally = await store.kv.import_batch(ops, True)
    # An entry both expired and existing counts as expired.
    assert tally == ImportTally(written=2, expired=2, existing=1)
    after = {row[0]: row for row in await _rows(dsn, ns)}
    assert after["live"] == next(r for r in before if r[0] == "live")  # untouched
    assert after["both"] == next(r for r in before if r[0] == "both")
    stale = await store.get_entry("stale")
    assert stale is not None
    assert (stale.value, stale.version, stale.partition, stale.expires_at) == ("file", 1, "q", None)
    new = await store.get_entry("new")
    assert new is not None and new.version == 1 and new.expires_at == ops[2].expires_at
    assert "past" not in after
    # Again: everything now exists or has expired.
    assert await store.kv.import_batch(ops, True) == ImportTally(0, 2, 3)


async def test_an_import_is_recorded_in_the_change_feed(store: PostgresStore) -> None:
    await store.set("a", "old")
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    now = _utcnow()
    far = now + timedelta(seconds=60)
    tally = await store.kv.import_batch(
        [_op("a", 1, "pa"), _op("b", 2, "pb", far), _op("c", 3, "pc", now - timedelta(seconds=1))],
        False,
    )
    assert tally == ImportTally(2, 1, 0)
    assert await store.kv.import_batch([_op("a", 9), _op("d", 4)], True) == ImportTally(1, 0, 1)
    changes = await _read_all(store, start)
    assert [(c.op, c.key, c.value, c.partition, c.version, c.expires_at) for c in changes] == [
        ("set", "a", 1, "pa", 2, None),
        ("set", "b", 2, "pb", 1, far),
        ("set", "d", 4, "default", 1, None),
    ]


# ------------------------------------------------------------------------------ import_replace


async def _pages_of(*pages: list[ImportOp]) -> AsyncIterator[list[ImportOp]]:
    for page in pages:
        yield page


async def test_replace_leaves_exactly_the_pages_entries_and_records_the_deletes(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set_many(dict.fromkeys(("a", "b", "c", "e", "m", "x", "y"), "old"))
    await store.set("p", "old", partition="pp")
    await _expire_now(dsn, ns, "y")  # an expired row: deleted, but no change recorded
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    now = _utcnow()
    tally = await store.kv.import_replace(
        _pages_of(
            [_op("a", 1), _op("c", 3, "pc", now - timedelta(seconds=1)), _op("d", 4)],
            [],  # an empty page changes nothing
            [_op("e", 5, "pe", now + timedelta(seconds=60)), _op("m", 13)],
            [_op("n", 14)],
        )
    )
    assert tally == ImportTally(written=5, expired=1, existing=0)
    rows = await _rows(dsn, ns)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("a", "1", "default", 2),
        ("d", "4", "default", 1),
        ("e", "5", "pe", 2),
        ("m", "13", "default", 2),
        ("n", "14", "default", 1),
    ]
    changes = await _read_all(store, start)
    sets = [(c.key, c.value, c.version) for c in changes if c.op == "set"]
    deletes = [(c.key, c.partition) for c in changes if c.op == "delete"]
    assert sorted(sets) == [("a", 1, 2), ("d", 4, 1), ("e", 5, 2), ("m", 13, 2), ("n", 14, 1)]
    assert sorted(deletes) == [("b", "default"), ("c", "default"), ("p", "pp"), ("x", "default")]
    assert len(changes) == 9
    # A replace with no entry at all empties the namespace.
    assert await store.kv.import_replace(_pages_of()) == ImportTally(0, 0, 0)
    assert await _rows(dsn, ns) == []
    assert [c.key for c in await _read_all(store, changes[-1].cursor)] == ["a", "d", "e", "m", "n"]


class _Gate:
    """Pages handed out one by one: the replace waits after each page until released."""

    def __init__(self, pages: list[list[ImportOp]]) -> None:
        self.pages = pages
        self.given = asyncio.Event()
        self.go = asyncio.Event()
        self.fail_after: int | None = None

    async def __call__(self) -> AsyncIterator[list[ImportOp]]:
        for i, page in enumerate(self.pages):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("the input broke")
            if i:
                self.given.set()
                await self.go.wait()
                self.go.clear()
            yield page


async def test_replace_is_invisible_until_it_commits(
    store: PostgresStore, other: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """While the replace waits between pages, another client still reads the old namespace
    in full (old values, keys still there, no new keys); the new one appears all at once."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    old = {f"k{i:03d}": "old" for i in range(0, 300, 2)}
    await store.set_many(old)
    before = await _rows(dsn, ns)
    gate = _Gate(
        [
            [_op(f"k{i:03d}", "new") for i in range(0, 100)],
            [_op(f"k{i:03d}", "new") for i in range(100, 150)],
        ]
    )
    task = asyncio.create_task(store.kv.import_replace(gate()))
    await asyncio.wait_for(gate.given.wait(), timeout=30)
    # The first page's statement ran; its transaction is open.
    assert await other.get_many(list(old)) == old
    assert await other.keys() == sorted(old)
    assert await _rows(dsn, ns) == before
    gate.go.set()
    assert await asyncio.wait_for(task, timeout=30) == ImportTally(150, 0, 0)
    assert await other.keys() == [f"k{i:03d}" for i in range(150)]
    assert set((await other.get_many(await other.keys())).values()) == {"new"}


async def test_a_failure_in_the_pages_changes_nothing(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """The pages iterator raises after a page was written: the replace raises that very
    exception (not a translated one) and the namespace is exactly as before."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set_many({f"k{i}": i for i in range(10)})
    await store.set("t", "timed", ttl=100, partition="pt")
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    before = await _rows(dsn, ns)
    gate = _Gate([[_op("a", 1), _op("k1", "new")], [_op("z", 2)]])
    gate.fail_after = 1
    with pytest.raises(RuntimeError, match="the input broke") as info:
        await store.kv.import_replace(gate())
    assert type(info.value) is RuntimeError
    assert await _rows(dsn, ns) == before
    assert await _read_all(store, start) == []
    await _no_transaction_left_open(dsn)

    # Keys out of order are refused before their page is written: nothing changes either.
    for pages in (
        [[_op("b", 1), _op("a", 1)]],
        [[_op("b", 1)], [_op("b", 2)]],
        [[_op("c", 1)], [_op("a", 2)]],
    ):
        with pytest.raises(InvalidArgumentError, match="ascending"):
            await store.kv.import_replace(_pages_of(*pages))
        assert await _rows(dsn, ns) == before
    assert await _read_all(store, start) == []


@pytest.mark.parametrize("when", ["between pages", "during a statement"])
async def test_a_replace_whose_connection_is_lost_changes_nothing(
    store: PostgresStore, fleetmem_postgres_database: str, when: str
) -> None:
    """The server ends the replace's session between two pages, or while a page's statement
    waits for a row lock: the error says the store is unavailable -- not that the outcome is
    unknown, since no COMMIT was sent -- and the namespace is as before."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.set_many({f"k{i}": i for i in range(10)})
    before = await _rows(dsn, ns)
    gate = _Gate([[_op("a", 1), _op("k1", "new")], [_op("k5", "new"), _op("z", 2)]])
    blocker = await asyncpg.connect(dsn)
    try:
        task = asyncio.create_task(store.kv.import_replace(gate()))
        await asyncio.wait_for(gate.given.wait(), timeout=30)
        if when == "between pages":
            state = "state LIKE 'idle in transaction%'"
        else:
            # Hold k5's row: the second page's statement waits for it, in flight.
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                f"SELECT 1 FROM {_ENTRIES} WHERE namespace = $1 AND key = 'k5' FOR UPDATE", ns
            )
            gate.go.set()
            state = "state = 'active' AND wait_event_type = 'Lock'"
            for _ in range(300):
                waiting = await _sql(
                    dsn,
                    "SELECT count(*) FROM pg_stat_activity "
                    f"WHERE datname = current_database() AND {state}",
                )
                if waiting[0][0] == 1:
                    break
                await asyncio.sleep(0.05)
        killed = await _sql(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND {state} AND pid <> $1",
            blocker.get_server_pid(),
        )
        assert [row[0] for row in killed] == [True]
        gate.go.set()
        with pytest.raises(BackendUnavailableError) as info:
            await asyncio.wait_for(task, timeout=30)
        assert not isinstance(info.value, OutcomeUnknownError)
    finally:
        await blocker.close()
    assert await _rows(dsn, ns) == before
    assert await store.get("k1") == 1  # the pool replaced the lost connection


async def test_a_clear_waits_for_a_replace_and_follows_it_in_the_feed(
    store: PostgresStore, other: PostgresStore
) -> None:
    await store.set_many({"a": 0, "b": 0})
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    gate = _Gate([[_op("a", 1)], [_op("c", 3)]])
    task = asyncio.create_task(store.kv.import_replace(gate()))
    await asyncio.wait_for(gate.given.wait(), timeout=30)
    clearing = asyncio.create_task(other.clear())
    await asyncio.sleep(0.3)
    assert not clearing.done()  # it waits for the replace's advisory lock
    gate.go.set()
    assert await asyncio.wait_for(task, timeout=30) == ImportTally(2, 0, 0)
    assert await asyncio.wait_for(clearing, timeout=30) == 2
    assert await store.keys() == []
    ops = [(c.op, c.key) for c in await _read_all(store, start)]
    assert ops[-1] == ("clear", None)
    assert sorted(ops[:-1], key=str) == [("delete", "b"), ("set", "a"), ("set", "c")]


# ------------------------------------------------------------------------------ large values

#: A value of several MiB: three fit in one import statement (at most 16 MiB of values), a
#: fourth starts the next one.
_BIG = 5 * 1024 * 1024


async def test_large_values_are_imported_in_several_statements(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """A page whose values add up to more than one statement may carry is written as
    consecutive statements -- by a merge, and by a replace, whose deletes between the keys of
    the file stay exact across the statements of one page -- with what every statement wrote
    recorded in the change feed. (Before, a whole page was one statement: 140 values of 7.6
    MiB, each under max_value_bytes, made a message the server refused.)"""
    from fleetmem.backends.postgres.kv import _IMPORT_STATEMENT_BYTES, _statement_pages

    dsn, ns = fleetmem_postgres_database, store.namespace
    far = _utcnow() + timedelta(seconds=600)
    big = [_op(f"b{i}", chr(ord("a") + i) * _BIG, "pb", far if i == 4 else None) for i in range(7)]
    small = [_op("b2a", "small"), _op("b5a", [1, 2])]
    page = sorted([*big, *small], key=lambda op: op.key)
    keys = [op.key for op in page]
    # The page's statements: three large values each at most, the small ones in between.
    parts = list(_statement_pages(page))
    assert [[op.key for op in part] for part in parts] == [
        ["b0", "b1", "b2", "b2a"],
        ["b3", "b4", "b5", "b5a"],
        ["b6"],
    ]
    assert [op for part in parts for op in part] == page
    assert _BIG * 3 < _IMPORT_STATEMENT_BYTES < _BIG * 4
    # An op larger than a statement may carry is a statement of its own.
    huge = ImportOp("h", b"0" * (_IMPORT_STATEMENT_BYTES + 1), "default", None)
    assert [len(part) for part in _statement_pages([page[0], huge, page[1]])] == [1, 1, 1]
    assert list(_statement_pages([])) == []

    # A merge: everything written, the counts summed over the statements.
    await store.set("b3", "old")
    assert await store.kv.import_batch(page, False) == ImportTally(9, 0, 0)
    assert await store.keys() == keys
    got = await store.get_many(["b0", "b3", "b5a", "b6"])
    assert got["b0"] == "a" * _BIG and got["b3"] == "d" * _BIG and got["b6"] == "g" * _BIG
    assert got["b5a"] == [1, 2]
    entry = await store.get_entry("b4")
    assert entry is not None and entry.partition == "pb" and entry.expires_at == far
    assert (await store.kv.get_entries(["b3"]))["b3"].version == 2
    assert await store.kv.import_batch(page, True) == ImportTally(0, 0, 9)

    # A replace over other keys below, between (within one statement's range and at the
    # boundary of two statements of the page) and above the file's keys; the page's small
    # ops left out of the file this time.
    await store.clear()
    others = {"a": 0, "b1x": 0, "b2a": 0, "b2b": 0, "b5a": 0, "c": 0}
    await store.set_many(others)
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    tally = await store.kv.import_replace(_pages_of(big[:5], big[5:]))
    assert tally == ImportTally(7, 0, 0)
    assert await store.keys() == [op.key for op in big]
    assert (await store.get_many(["b6"]))["b6"] == "g" * _BIG
    changes = await _read_all(store, start)
    assert sorted(str(c.key) for c in changes if c.op == "delete") == sorted(others)
    assert sorted(str(c.key) for c in changes if c.op == "set") == [op.key for op in big]
    await store.clear()
    assert await _rows(dsn, ns) == []


# ------------------------------------------------------------------------------ server clock


async def test_server_time_is_the_servers_clock(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """One statement of its own: between two readings of clock_timestamp() by another
    session, tz-aware UTC, later on each call; a lost connection is retried as any read."""
    dsn = fleetmem_postgres_database
    before = (await _sql(dsn, "SELECT clock_timestamp()"))[0][0]
    now = await store.kv.server_time()
    after = (await _sql(dsn, "SELECT clock_timestamp()"))[0][0]
    assert before <= now <= after
    assert now.utcoffset() == timedelta(0)
    assert await store.kv.server_time() > now  # not the transaction's start: none is open
    # The server ends the store's sessions: the next call opens a new one and answers.
    await _sql(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    assert await asyncio.wait_for(store.kv.server_time(), timeout=30) >= after


# ------------------------------------------------------------------------------ end to end


async def test_export_import_and_copy_through_the_store(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn = fleetmem_postgres_database
    await store.set_many({"a": 1, "big": 2**80, "u": "\u00e9\U0001f600", "f": 1.0})
    await store.set("t", {"n": [1, None]}, ttl=100, partition="pt")
    await store.set("gone", 1)
    await _expire_now(dsn, store.namespace, "gone")
    buffer = io.BytesIO()
    report = await store.export_to(buffer)
    assert report.consistency == "snapshot" and report.count == 5

    target = store.with_namespace(store.namespace + "-copy")
    await target.set_many({"a": "old", "junk": 0})
    await target.changes.enable(retention=600)
    start = await target.changes.cursor()
    buffer.seek(0)
    assert await target.import_from(buffer, mode="replace") == ImportReport(5, 0, 0)
    source_entries = {k: await store.get_entry(k) for k in await store.keys()}
    target_entries = {k: await target.get_entry(k) for k in await target.keys()}
    assert sorted(target_entries) == ["a", "big", "f", "t", "u"]
    for key, entry in source_entries.items():
        copied = target_entries[key]
        assert entry is not None and copied is not None
        assert (copied.value, copied.partition, copied.expires_at) == (
            entry.value,
            entry.partition,
            entry.expires_at,
        )
        assert copied.version == (2 if key == "a" else 1)
    assert target_entries["big"] is not None and target_entries["big"].value == 2**80
    changes = await _read_all(target, start)
    assert sorted((c.op, c.key) for c in changes) == [
        ("delete", "junk"),
        *[("set", k) for k in ("a", "big", "f", "t", "u")],
    ]

    buffer.seek(0)
    assert await target.import_from(buffer, mode="missing") == ImportReport(0, 0, 5)
    third = store.with_namespace(store.namespace + "-third")
    assert await copy_namespace(store, third, mode="merge") == CopyReport(5, 0, True)
    assert await third.keys() == ["a", "big", "f", "t", "u"]


async def test_export_pages_walk_the_primary_key_whatever_the_costs(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """The export's transaction sets KEY_ORDER_PLANS so that every page is a walk of the
    primary key. Costs that favour scanning the namespace and sorting it (as lagging
    statistics did: a generic plan read every remaining row per page, an export quadratic in
    the namespace's size) get a sort without the settings, the index walk with them."""
    from fleetmem.backends.postgres.kv import KEY_ORDER_PLANS

    await store.set_many({f"k{i:05}": i for i in range(2000)})
    page = store.kv.connector.statements("kv.sql")["export_page"]
    args = (store.namespace, "", "\U0010ffff", "", "1000")

    async def plan(settings: str) -> str:
        conn = await asyncpg.connect(fleetmem_postgres_database)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                # What lagging statistics made of the generic plan: the index looks dear.
                await conn.execute(
                    "SET LOCAL random_page_cost = 100000; SET LOCAL plan_cache_mode = "
                    "force_generic_plan"
                )
                if settings:
                    await conn.execute(settings)
                await conn.execute(f"PREPARE export_page AS {page}")
                literals = [await conn.fetchval("SELECT quote_literal($1::text)", a) for a in args]
                rows = await conn.fetch(
                    f"EXPLAIN (FORMAT TEXT) EXECUTE export_page({', '.join(literals)})"
                )
                return "\n".join(row[0] for row in rows)
        finally:
            await conn.close()

    costed = await plan("")
    assert "Sort" in costed, costed  # the costs alone pick a scan and a sort
    walked = await plan(KEY_ORDER_PLANS)
    assert "Sort" not in walked and "Bitmap" not in walked, walked
    assert "Index Scan" in walked or "Index Only Scan" in walked, walked

    # And the export itself reads every entry, in key order, under those settings.
    pages = store.kv.export_pages("", None, 700)
    keys: list[str] = []
    async with contextlib.aclosing(pages):
        async for part in pages:
            keys += [entry.key for entry in part]
    assert keys == [f"k{i:05}" for i in range(2000)]
