"""PostgreSQL: fleetmem against asyncpg (and LangGraph's ``AsyncPostgresStore``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import orjson

from .timing import TickMerger
from .workloads import (
    NAMESPACE_ENTRIES,
    VALUE,
    Bench,
    Op0,
    Op1,
    clear_namespaces,
    fill_namespaces,
    namespace_names,
)


async def bench_postgres(bench: Bench, dsn: str) -> None:
    import asyncpg

    from fleetmem.backends.postgres import PostgresStore

    async def init(conn: Any) -> None:
        await conn.set_type_codec(
            "jsonb",
            encoder=lambda v: b"\x01" + orjson.dumps(v),
            decoder=lambda b: orjson.loads(b[1:]),
            schema="pg_catalog",
            format="binary",
        )

    async def no_reset(conn: Any) -> None:
        """The baseline leaves no session state: skip asyncpg's reset round trip on release."""

    pool = await asyncpg.create_pool(dsn, min_size=10, max_size=10, init=init, reset=no_reset)
    store = await PostgresStore.from_url(dsn, namespace="bench").connect()
    lg = await langgraph_peer(bench, dsn) if bench.peers else None
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                'CREATE TABLE IF NOT EXISTS bench_raw (key text COLLATE "C" PRIMARY KEY, '
                "value jsonb NOT NULL)"
            )
            await conn.execute("TRUNCATE bench_raw")
        await store.clear()
        keys = [f"k{i:06d}" for i in range(10_000)]
        await store.set_many(dict.fromkeys(keys, VALUE))
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO bench_raw(key, value) VALUES($1, $2)", [(k, VALUE) for k in keys]
            )
        if lg is not None:
            await lg.put_many(keys)
        upsert = (
            "INSERT INTO bench_raw(key, value) VALUES($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
        )
        # Single awaited calls: the raw side runs on the connection the store's lone calls use
        # (no pool bookkeeping), so both talk to the same server process. On a 2-vCPU VM two
        # connections' round trips differ by up to 2x, by where their backends get scheduled.
        await store.get(keys[0])
        conn1 = store.kv.connector.lone_connection()
        if conn1 is None:  # pragma: no cover - a store from a URL has its own pool
            raise RuntimeError("the store has no connection of its own to share")
        # It carries the store's jsonb codec: the raw side encodes with orjson itself, and its
        # reads decode with the store's decoder (~0.3 us a row more than a bare orjson.loads).

        async def raw_get(i: int) -> Any:
            return await conn1.fetchval(
                "SELECT value FROM bench_raw WHERE key = $1", keys[i % 10000]
            )

        async def fm_get(i: int) -> Any:
            return await store.get(keys[i % 10000])

        async def raw_set(i: int) -> Any:
            return await conn1.execute(upsert, keys[i % 10000], orjson.dumps(VALUE))

        async def fm_set(i: int) -> Any:
            return await store.set(keys[i % 10000], VALUE)

        gets: dict[str, Op1] = {"raw": raw_get, "fleetmem": fm_get}
        sets: dict[str, Op1] = {"raw": raw_set, "fleetmem": fm_set}
        if lg is not None:
            gets["langgraph"] = lambda i: lg.get(keys[i % 10000])
            sets["langgraph"] = lambda i: lg.put(keys[i % 10000])
        await bench.single("postgres get", gets)
        await bench.single("postgres set", sets)

        # Batches of 10,000: the best raw methods (COPY + upsert; = ANY).
        batch_keys = [f"b{i:06d}" for i in range(10_000)]
        items = dict.fromkeys(batch_keys, VALUE)

        async def raw_set_many() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    'CREATE TEMP TABLE IF NOT EXISTS bench_in (key text COLLATE "C", '
                    "value jsonb) ON COMMIT DELETE ROWS"
                )
                await conn.copy_records_to_table(
                    "bench_in", records=[(k, VALUE) for k in batch_keys]
                )
                await conn.execute(
                    "INSERT INTO bench_raw SELECT key, value FROM bench_in "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
                )

        async def fm_set_many() -> None:
            await store.set_many(items)

        async def raw_get_many() -> None:
            rows = await pool.fetch(
                "SELECT key, value FROM bench_raw WHERE key = ANY($1::text[])", batch_keys
            )
            assert len(rows) == len(batch_keys)

        async def fm_get_many() -> None:
            got = await store.get_many(batch_keys)
            assert len(got) == len(batch_keys)

        set_manys: dict[str, Op0] = {
            "raw": raw_set_many,
            "fleetmem": fm_set_many,
        }
        get_manys: dict[str, Op0] = {
            "raw": raw_get_many,
            "fleetmem": fm_get_many,
        }
        if lg is not None:

            async def lg_get_many() -> None:
                assert await lg.get_many(batch_keys) == len(batch_keys)

            set_manys["langgraph"] = lambda: lg.put_many(batch_keys)
            get_manys["langgraph"] = lg_get_many
        await bench.batch("postgres set_many 10k", set_manys, 10_000)
        await bench.batch("postgres get_many 10k", get_manys, 10_000)

        # 64 coroutines: raw one-call-per-op, raw merged per tick, fleetmem.
        async def flush_get(batch: list[str]) -> list[Any]:
            rows = await pool.fetch(
                "SELECT key, value FROM bench_raw WHERE key = ANY($1::text[])", list(set(batch))
            )
            found = {r["key"]: r["value"] for r in rows}
            return [found.get(k) for k in batch]

        merged_get = TickMerger(flush_get)

        async def flush_set(batch: list[tuple[str, Any]]) -> list[Any]:
            # Each call's own value, serialized per call, as fleetmem does.
            latest = dict(batch)
            await pool.execute(
                "INSERT INTO bench_raw(key, value) SELECT k, v "
                "FROM unnest($1::text[], $2::jsonb[]) AS t(k, v) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                list(latest),
                list(latest.values()),
            )
            return [None] * len(batch)

        merged_set = TickMerger(flush_set)
        loads: dict[str, tuple[Op1, Op1]] = {
            "raw": (
                lambda k: pool.fetchval("SELECT value FROM bench_raw WHERE key = $1", keys[k]),
                lambda k: pool.execute(upsert, keys[k], VALUE),
            ),
            "raw-merged": (
                lambda k: merged_get.submit(keys[k]),
                lambda k: merged_set.submit((keys[k], VALUE)),
            ),
            "fleetmem": (lambda k: store.get(keys[k]), lambda k: store.set(keys[k], VALUE)),
        }
        if lg is not None:
            loads["langgraph"] = (lambda k: lg.get(keys[k]), lambda k: lg.put(keys[k]))
        await bench.loads("postgres", loads)
        await bench_namespaces(bench, store, conn1, lg)
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        with contextlib.suppress(Exception):
            await clear_namespaces(store)
        if lg is not None:
            await lg.close()
        await store.close()
        await pool.close()


async def bench_namespaces(bench: Bench, store: Any, conn: Any, lg: _LangGraph | None) -> None:
    """``namespaces(limit=100)`` over 1,000 small namespaces (and the bench's big one):
    fleetmem's loose index scan against the ``SELECT DISTINCT`` a user would write on the same
    table, on the same connection; LangGraph's ``alist_namespaces(limit=100)`` as the peer, on
    its own table holding the same namespaces."""
    connector = store.kv.connector
    await fill_namespaces(store)
    if lg is not None:
        await lg.put_namespaces(namespace_names())
    table = f"{connector.schema}.{connector.table}"  # the store's own table
    distinct = f"SELECT DISTINCT namespace FROM {table} ORDER BY 1 LIMIT 100"

    async def raw_op(i: int) -> Any:
        rows = await conn.fetch(distinct)
        assert len(rows) == 100

    async def fm_op(i: int) -> Any:
        assert len(await store.namespaces(limit=100)) == 100

    subjects: dict[str, Op1] = {"raw": raw_op, "fleetmem": fm_op}
    if lg is not None:

        async def lg_op(i: int) -> Any:
            assert len(await lg.store.alist_namespaces(limit=100)) == 100

        subjects["langgraph"] = lg_op
    await bench.single(
        "postgres namespaces(limit=100)", subjects, calls=bench.sizes.namespaces_calls
    )


@dataclass
class _LangGraph:
    """LangGraph's ``AsyncPostgresStore`` on the bench's workloads (namespace ``("bench",)``)."""

    store: Any
    pool: Any

    async def get(self, key: str) -> Any:
        return await self.store.aget(("bench",), key)

    async def put(self, key: str) -> None:
        await self.store.aput(("bench",), key, VALUE)

    async def put_many(self, keys: list[str]) -> None:
        from langgraph.store.base import PutOp

        await self.store.abatch([PutOp(("bench",), key, VALUE) for key in keys])

    async def get_many(self, keys: list[str]) -> int:
        from langgraph.store.base import GetOp

        items = await self.store.abatch([GetOp(("bench",), key) for key in keys])
        return sum(item is not None for item in items)

    async def put_namespaces(self, names: list[str]) -> None:
        from langgraph.store.base import PutOp

        await self.store.abatch(
            [PutOp((name,), f"item-{j}", VALUE) for name in names for j in range(NAMESPACE_ENTRIES)]
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM store WHERE prefix = 'bench' OR prefix LIKE 'bench-ns-%'"
                )
        await self.pool.close()


async def langgraph_peer(bench: Bench, dsn: str) -> _LangGraph | None:
    try:
        from langgraph.store.postgres import AsyncPostgresStore
        from psycopg_pool import AsyncConnectionPool
    except ImportError:
        bench.report.notes.append("LangGraph store not installed: pip install 'fleetmem[bench]'")
        return None
    from psycopg.rows import dict_row

    pool: Any = AsyncConnectionPool(
        dsn,
        min_size=10,
        max_size=10,
        open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    await pool.open()
    store = AsyncPostgresStore(pool)
    await store.setup()
    return _LangGraph(store, pool)
