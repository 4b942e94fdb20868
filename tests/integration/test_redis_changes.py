"""The change feed on Redis: what the write scripts record, the log's layout, trimming and its
floor, epochs, the blocking reads that wake watchers in other processes, and a Redis Cluster.

The conformance suite checks the contract on every backend; these tests check how Redis keeps
it (``backends/redis/changes.py``, ``lua/changes/_feed.lua``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fleetmem import ChangesExpiredError, ChangesNotEnabledError, InvalidArgumentError
from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis import changes as redis_changes
from fleetmem.backends.redis.changes import RedisChanges, position
from fleetmem.backends.seam import ChangeEvent
from fleetmem.testing import connected_store

pytestmark = pytest.mark.redis

aioredis = pytest.importorskip("redis.asyncio")
key_slot = pytest.importorskip("redis.crc").key_slot

#: Seconds a change may take to reach a watcher in another store: generous, the host is busy.
PATIENCE = 15.0


@pytest.fixture
async def admin(fleetmem_redis_server: Any) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(fleetmem_redis_server: Any, fleetmem_namespace: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
    async with connected_store(store) as created:
        yield created


@pytest.fixture
async def other(fleetmem_redis_server: Any, fleetmem_namespace: str) -> AsyncIterator[RedisStore]:
    """A second store on the same namespace, with a client of its own (another process)."""
    store = RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
    async with connected_store(store) as created:
        yield created


def feed_of(store: RedisStore) -> RedisChanges:
    backend = store.kv.changes()
    assert isinstance(backend, RedisChanges)
    return backend


async def read_everything(feed: RedisChanges, limit: int = 1000) -> list[ChangeEvent]:
    """Every change retained, page after page of ``limit``."""
    page = await feed.read(None, None, limit)
    events = list(page.events)
    while page.events:
        page = await feed.read(page.epoch, page.last, limit)
        events += page.events
    return events


def ops(events: list[ChangeEvent]) -> list[tuple[Any, ...]]:
    return [(e.op, e.key, e.partition, e.version, e.value) for e in events]


async def test_each_write_records_its_changes(store: RedisStore) -> None:
    feed = feed_of(store)
    await feed.enable(3_600_000)
    a = await store.set("a", {"x": 1})
    await store.set("b", 12345678901234567890123, ttl=60, partition="p")  # a "!"-marked value
    await store.set_many({"m1": 1, "m2": 2}, partition="q")
    assert await store.set_if_absent("a", 0) is False  # lost: nothing
    assert await store.set_if_absent("c", "c") is True
    await store.compare_and_set("a", 2, version=a.version)
    assert await store.incr("n", 5) == 5
    assert await store.expire("a", 30) is True
    assert await store.persist("a") is True
    assert await store.expire("nope", 30) is False  # nothing
    assert await store.delete("nope") is False  # nothing
    assert await store.delete("c") is True
    assert await store.delete_many(["m1", "m2", "nope"]) == 2
    assert await store.clear_partition("p") == 1
    assert await store.clear_partition("p") == 0  # nothing
    assert await store.clear() == 2
    assert await store.clear() == 0  # nothing
    events = await read_everything(feed)
    assert ops(events) == [
        ("set", "a", "default", 1, {"x": 1}),
        ("set", "b", "p", 1, 12345678901234567890123),
        ("set", "m1", "q", 1, 1),
        ("set", "m2", "q", 1, 2),
        ("set", "c", "default", 1, "c"),
        ("set", "a", "default", 2, 2),
        ("set", "n", "default", 1, 5),
        ("ttl", "a", "default", 2, None),
        ("ttl", "a", "default", 2, None),
        ("delete", "c", "default", None, None),
        ("delete", "m1", "q", None, None),
        ("delete", "m2", "q", None, None),
        ("clear", None, "p", None, None),
        ("clear", None, None, None, None),
    ]
    assert events[1].expires_at is not None and events[0].expires_at is None
    assert events[7].expires_at is not None and events[8].expires_at is None
    positions = [e.pos for e in events]
    assert positions == sorted(set(positions)) and positions[0] >= 1
    assert all(e.at.tzinfo is not None for e in events)


async def test_a_namespace_without_a_feed_records_nothing(store: RedisStore, admin: Any) -> None:
    prefix = f"fm:{{{store.namespace}}}:"
    await store.set("a", 1)
    await store.set_many({f"k{i}": i for i in range(10)})
    await store.incr("n")
    await store.expire("a", 60)
    await store.delete_many(["k1", "k2"])
    await store.clear()
    assert await admin.exists(prefix + "f", prefix + "s") == 0
    feed = feed_of(store)
    with pytest.raises(ChangesNotEnabledError):
        await feed.read(None, None, 10)
    # A disabled feed keeps only its epoch; writes record nothing.
    await feed.enable(60_000)
    await store.set("a", 1)
    await feed.disable()
    await store.set("a", 2)
    assert await admin.exists(prefix + "s") == 0
    assert set(await admin.hgetall(prefix + "f")) == {b"e"}


async def test_the_feed_keys_share_the_namespace_slot(store: RedisStore, admin: Any) -> None:
    await store.changes.enable()
    await store.set("{other}/x", 1)
    names = [k async for k in admin.scan_iter(match=f"fm:{{{store.namespace}}}:*")]
    prefix = f"fm:{{{store.namespace}}}:".encode()
    assert {prefix + b"f", prefix + b"s"} <= set(names)
    assert {key_slot(name) for name in names} == {key_slot(prefix)}


async def test_big_writes_are_paged_across_stream_entries(store: RedisStore, admin: Any) -> None:
    """A set_many's changes go out 1000 per stream entry; any limit reads them once, in order,
    also when a page ends inside an entry."""
    feed = feed_of(store)
    await feed.enable(3_600_000)
    await store.set("first", 0)
    items = {f"k{i:05d}": i for i in range(4500)}
    await store.set_many(items)
    await store.delete_many(list(items)[:1500])
    await store.set("last", 0)
    assert await admin.xlen(f"fm:{{{store.namespace}}}:s") < 20
    expected = (
        [("set", "first")]
        + [("set", k) for k in items]
        + [("delete", k) for k in list(items)[:1500]]
        + [("set", "last")]
    )
    for limit in (1, 7, 999, 1000, 10_000):
        events = await read_everything(feed, limit)
        assert [(e.op, e.key) for e in events] == expected, limit
        assert [e.pos for e in events] == sorted({e.pos for e in events})
    epoch, head = await feed.head()
    assert head == events[-1].pos
    # From any cursor inside the big entry: exactly what follows it.
    middle = events[1234]
    page = await feed.read(epoch, middle.pos, 3)
    assert [e.key for e in page.events] == [events[i].key for i in (1235, 1236, 1237)]


async def test_concurrent_writers_keep_per_key_order(store: RedisStore, other: RedisStore) -> None:
    feed = feed_of(store)
    await feed.enable(3_600_000)

    async def writer(s: RedisStore, i: int) -> None:
        for j in range(30):
            key = f"k{(i + j) % 5}"
            if j % 7 == 6:
                await s.delete(key)
            elif j % 3:
                await s.incr(key)
            else:
                await s.set(key, j)

    await asyncio.gather(
        *(writer(store, i) for i in range(8)),
        *(writer(other, i) for i in range(8)),
        store.set_many({f"bulk{i}": i for i in range(500)}),
    )
    events = await read_everything(feed)
    # 26 sets or incrs per writer and the bulk; a delete only when the key was there.
    assert len([e for e in events if e.op != "delete"]) == 16 * 26 + 500
    assert [e.pos for e in events] == sorted({e.pos for e in events})
    last: dict[str, int] = {}
    for event in events:
        assert event.key is not None
        if event.op == "delete":
            last.pop(event.key, None)
            continue
        assert event.version is not None
        assert event.version > last.get(event.key, 0), event
        last[event.key] = event.version
    for key in (f"k{i}" for i in range(5)):
        entry = await store.get_entry(key)
        assert (entry.version if entry else None) == last.get(key)


async def test_trimming_expires_old_cursors_with_the_oldest(store: RedisStore, admin: Any) -> None:
    feed = feed_of(store)
    await feed.enable(2000)
    await store.set("old", 1)
    epoch, _ = await feed.head()
    old = await read_everything(feed)
    assert [e.key for e in old] == ["old"]
    await asyncio.sleep(2.5)
    await store.set("new", 2)
    with pytest.raises(ChangesExpiredError) as caught:
        await feed.read(epoch, 0, 10)
    assert caught.value.oldest == feed.cursor(epoch, old[-1].pos)
    # The oldest readable cursor reads what is left; the cursor at the trimmed change too.
    page = await feed.read(epoch, old[-1].pos, 10)
    assert [e.key for e in page.events] == ["new"]
    assert [e.key for e in (await feed.read(None, None, 10)).events] == ["new"]
    assert await admin.hget(f"fm:{{{store.namespace}}}:f", "f") == b"%d-%d" % (
        old[-1].pos >> 32,
        old[-1].pos & 0xFFFFFFFF,
    )


async def test_writes_trim_a_feed_nobody_reads(store: RedisStore, admin: Any) -> None:
    # A long retention while the log is written and counted (a slow set_many must not see
    # its first slice trimmed by its last), then a short one.
    await store.changes.enable(retention=3600)
    log = f"fm:{{{store.namespace}}}:s"
    await store.set_many({f"k{i}": i for i in range(3000)})
    entries = await admin.xrange(log)
    assert len(entries) == 3  # 1000 changes each
    await store.changes.enable(retention=0.3)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while (await admin.xrange(log, count=1))[0][0] <= entries[-1][0]:
        # A write trims what is past retention, at most once a second.
        assert loop.time() < deadline, "the writes never trimmed the log"
        await asyncio.sleep(0.2)
        await store.set("tick", 1)


async def test_disable_then_enable_starts_a_greater_epoch(store: RedisStore, admin: Any) -> None:
    feed = feed_of(store)
    await feed.enable(60_000)
    await store.set("a", 1)
    first, pos = await feed.head()
    await feed.enable(120_000)  # only the retention
    assert await feed.head() == (first, pos)
    await feed.disable()
    await feed.disable()  # nothing
    assert await feed.enabled() is False
    await feed.enable(60_000)
    second, empty = await feed.head()
    assert second > first and empty == 0
    with pytest.raises(ChangesExpiredError):
        await feed.read(first, pos, 10)
    with pytest.raises(InvalidArgumentError):
        await feed.read(second + 1, 0, 10)
    with pytest.raises(InvalidArgumentError):
        await feed.read(second, 1 << 60, 10)  # past the head
    # An epoch ahead of the server's clock (a clock that went back): the next is greater still.
    ahead = 2**52  # microseconds: in the year 2112
    await feed.disable()
    await admin.hset(f"fm:{{{store.namespace}}}:f", "e", ahead)
    await feed.enable(60_000)
    assert (await feed.head())[0] == ahead + 1


@pytest.mark.parametrize("partition", [None, "default"])
async def test_a_clear_with_a_feed_is_one_call_with_its_change(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch, partition: str | None
) -> None:
    """Without a feed clear() deletes 5000 index members per script call; with a feed the
    whole clear is one call that records its "clear" with all its deletions, so a client that
    dies in the middle cannot leave a "clear" in the feed while the entries are still live."""
    feed = feed_of(store)
    await feed.enable(3_600_000)
    await store.set_many({f"k{i:05d}": i for i in range(12_000)})
    _, start = await feed.head()
    kv: Any = store.kv
    calls = 0
    script = kv._script

    async def counted(write: bool, which: Any, *args: Any) -> Any:
        nonlocal calls
        if which.name == "clear":
            calls += 1
        return await script(write, which, *args)

    monkeypatch.setattr(kv, "_script", counted)
    if partition is None:
        assert await store.clear() == 12_000
    else:
        assert await store.clear_partition(partition) == 12_000
    monkeypatch.undo()
    assert calls == 1
    epoch, _ = await feed.head()
    page = await feed.read(epoch, start, 100)
    assert [(e.op, e.key, e.partition) for e in page.events] == [("clear", None, partition)]
    assert await store.keys() == []


async def test_a_watcher_in_another_store_is_woken_by_the_log(
    store: RedisStore, other: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher sleeps in XREAD BLOCK on a connection of its own: a write from another
    client wakes it, long before its poll (made 60 s here) would."""
    monkeypatch.setattr(RedisChanges, "poll_interval", 60.0)
    await store.changes.enable()
    got: list[Any] = []
    since = await other.changes.cursor()

    async def watch() -> None:
        async for change in other.changes.watch("k*", since=since):
            got.append(change)

    task = asyncio.create_task(watch())
    try:
        loop = asyncio.get_running_loop()
        for i in range(5):
            await asyncio.sleep(0.2)  # asleep by now, most likely
            await store.set(f"k{i}", i)
            deadline = loop.time() + PATIENCE
            while len(got) <= i:
                assert loop.time() < deadline, f"change {i} did not arrive: {got}"
                assert not task.done()
                await asyncio.sleep(0.01)
        assert [c.value for c in got] == [0, 1, 2, 3, 4]
        # Closing the watcher's store ends its blocked read at once.
        await asyncio.sleep(0.2)
        await other.close()
        done, _ = await asyncio.wait({task}, timeout=PATIENCE / 3)
        assert done and task.exception() is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_change_between_a_read_and_the_wait_is_not_lost(
    store: RedisStore, other: RedisStore
) -> None:
    feed = feed_of(other)
    await feed.enable(60_000)
    epoch, head = await feed.head()
    with feed.watch() as watch:
        page = await feed.read(epoch, head, 10)
        assert page.events == []
        await store.set("k", 1)  # another client: the watch is not notified
        loop = asyncio.get_running_loop()
        start = loop.time()
        await feed.wait(watch, epoch, page.last, 30.0)
        assert loop.time() - start < PATIENCE
    assert [e.key for e in (await feed.read(epoch, page.last, 10)).events] == ["k"]


async def test_a_failing_blocking_read_falls_back_to_polling(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = feed_of(store)
    await feed.enable(60_000)

    async def broken(self: Any, key: bytes, start: bytes, timeout: float) -> None:
        raise ConnectionError("lost")

    monkeypatch.setattr(redis_changes.BlockingReads, "read", broken)
    epoch, head = await feed.head()
    loop = asyncio.get_running_loop()
    with feed.watch() as watch:
        start = loop.time()
        await feed.wait(watch, epoch, head, 0.3)  # nothing comes: the whole timeout
        assert loop.time() - start >= 0.25
        await store.set("k", 1)  # this process: notified
        start = loop.time()
        await feed.wait(watch, epoch, head, 30.0)
        assert loop.time() - start < PATIENCE


async def test_positions_are_stream_ids(store: RedisStore, admin: Any) -> None:
    feed = feed_of(store)
    await feed.enable(60_000)
    await store.set("k", 1)
    raw = await admin.xrange(f"fm:{{{store.namespace}}}:s")
    assert len(raw) == 1
    (event,) = (await feed.read(None, None, 10)).events
    assert event.pos == position(raw[0][0])
    assert redis_changes.stream_id(event.pos) == raw[0][0]


async def _watch_until(
    watching: RedisStore, write: Callable[[], Awaitable[Any]], count: int
) -> list[Any]:
    got: list[Any] = []
    since = await watching.changes.cursor()

    async def watch() -> None:
        async for change in watching.changes.watch(since=since):
            got.append(change)

    task = asyncio.create_task(watch())
    try:
        await asyncio.sleep(0.2)
        await write()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while len(got) < count:
            assert loop.time() < deadline, got
            assert not task.done()
            await asyncio.sleep(0.01)
        return got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.cluster
async def test_the_feed_on_a_cluster(fleetmem_redis_cluster: Any, fleetmem_namespace: str) -> None:
    names = [f"{fleetmem_namespace}-{i}" for i in range(6)]  # spread over the primaries
    writer = await RedisStore.from_url(fleetmem_redis_cluster.url, namespace=names[0]).connect()
    reader = await RedisStore.from_url(fleetmem_redis_cluster.url, namespace=names[0]).connect()
    raw = aioredis.RedisCluster.from_url(fleetmem_redis_cluster.url)
    try:
        for name in names:
            w, r = writer.with_namespace(name), reader.with_namespace(name)
            await w.changes.enable()
            await w.set("a", 1)

            async def writes(w: RedisStore = w) -> None:
                await w.set_many({f"m{i}": i for i in range(1500)})
                await w.delete("a")
                await w.clear_partition("default")

            got = await _watch_until(r, writes, 1502)
            assert [(c.op, c.key) for c in got[-3:]] == [
                ("set", "m1499"),
                ("delete", "a"),
                ("clear", None),
            ]
            batch = await r.changes.read()
            assert batch.changes[0].key == "a" and len(batch.changes) == 1000
            prefix = f"fm:{{{name}}}:"
            slots = {key_slot((prefix + s).encode()) for s in ("f", "s", "e:a", "c")}
            assert len(slots) == 1
            assert await raw.exists(prefix + "s") == 1
            await w.changes.disable()
            await w.clear()
    finally:
        await raw.aclose()
        await writer.close()
        await reader.close()
