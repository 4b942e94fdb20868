"""Export and import on the hybrid store (real PostgreSQL and Redis): the export is the durable
tier's snapshot, an import retires the cached copies it replaces as every write does, and a
replace is one PostgreSQL transaction after which no process -- this one, another store with
state of its own, another OS process -- reads a value from before it, also when the writer
cannot reach Redis.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from datetime import timedelta, timezone
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from fleetmem._codec import encode_value
from fleetmem.backends.hybrid import HybridStore
from fleetmem.backends.hybrid.kv import HybridKV
from fleetmem.backends.seam import ImportOp, ImportTally
from fleetmem.testing import connected_store
from fleetmem.testing.servers import PostgresServer, RedisServer, find_free_port

pytestmark = [pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis]

#: Seconds a child process may take to start and answer (a busy host).
PATIENCE = 60.0


def op(key: str, value: Any, partition: str = "default", expires_at: Any = None) -> ImportOp:
    return ImportOp(key, encode_value(value), partition, expires_at)


async def pages_of(*pages: list[ImportOp]) -> AsyncIterator[list[ImportOp]]:
    for page in pages:
        yield page


def hybrid_of(
    pg: PostgresServer, redis_url: str, namespace: str, trust_window: float = 30.0
) -> HybridStore:
    """A hybrid store with state of its own (as another process has). The long trust window
    makes it keep trusting the epoch it confirmed: only what the writer did in Redis (or the
    bypass) can stop it from serving its cached copies."""
    return HybridStore.from_urls(pg.dsn, redis_url, namespace=namespace, trust_window=trust_window)


@pytest.fixture
async def stores(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> AsyncIterator[tuple[HybridStore, HybridStore]]:
    """A writer and a reader on the same namespace, each with its own cache state."""
    pg, url = fleetmem_postgres_server, fleetmem_redis_server.url
    writer = hybrid_of(pg, url, fleetmem_namespace)
    reader = hybrid_of(pg, url, fleetmem_namespace)
    async with connected_store(writer), connected_store(reader):
        yield writer, reader


async def cache_all(store: HybridStore, keys: list[str]) -> dict[str, Any]:
    """Read ``keys`` twice (the first read fills, the second hits); the values read."""
    await store.get_many(keys)
    hits = store.metrics.hits
    got = await store.get_many(keys)
    for key in keys:
        await store.get(key)
    assert store.metrics.hits > hits, "nothing was served from the cache"
    return got


async def every_read(store: HybridStore, keys: list[str]) -> list[Any]:
    """What every read path of ``store`` returns for ``keys``."""
    entries = [await store.get_entry(k) for k in keys]
    return [
        await store.get_many(keys),
        {k: await store.get(k) for k in keys},
        {k: e.value for k, e in zip(keys, entries, strict=True) if e is not None},
        [k for k in keys if await store.exists(k)],
    ]


def reads_of(values: dict[str, Any], keys: list[str]) -> list[Any]:
    """``every_read``'s answer for ``keys`` when the namespace holds ``values`` of them."""
    return [values, {k: values.get(k) for k in keys}, values, [k for k in keys if k in values]]


async def postgres_view(dsn: str, namespace: str) -> dict[str, Any]:
    """The namespace's live entries as a PostgreSQL reader sees them (its own connection)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT key, value::text FROM fleetmem.entries WHERE namespace = $1"
            " AND (expires_at IS NULL OR expires_at > now()) ORDER BY key",
            namespace,
        )
    finally:
        await conn.close()
    return {row[0]: json.loads(row[1]) for row in rows}


def test_the_hybrid_exports_a_snapshot_and_replaces_atomically() -> None:
    assert HybridKV.export_consistency == "snapshot"
    assert HybridKV.replace_is_atomic is True


async def test_an_import_retires_the_copies_it_replaces(
    stores: tuple[HybridStore, HybridStore],
) -> None:
    writer, reader = stores
    keys = [f"k{i}" for i in range(10)]
    await writer.set_many(dict.fromkeys(keys, "old"))
    old = dict.fromkeys(keys, "old")
    assert await cache_all(reader, keys) == old
    assert await cache_all(writer, keys) == old
    new_keys = [*keys[:5], "n1"]
    tally = await writer.kv.import_batch([op(k, f"new-{k}") for k in new_keys], False)
    assert tally == ImportTally(6, 0, 0)
    expected = {**old, **{k: f"new-{k}" for k in new_keys}}
    for store in (writer, reader):
        assert await every_read(store, [*keys, "n1"]) == reads_of(expected, [*keys, "n1"])
    # The write rules are the durable tier's: a live key's version + 1, a new key's 1.
    k0, n1 = await reader.get_entry("k0"), await reader.get_entry("n1")
    assert k0 is not None and n1 is not None and (k0.version, n1.version) == (2, 1)
    assert k0 == await writer.durable.get_entry("k0")


async def test_missing_only_leaves_the_cached_entries_it_skips_right(
    stores: tuple[HybridStore, HybridStore],
) -> None:
    writer, reader = stores
    await writer.set_many({"a": "mine", "b": "mine"})
    assert await cache_all(reader, ["a", "b", "c"]) == {"a": "mine", "b": "mine"}
    tally = await writer.kv.import_batch([op("a", "theirs"), op("c", "theirs")], True)
    assert tally == ImportTally(1, 0, 1)
    for store in (writer, reader):
        assert await store.get_many(["a", "b", "c"]) == {"a": "mine", "b": "mine", "c": "theirs"}
    # Expired on the file: skipped, and the cached answer stays right.
    entry = await writer.set("~clock", 0)
    past = entry.updated_at - timedelta(seconds=1)
    assert await writer.kv.import_batch([op("d", 1, expires_at=past)], False) == (0, 1, 0)
    assert await reader.get("d") is None


async def test_replace_retires_every_copy_of_the_namespace(
    stores: tuple[HybridStore, HybridStore],
    fleetmem_postgres_server: PostgresServer,
    fleetmem_namespace: str,
) -> None:
    writer, reader = stores
    keys = ["a", "b", "c", "d", "e"]
    await writer.set_many(dict.fromkeys(keys, "old"))
    for store in (writer, reader):
        assert await cache_all(store, [*keys, "x"]) == dict.fromkeys(keys, "old")
    tally = await writer.kv.import_replace(
        pages_of([op("b", "new-b"), op("c", "new-c")], [op("x", "new-x")])
    )
    assert tally == ImportTally(3, 0, 0)
    expected = {"b": "new-b", "c": "new-c", "x": "new-x"}
    for store in (writer, reader):
        assert await every_read(store, [*keys, "x"]) == reads_of(expected, [*keys, "x"])
        assert await store.keys() == ["b", "c", "x"]
    assert await postgres_view(fleetmem_postgres_server.dsn, fleetmem_namespace) == expected
    # The namespace's cache works on: reads fill and hit again, fresh.
    assert await cache_all(reader, ["b", "x"]) == {"b": "new-b", "x": "new-x"}


async def test_a_replace_is_one_transaction_and_reads_during_it_fill_nothing_stale(
    stores: tuple[HybridStore, HybridStore],
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """Between the pages of a replace, a PostgreSQL reader sees the namespace as it was, and
    the reader store reads it through its cache -- filling copies of the old rows, the truth
    until the COMMIT. Once the replace returns, none of them is served."""
    writer, reader = stores
    dsn = fleetmem_postgres_server.dsn
    old = {f"k{i:02d}": f"old-{i}" for i in range(30)}
    await writer.set_many(old)
    assert await cache_all(reader, list(old)) == old
    seen: list[dict[str, Any]] = []
    during: list[dict[str, Any]] = []
    client = aioredis.from_url(fleetmem_redis_server.url)
    fills = reader.metrics.fills

    async def pages() -> AsyncIterator[list[ImportOp]]:
        for start in range(0, 30, 10):
            yield [op(f"k{i:02d}", f"new-{i}") for i in range(start, start + 10) if i % 3]
            seen.append(await postgres_view(dsn, fleetmem_namespace))
            # The copies gone: the reader misses, reads PostgreSQL's old rows and fills them.
            await client.delete(*[f"fmh:{{{fleetmem_namespace}}}:k:{key}" for key in old])
            during.append(await reader.get_many(list(old)))

    try:
        tally = await writer.kv.import_replace(pages())
    finally:
        await client.aclose()
    assert reader.metrics.fills >= fills + 3 * len(old)
    assert tally == ImportTally(20, 0, 0)
    assert seen == [old, old, old] and during == [old, old, old]
    expected = {f"k{i:02d}": f"new-{i}" for i in range(30) if i % 3}
    assert await postgres_view(dsn, fleetmem_namespace) == expected
    for store in (reader, writer):
        assert await store.get_many(list(old)) == expected
        assert [await store.get(k) for k in old] == [expected.get(k) for k in old]


async def test_a_failed_replace_changes_nothing(
    stores: tuple[HybridStore, HybridStore],
    fleetmem_postgres_server: PostgresServer,
    fleetmem_namespace: str,
) -> None:
    writer, reader = stores
    old = {f"k{i}": "old" for i in range(5)}
    await writer.set_many(old)
    assert await cache_all(reader, list(old)) == old

    async def pages() -> AsyncIterator[list[ImportOp]]:
        yield [op("k0", "new"), op("k1", "new")]
        yield [op("k3", "new")]
        raise RuntimeError("the input broke")

    with pytest.raises(RuntimeError, match="the input broke"):
        await writer.kv.import_replace(pages())
    assert await postgres_view(fleetmem_postgres_server.dsn, fleetmem_namespace) == old
    for store in (writer, reader):
        assert await store.get_many(list(old)) == old
        assert (await store.get_entry("k0")).version == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["import_batch", "import_replace"])
async def test_an_import_cut_off_from_redis_retires_the_copies_other_processes_read(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
    how: str,
) -> None:
    """The importing process cannot reach Redis (a dead URL); the reader can, and cached the
    old values. Once the import returns, the reader reads the new ones (the writer took the
    bypass of a missed invalidation), and the import worked without Redis."""
    pg, dead = fleetmem_postgres_server, f"redis://127.0.0.1:{find_free_port()}/0"
    reader = hybrid_of(pg, fleetmem_redis_server.url, fleetmem_namespace, trust_window=0.1)
    writer = hybrid_of(pg, dead, fleetmem_namespace, trust_window=0.1)
    async with reader, writer:
        old = {"a": "old", "b": "old"}
        await reader.set_many(old)
        assert await cache_all(reader, ["a", "b"]) == old
        if how == "import_batch":
            assert await writer.kv.import_batch([op("a", "new")], False) == (1, 0, 0)
            expected = {"a": "new", "b": "old"}
        else:
            assert await writer.kv.import_replace(pages_of([op("a", "new")])) == (1, 0, 0)
            expected = {"a": "new"}
        assert writer.metrics.invalidations_missed >= 1
        for _ in range(20):
            assert await reader.get_many(["a", "b"]) == expected
            assert await reader.get("b") == expected.get("b")
            await asyncio.sleep(0.02)
        await reader.clear()


async def test_an_export_is_the_durable_snapshot(
    stores: tuple[HybridStore, HybridStore],
) -> None:
    writer, reader = stores
    await writer.set_many({f"k{i:03d}": i for i in range(250)})
    await writer.set("p1", "in p", partition="p")
    assert await cache_all(reader, ["k000", "k001"]) == {"k000": 0, "k001": 1}
    pages: list[list[Any]] = []
    async for page in reader.kv.export_pages("k", None, 100):
        pages.append(page)
        if len(pages) == 1:  # written after the export began: not in it (a snapshot)
            await writer.set("k249", "changed")
            await writer.delete("k200")
            await writer.set("k250", "added")
    got = [e for page in pages for e in page]
    assert [len(p) for p in pages] == [100, 100, 50]
    assert [(e.key, e.value) for e in got] == [(f"k{i:03d}", i) for i in range(250)]
    durable = [e async for page in writer.durable.kv.export_pages("k", None, 1000) for e in page]
    assert [e.key for e in durable] == [f"k{i:03d}" for i in range(251) if i != 200]
    only = [e async for page in reader.kv.export_pages("", "p", 10) for e in page]
    assert [(e.key, e.value, e.partition) for e in only] == [("p1", "in p", "p")]


_CHILD = """
import asyncio, json, sys
from fleetmem.backends.hybrid import HybridStore

async def main(dsn, url, namespace, keys):
    store = HybridStore.from_urls(dsn, url, namespace=namespace, trust_window=30.0)
    async with store:
        await store.get_many(keys)
        for key in keys:
            await store.get(key)
        print(json.dumps([await store.get_many(keys), store.metrics.hits]), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        single = {key: await store.get(key) for key in keys}
        print(json.dumps([await store.get_many(keys), single]), flush=True)

asyncio.run(main(*sys.argv[1:4], json.loads(sys.argv[4])))
"""


async def test_another_process_reads_nothing_from_before_a_replace(
    stores: tuple[HybridStore, HybridStore],
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """A child process caches the old values and keeps trusting its epoch (a 30 s window);
    the replace here retires them all: its next reads return the new values."""
    writer, _ = stores
    keys = ["a", "b", "c"]
    await writer.set_many(dict.fromkeys(keys, "old"))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        fleetmem_postgres_server.dsn,
        fleetmem_redis_server.url,
        fleetmem_namespace,
        json.dumps(keys),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        first = json.loads(await asyncio.wait_for(child.stdout.readline(), PATIENCE))
        assert first[0] == dict.fromkeys(keys, "old") and first[1] >= len(keys)  # cached
        tally = await writer.kv.import_replace(pages_of([op("a", "new"), op("c", "new")]))
        assert tally == (2, 0, 0)
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        after = json.loads(await asyncio.wait_for(child.stdout.readline(), PATIENCE))
        assert after == [{"a": "new", "c": "new"}, {"a": "new", "b": None, "c": "new"}]
        assert await asyncio.wait_for(child.wait(), PATIENCE) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_the_front_end_round_trip_through_the_hybrid(
    stores: tuple[HybridStore, HybridStore],
    tmp_path: Any,
) -> None:
    """``export_to`` / ``import_from`` on the hybrid: a replace from a file, seen at once by
    the other store through its cache."""
    writer, reader = stores
    await writer.set_many({"a": 1, "b": {"x": [1, 2]}}, partition="p")
    path = tmp_path / "ns.jsonl.gz"
    report = await writer.export_to(path)
    assert (report.count, report.consistency) == (2, "snapshot")
    await writer.set_many({"a": "changed", "z": "extra"})
    assert await cache_all(reader, ["a", "b", "z"]) == {
        "a": "changed",
        "b": {"x": [1, 2]},
        "z": "extra",
    }
    imported = await writer.import_from(path, mode="replace")
    assert (imported.written, imported.skipped_expired, imported.skipped_existing) == (2, 0, 0)
    assert await reader.get_many(["a", "b", "z"]) == {"a": 1, "b": {"x": [1, 2]}}
    a = await reader.get_entry("a")
    assert a is not None and (a.partition, a.version) == ("p", 3)


async def test_cached_copies_are_not_touched_by_an_export(
    stores: tuple[HybridStore, HybridStore],
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    writer, reader = stores
    await writer.set_many({"a": 1, "b": 2})
    client = aioredis.from_url(fleetmem_redis_server.url)
    try:
        pattern = f"fmh:{{{fleetmem_namespace}}}:k:*"
        before = sorted([k async for k in client.scan_iter(match=pattern)])
        exported = [e async for page in reader.kv.export_pages("", None, 10) for e in page]
        assert [e.key for e in exported] == ["a", "b"]
        assert sorted([k async for k in client.scan_iter(match=pattern)]) == before == []
    finally:
        await client.aclose()


async def test_server_time_is_the_durable_clock_also_without_redis(
    fleetmem_postgres_server: PostgresServer, fleetmem_namespace: str
) -> None:
    """The clock that judges expiry (an import's, a copy's verification) is PostgreSQL's; it
    needs no Redis."""
    dead = f"redis://127.0.0.1:{find_free_port()}/0"
    async with hybrid_of(fleetmem_postgres_server, dead, fleetmem_namespace) as store:
        kv = store.kv
        assert isinstance(kv, HybridKV)
        before = await kv.durable.server_time()
        now = await kv.server_time()
        after = await kv.durable.server_time()
        assert now.tzinfo is timezone.utc
        assert before <= now <= after
