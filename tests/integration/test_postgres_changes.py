"""The change feed on PostgreSQL beyond the conformance suite: a change whose transaction commits
after later ones were read, per-key order under concurrent batches, what a namespace without a
feed pays (no rows, one probe per statement), fenced writes, a clear racing a write, NOTIFY
wake-ups from another store, trimming, stale epochs and the sweeper. Every test talks to a real
server."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fleetmem.errors import ChangesExpiredError, ChangesNotEnabledError, LeaseLostError
from fleetmem.protocol import Change

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore, init_connection  # noqa: E402
from fleetmem.backends.postgres.changes import PostgresChanges  # noqa: E402
from fleetmem.backends.postgres.connector import statements  # noqa: E402

_CHANGES = "fleetmem.entries_changes"
_KV = statements("kv.sql", "fleetmem", "entries")


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _count(dsn: str, ns: str, where: str = "true") -> int:
    rows = await _fetch(
        dsn, f"SELECT count(*) FROM {_CHANGES} WHERE namespace = $1 AND {where}", ns
    )
    return int(rows[0][0])


async def _read_all(store: PostgresStore, since: str | None) -> tuple[list[Change], str]:
    """Every change after ``since``, page by page, and the cursor at the end."""
    out: list[Change] = []
    while True:
        batch = await store.changes.read(since=since, limit=500)
        out.extend(batch.changes)
        since = batch.cursor
        if not batch.changes:
            return out, since


@pytest.fixture
async def store(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[PostgresStore]:
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace, max_size=8
    ) as opened:
        yield opened


async def _raw(dsn: str) -> Any:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn


# ------------------------------------------------------------------------ order and loss


async def test_a_read_after_an_acknowledged_write_sees_it_while_others_number(
    store: PostgresStore,
) -> None:
    """Read-your-writes on the feed while other readers keep numbering changes: a read that
    starts after a write was acknowledged returns it (or raises), never an empty batch "at
    the head". The read function once took the head and the "nothing to number" check from
    two snapshots: a sequencer committing between them made a stale head look current."""
    await store.changes.enable()
    stop = asyncio.Event()

    async def number() -> None:
        while not stop.is_set():
            await store.changes.cursor()  # numbers whatever is committed

    numberers = [asyncio.create_task(number()) for _ in range(3)]
    try:
        since = await store.changes.cursor()
        for i in range(400):
            await store.set("k", i)
            batch = await store.changes.read(since=since)
            assert [(c.key, c.value) for c in batch.changes] == [("k", i)], (i, batch)
            since = batch.cursor
    finally:
        stop.set()
        await asyncio.gather(*numberers)
        await store.changes.disable()


async def test_a_change_committed_late_is_read_once_after_the_later_ones(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """A write's change id is drawn before it commits: a transaction that holds its write open
    while later writes commit and are read must still have its change read -- once, after
    them -- and a write of the same key that waited for it follows it with a greater
    version."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    late = await _raw(dsn)
    try:
        tx = late.transaction()
        await tx.start()
        await late.fetchrow(_KV["set"], ns, "late", b'"first"', None, None, False)
        await store.set("a", 1)
        await store.set("b", 2)
        # The same key: this set waits for the open transaction's row lock.
        follower = asyncio.create_task(store.set("late", "second"))
        first, cursor = await _read_all(store, start)
        assert [(c.op, c.key) for c in first] == [("set", "a"), ("set", "b")]
        assert not follower.done()
        await tx.commit()
        await asyncio.wait_for(follower, 30)
    finally:
        await late.close()
    rest, end = await _read_all(store, cursor)
    assert [(c.key, c.value, c.version) for c in rest] == [
        ("late", "first", 1),
        ("late", "second", 2),
    ]
    assert all(c.cursor > cursor for c in rest)
    assert (await store.changes.read(since=end)).changes == []
    everything, _ = await _read_all(store, start)
    assert [c.key for c in everything] == ["a", "b", "late", "late"]
    assert len({c.cursor for c in everything}) == 4
    await store.changes.disable()


async def test_per_key_versions_increase_under_concurrent_batches(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """Concurrent set_many, coalesced sets and deletes on overlapping keys, read while they
    run: each key's changes come in version order (a delete resets it), every write is in the
    feed exactly once, and the last change of each key matches the store."""
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    keys = [f"k{i:03}" for i in range(60)]
    writes = 0

    async def batches(seed: int) -> None:
        nonlocal writes
        rng = random.Random(seed)
        for _ in range(15):
            chosen = rng.sample(keys, 25)
            written = await store.set_many(dict.fromkeys(chosen, seed))
            writes += written  # (not `writes += await ...`: it reads `writes` before awaiting)

    async def singles(seed: int) -> None:
        nonlocal writes
        rng = random.Random(seed)
        for _ in range(40):
            key = rng.choice(keys)
            if rng.random() < 0.2:
                deleted = await store.delete(key)
                writes += deleted
            else:
                await asyncio.gather(store.set(key, -seed), store.set(rng.choice(keys), seed))
                writes += 1 + 1

    seen: list[Change] = []
    done = asyncio.Event()

    async def reader() -> None:
        since = start
        while not done.is_set():
            batch = await store.changes.read(since=since, limit=100)
            seen.extend(batch.changes)
            since = batch.cursor
            await asyncio.sleep(0.005)
        rest, _ = await _read_all(store, since)
        seen.extend(rest)

    reading = asyncio.create_task(reader())
    await asyncio.gather(*(batches(s) for s in range(4)), *(singles(10 + s) for s in range(3)))
    done.set()
    await asyncio.wait_for(reading, 60)
    # The two sets of a gather may hit the same key: both are writes, both are recorded.
    assert len(seen) == writes
    assert len({c.cursor for c in seen}) == len(seen)
    assert [c.cursor for c in seen] == sorted(c.cursor for c in seen)
    by_key: dict[str, list[Change]] = defaultdict(list)
    for change in seen:
        by_key[change.key].append(change)  # type: ignore[index]
    for key, changes in by_key.items():
        expected = 0
        for change in changes:
            if change.op == "delete":
                expected = 0
                continue
            assert change.version == expected + 1, (key, [(c.op, c.version) for c in changes])
            expected = change.version
        entry = await store.get_entry(key)
        last = changes[-1]
        if last.op == "delete":
            assert entry is None
        else:
            assert entry is not None and (entry.version, entry.value) == (last.version, last.value)
    await store.changes.disable()


async def test_a_clear_follows_every_write_it_did_not_see(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """A clear waits for the recording writes in flight (an insert of a new key its snapshot
    would miss) and then removes them: in the feed the clear comes after them, as in the
    store."""
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    await store.set("old", 1)
    writer = await _raw(dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.fetchrow(_KV["set"], ns, "new", b"1", None, None, False)
        clearing = asyncio.create_task(store.clear())
        await asyncio.sleep(0.3)
        assert not clearing.done()  # it waits for the write in flight
        await tx.commit()
        assert await asyncio.wait_for(clearing, 30) == 2
    finally:
        await writer.close()
    changes, _ = await _read_all(store, start)
    assert [(c.op, c.key) for c in changes] == [("set", "old"), ("set", "new"), ("clear", None)]
    assert await store.keys() == []
    # Without a feed a clear waits for nobody.
    await store.changes.disable()
    writer = await _raw(dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.fetchrow(_KV["set"], ns, "new", b"1", None, None, False)
        assert await asyncio.wait_for(store.clear(), 30) == 0
        await tx.rollback()
    finally:
        await writer.close()


# ------------------------------------------------------------------------ what is recorded


async def test_a_namespace_without_a_feed_records_nothing(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """Every write of a namespace without a feed (another namespace has one) leaves no row,
    and its statements look the feed up once, not once per row."""
    dsn = fleetmem_postgres_database
    other = store.with_namespace(store.namespace + "-fed")
    await other.changes.enable(retention=600)
    for target in (store, other):
        await target.set("a", 1, ttl=60)
        await target.set_many({f"m{i}": i for i in range(50)})
        await asyncio.gather(*(target.set(f"c{i}", i) for i in range(20)))
        await target.set_if_absent("b", 1)
        await target.compare_and_set("a", 2, version=1)
        await target.incr("n", 1)
        await target.expire("a", 30)
        await target.delete("m0")
        await target.delete_many(["m1", "m2"])
        await target.clear_partition("default")
        await target.clear()
    assert await _count(dsn, store.namespace) == 0
    assert await _count(dsn, other.namespace) == 1 + 50 + 20 + 1 + 1 + 1 + 1 + 1 + 2 + 1
    with pytest.raises(ChangesNotEnabledError):
        await store.changes.read()
    # One probe of the feed table per statement, also for a batch of 1,000 rows.
    for ns, recorded in ((store.namespace, 0), (other.namespace, 1000)):
        conn = await _raw(dsn)
        try:
            tx = conn.transaction()
            await tx.start()
            try:
                keys = [f"p{i}" for i in range(1000)]
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + _KV["set_batch_plain"],
                    ns,
                    keys,
                    [b"1"] * 1000,
                )
                probes = _nodes(json.loads(rows[0][0])[0]["Plan"], "entries_feeds_pkey")
                assert [node["Actual Loops"] for node in probes] == [1]
                count = f"SELECT count(*) FROM {_CHANGES} WHERE namespace = $1 AND key LIKE 'p%'"
                assert await conn.fetchval(count, ns) == recorded
            finally:
                await tx.rollback()
        finally:
            await conn.close()
    await other.changes.disable()


def _nodes(plan: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The nodes of an EXPLAIN (FORMAT JSON) plan on index or table ``name``."""
    found = []
    if name in (plan.get("Index Name"), plan.get("Relation Name")):
        found.append(plan)
    for child in plan.get("Plans", ()):
        found.extend(_nodes(child, name))
    return found


async def test_fenced_writes_record_and_refused_ones_do_not(store: PostgresStore) -> None:
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    lease = await store.leases.acquire("l", owner="o", ttl=30)
    assert lease is not None
    await store.set("a", 1, fence=lease)
    await store.set_many({"b": 1, "c": 2}, fence=lease)
    await store.incr("a", 1, fence=lease)
    await store.compare_and_set("a", 5, version=2, fence=lease)
    await store.set_if_absent("d", 1, fence=lease)
    await store.delete("b", fence=lease)
    await store.delete_many(["c", "zz"], fence=lease)
    assert await store.leases.release(lease)
    for write in (
        store.set("x", 1, fence=lease),
        store.set_many({"y": 1}, fence=lease),
        store.delete("a", fence=lease),
    ):
        with pytest.raises(LeaseLostError):
            await write
    changes, _ = await _read_all(store, start)
    assert [(c.op, c.key, c.version) for c in changes] == [
        ("set", "a", 1),
        ("set", "b", 1),
        ("set", "c", 1),
        ("set", "a", 2),
        ("set", "a", 3),
        ("set", "d", 1),
        ("delete", "b", None),
        ("delete", "c", None),
    ]
    await store.changes.disable()


async def test_values_and_times_are_the_stored_ones(store: PostgresStore) -> None:
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    entry = await store.set("k", {"n": [1, 2.5, None]}, ttl=60, partition="p")
    await store.incr("f", 1.5)
    await store.persist("k")
    changes, _ = await _read_all(store, start)
    first, incr, ttl = changes
    assert (first.value, first.partition, first.expires_at) == (
        {"n": [1, 2.5, None]},
        "p",
        entry.expires_at,
    )
    assert first.at == entry.updated_at and first.at.utcoffset() is not None
    assert incr.value == 1.5 and isinstance(incr.value, float)
    assert (ttl.op, ttl.version, ttl.value, ttl.expires_at) == ("ttl", 1, None, None)
    await store.changes.disable()


# ------------------------------------------------------------------------ wake-ups


async def test_a_write_of_another_store_wakes_a_waiting_backend(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """Two stores with pools, notifiers and LISTEN connections of their own (two processes):
    a backend waiting with a poll far longer than the test is woken by the other store's
    write, through NOTIFY; then the front end's watch sees the other store's writes."""
    dsn, ns = fleetmem_postgres_database, fleetmem_namespace
    async with (
        PostgresStore.from_url(dsn, namespace=ns) as writer,
        PostgresStore.from_url(dsn, namespace=ns) as watcher,
    ):
        await writer.changes.enable(retention=600)
        backend = watcher.kv.changes()
        assert isinstance(backend, PostgresChanges)
        backend.poll_interval = 120.0  # type: ignore[misc]  # only a notification ends it
        await backend.listen()
        for round_ in range(3):
            with backend.watch() as watch:
                epoch, head = await backend.head()
                page = await backend.read(epoch, head, 10)
                assert page.events == []
                waiting = asyncio.create_task(backend.wait(watch, epoch, head, 120.0))
                # Give the wait time to mark the feed and sleep (not needed for correctness:
                # a write before the mark is found by its check).
                await asyncio.sleep(0.2)
                started = time.monotonic()
                await writer.set(f"k{round_}", round_)
                await asyncio.wait_for(waiting, 30)
                assert time.monotonic() - started < 30
            page = await backend.read(epoch, head, 10)
            assert [e.key for e in page.events] == [f"k{round_}"]
        received: list[Change] = []

        async def consume() -> None:
            async for change in watcher.changes.watch("w/*"):
                received.append(change)
                if len(received) == 3:
                    return

        consuming = asyncio.create_task(consume())
        deadline = time.monotonic() + 30
        i = 0
        while not consuming.done():
            assert time.monotonic() < deadline, "the watch never saw the other store's writes"
            await writer.set(f"w/{i}", i)  # until the watch, started at the head, sees some
            i += 1
            await asyncio.sleep(0.05)
        await consuming
        values = [c.value for c in received]
        assert values == sorted(values) and len(set(values)) == 3
        await writer.changes.disable()


# ------------------------------------------------------------------------ retention


async def test_trimming_past_retention_and_expired_cursors(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn, ns = fleetmem_postgres_database, store.namespace
    # A retention long enough for "young" to outlive the reads below on a stalled machine.
    await store.changes.enable(retention=3)
    start = await store.changes.cursor()
    for i in range(5):
        await store.set(f"old{i}", i)
    old, _ = await _read_all(store, start)
    assert len(old) == 5
    await asyncio.sleep(3.5)
    await store.set("young", 1)
    with pytest.raises(ChangesExpiredError) as caught:
        await store.changes.read(since=start)
    oldest = caught.value.oldest
    assert oldest > old[-1].cursor or oldest == old[-1].cursor
    batch = await store.changes.read(since=oldest)
    assert [c.key for c in batch.changes] == ["young"]
    assert [c.key for c in (await store.changes.read()).changes] == ["young"]
    assert await _count(dsn, ns) == 1  # the trimmed ones are deleted
    # The sweeper trims a feed nobody reads.
    await asyncio.sleep(3.5)
    await store.kv.sweep_changes()
    assert await _count(dsn, ns) == 0
    head = await store.changes.cursor()
    assert (await store.changes.read()).cursor == head
    # A longer retention: kept.
    await store.changes.enable(retention=600)
    await store.set("kept", 1)
    await asyncio.sleep(1.0)
    await store.kv.sweep_changes()
    assert [c.key for c in (await store.changes.read(since=head)).changes] == ["kept"]
    # Disabled and enabled again: a new epoch, older cursors are expired.
    await store.changes.disable()
    assert await _count(dsn, ns) == 0
    await store.changes.enable(retention=600)
    with pytest.raises(ChangesExpiredError):
        await store.changes.read(since=head)
    await store.changes.disable()


async def test_a_write_racing_a_disable_leaves_a_stale_change_the_sweeper_deletes(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    dsn, ns = fleetmem_postgres_database, store.namespace
    await store.changes.enable(retention=600)
    writer = await _raw(dsn)
    try:
        tx = writer.transaction()
        await tx.start()
        await writer.fetchrow(_KV["set"], ns, "k", b"1", None, None, False)
        await store.changes.disable()
        await tx.commit()
    finally:
        await writer.close()
    assert await _count(dsn, ns, "pos IS NULL") == 1
    await store.changes.enable(retention=600)
    start = await store.changes.cursor()
    await store.set("k2", 2)
    changes, _ = await _read_all(store, start)
    assert [c.key for c in changes] == ["k2"]  # the stale change is never read
    assert await store.kv.sweep_changes() == 1
    assert await _count(dsn, ns) == 1
    await store.changes.disable()


async def test_the_read_function_plans_for_each_call(
    store: PostgresStore, fleetmem_postgres_database: str
) -> None:
    """The read function numbers changes with plans made for each call's values: cached for
    generic values (PostgreSQL's choice after five calls), the numbering of a 10,000-change
    batch became a nested loop of 11 s instead of 25 ms, and a watcher lagged behind."""
    rows = await _fetch(
        fleetmem_postgres_database,
        "SELECT p.proconfig FROM pg_proc p WHERE p.proname LIKE '%changes_read'",
    )
    assert rows and all("plan_cache_mode=force_custom_plan" in (r[0] or []) for r in rows)
    await store.changes.enable()
    start = await store.changes.cursor()
    for i in range(8):  # past the five calls after which a generic plan may be cached
        await store.set(f"k{i}", i)
        await store.changes.read(since=start)
    await store.set_many({f"m{i:05d}": i for i in range(10_000)})
    changes, _ = await _read_all(store, start)
    assert len(changes) == 10_008
