"""PostgresStore's batch hooks and the merging of concurrent calls, against a real server.

Each batch statement must do exactly what the single-key statement does, op by op: the tests
apply the same operations through ``_set`` (one statement each) in one namespace and through
``_set_batch`` (one statement) in another, and compare every entry.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetmem import Entry

pytestmark = pytest.mark.postgres

pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore  # noqa: E402
from fleetmem.backends.seam import EntryMeta, SetOp  # noqa: E402


def _meta(entry: Entry | EntryMeta | BaseException | None) -> tuple[Any, ...]:
    """What must agree between two namespaces (timestamps are compared as 'set or not')."""
    assert entry is not None and not isinstance(entry, BaseException)
    return (entry.partition, entry.version, entry.expires_at is not None)


async def _prepare(store: PostgresStore) -> None:
    # Live persistent, live with ttl, live in a partition, and expired entries.
    await store.set("live", 1)
    await store.set("live-ttl", 1, ttl=300)
    await store.set("live-ttl", 2, ttl=300)
    await store.set("in-part", 1, partition="p1")
    await store.set("expired", 1, ttl=0.05, partition="old")
    await store.set("expired-keep", 1, ttl=0.05)


OPS = [
    SetOp("new", b'{"a":1}', None, None, False),
    SetOp("new-ttl", b"2", 60_000, None, False),
    SetOp("new-part", b"3", None, "p2", False),
    SetOp("new-keep", b"4", None, None, True),
    SetOp("live", b"5", None, None, False),
    SetOp("live-ttl", b"6", None, None, True),  # keeps its expiry
    SetOp("in-part", b"7", None, None, False),  # keeps its partition
    SetOp("expired", b"8", None, None, False),  # recreated: version 1, default partition
    SetOp("expired-keep", b"9", None, "p3", True),  # nothing to keep: persistent
]


async def _both_ways(
    single: PostgresStore, batch: PostgresStore, ops: list[SetOp]
) -> list[EntryMeta | BaseException]:
    """Apply ``ops`` to two namespaces prepared alike, one by one and as one batch; check that
    they answer and end alike; return the batch's answers."""
    await _prepare(single)
    await _prepare(batch)
    await asyncio.sleep(0.1)
    one_by_one = [
        await single.kv.set(op.key, op.payload, op.ttl_ms, op.partition, op.keep_ttl) for op in ops
    ]
    batched = await batch.kv.set_batch(ops)
    assert [_meta(m) for m in batched] == [_meta(m) for m in one_by_one]
    for op in ops:
        a, b = await single.get_entry(op.key), await batch.get_entry(op.key)
        assert a is not None and b is not None
        assert (a.value, *_meta(a)) == (b.value, *_meta(b)), op.key
    return batched


async def test_set_batch_matches_set_op_by_op(fleetmem_postgres_database: str) -> None:
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="single") as single:
        batch = single.with_namespace("batch")
        batched = await _both_ways(single, batch, OPS)
        assert _meta(batched[7]) == ("default", 1, False)
        assert _meta(batched[5]) == ("default", 3, True)
        assert _meta(batched[6]) == ("p1", 2, False)
        assert _meta(batched[8]) == ("p3", 1, False)
        created = await batch.get_entry("live-ttl")
        assert created is not None and created.created_at < created.updated_at
        # A second batch bumps every version again.
        again = await batch.kv.set_batch(OPS)
        assert [m.version for m in again if isinstance(m, EntryMeta)] == [
            m.version + 1 for m in batched if isinstance(m, EntryMeta)
        ]
        await single.clear()
        await batch.clear()


#: Calls with no ttl, partition or keep_ttl: the batch takes the two-array statement.
PLAIN_OPS = [
    SetOp("new", b'{"a":1}', None, None, False),
    SetOp("live", b"5", None, None, False),
    SetOp("live-ttl", b"6", None, None, False),  # a plain set makes it persistent
    SetOp("in-part", b"7", None, None, False),  # keeps its partition
    SetOp("expired", b"8", None, None, False),  # recreated: version 1, default partition
    SetOp("expired-keep", b"9", None, None, False),
]


async def test_plain_set_batch_matches_set_op_by_op(fleetmem_postgres_database: str) -> None:
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="single") as single:
        batch = single.with_namespace("batch")
        batched = await _both_ways(single, batch, PLAIN_OPS)
        assert [_meta(m) for m in batched] == [
            ("default", 1, False),
            ("default", 2, False),
            ("default", 3, False),
            ("p1", 2, False),
            ("default", 1, False),
            ("default", 1, False),
        ]
        await single.clear()
        await batch.clear()


async def test_delete_and_read_batches(fleetmem_postgres_database: str) -> None:
    async with PostgresStore.from_url(fleetmem_postgres_database, namespace="del") as store:
        other = store.with_namespace("del-other")
        await store.set("a", 1, partition="p")
        await store.set("b", [2])
        await store.set("gone", 3, ttl=0.05)
        await other.set("a", "other")
        await asyncio.sleep(0.1)
        keys = ["a", "b", "gone", "missing"]
        entries = await store.kv.get_entries(keys)
        assert sorted(entries) == ["a", "b"]
        assert (entries["a"].value, entries["a"].partition, entries["a"].version) == (1, "p", 1)
        assert await store.kv.exists_batch(keys) == [True, True, False, False]
        assert await store.kv.get_batch(keys) == [1, [2], *[store_missing()] * 2]
        assert await store.kv.delete_batch(keys) == [True, True, False, False]
        assert await store.kv.delete_batch(keys) == [False] * 4
        assert await other.get("a") == "other"  # another namespace is untouched
        await other.clear()


def store_missing() -> Any:
    from fleetmem.backends.seam import MISSING

    return MISSING


async def test_concurrent_calls_are_merged_and_each_gets_its_own_result(
    fleetmem_postgres_database: str,
) -> None:
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace="merge", max_size=4
    ) as store:
        assert store.coalescing
        n = 200
        entries = await asyncio.gather(
            *(store.set(f"k{i}", {"i": i}, partition=f"p{i % 3}") for i in range(n))
        )
        assert [(e.key, e.value, e.version, e.partition) for e in entries] == [
            (f"k{i}", {"i": i}, 1, f"p{i % 3}") for i in range(n)
        ]
        # The same key many times in one burst: never twice in one batch, each write counted.
        twice = await asyncio.gather(*(store.set("k0", i) for i in range(20)))
        assert sorted(e.version for e in twice) == list(range(2, 22))
        last = max(twice, key=lambda e: e.version)
        assert await store.get("k0") == last.value
        await store.set("k0", {"i": 0})
        values = await asyncio.gather(*(store.get(f"k{i}") for i in range(1, n)))
        assert values == [{"i": i} for i in range(1, n)]
        got = await asyncio.gather(*(store.get_entry(f"k{i}") for i in range(n)))
        assert [g.partition if g else None for g in got] == [f"p{i % 3}" for i in range(n)]
        exists = await asyncio.gather(*(store.exists(f"k{i}") for i in range(n + 10)))
        assert exists == [True] * n + [False] * 10
        deleted = await asyncio.gather(*(store.delete(f"k{i}") for i in range(n + 10)))
        assert deleted == [True] * n + [False] * 10
        counters = [store._c_get, store._c_entry, store._c_exists, store._c_set, store._c_delete]
        assert all(c is not None and c.batches > 0 for c in counters)
        assert (await store.stats()).keys == 0


async def test_a_failed_batch_reaches_every_caller_as_a_fleetmem_error(
    fleetmem_postgres_database: str,
) -> None:
    from fleetmem import BackendUnavailableError

    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace="fail", max_size=2, command_timeout=0.5
    ) as store:
        # Hold every row lock of the keys in another session so the batch times out.
        import asyncpg

        conn = await asyncpg.connect(fleetmem_postgres_database)
        try:
            await store.set_many({f"k{i}": i for i in range(20)})
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM fleetmem.entries WHERE namespace = 'fail' FOR UPDATE"
                )
                results = await asyncio.gather(
                    *(store.set(f"k{i}", -i) for i in range(20)), return_exceptions=True
                )
        finally:
            await conn.close()
        assert all(isinstance(r, BackendUnavailableError) for r in results), results
        assert store._c_set is not None and store._c_set.batches > 0
        # The store works again afterwards.
        assert (await store.set("k1", 1)).value == 1
        await store.clear()
