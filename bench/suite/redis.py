"""Redis: fleetmem against redis-py (and aiocache, cashews), and memory per entry."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from .results import Measurement
from .timing import TickMerger, alternate
from .workloads import (
    NAMESPACE_ENTRIES,
    VALUE,
    VALUE_BYTES,
    Bench,
    Op0,
    Op1,
    chunked,
    clear_namespaces,
    fill_namespaces,
    namespace_names,
)


async def bench_redis(bench: Bench, url: str) -> None:
    import redis.asyncio as aioredis

    from fleetmem.backends.redis import RedisStore

    raw = aioredis.from_url(url)
    store = await RedisStore.from_url(url, namespace="bench").connect()
    peers = await _redis_peers(bench, url) if bench.peers else {}
    try:
        await store.clear()
        keys = [f"k{i:06d}" for i in range(10_000)]
        await store.set_many(dict.fromkeys(keys, VALUE))
        await raw.mset({f"raw:{k}": VALUE_BYTES for k in keys})
        for peer in peers.values():
            await peer.set_many(dict.fromkeys(keys, VALUE))

        async def raw_get(i: int) -> Any:
            data = await raw.get(f"raw:{keys[i % 10000]}")
            assert data is not None
            return orjson.loads(data)

        async def fm_get(i: int) -> Any:
            return await store.get(keys[i % 10000])

        async def raw_set(i: int) -> Any:
            return await raw.set(f"raw:{keys[i % 10000]}", orjson.dumps(VALUE))

        async def fm_set(i: int) -> Any:
            return await store.set(keys[i % 10000], VALUE)

        gets: dict[str, Op1] = {"raw": raw_get, "fleetmem": fm_get}
        sets: dict[str, Op1] = {"raw": raw_set, "fleetmem": fm_set}

        def peer_single(peer: _RedisPeer) -> tuple[Op1, Op1]:
            return (lambda i: peer.get(keys[i % 10000]), lambda i: peer.put(keys[i % 10000], VALUE))

        for name, peer in peers.items():
            gets[name], sets[name] = peer_single(peer)
        await bench.single("redis get", gets)
        await bench.single("redis set", sets)

        batch_keys = [f"b{i:06d}" for i in range(10_000)]
        items = dict.fromkeys(batch_keys, VALUE)
        raw_keys = [f"raw:{k}" for k in batch_keys]

        async def raw_mset() -> None:
            await raw.mset({k: orjson.dumps(VALUE) for k in raw_keys})

        async def fm_set_many() -> None:
            await store.set_many(items)

        async def raw_mget() -> None:
            values = await raw.mget(raw_keys)
            out = [orjson.loads(v) for v in values if v is not None]
            assert len(out) == len(raw_keys)

        async def fm_get_many() -> None:
            got = await store.get_many(batch_keys)
            assert len(got) == len(batch_keys)

        set_manys: dict[str, Op0] = {
            "raw": raw_mset,
            "fleetmem": fm_set_many,
        }
        get_manys: dict[str, Op0] = {
            "raw": raw_mget,
            "fleetmem": fm_get_many,
        }

        def peer_batch(peer: _RedisPeer) -> tuple[Op0, Op0]:
            async def get_many() -> None:
                assert await peer.get_many(batch_keys) == len(batch_keys)

            return (lambda: peer.set_many(items)), get_many

        for name, peer in peers.items():
            set_manys[name], get_manys[name] = peer_batch(peer)
        await bench.batch("redis set_many 10k", set_manys, 10_000)
        await bench.batch("redis get_many 10k", get_manys, 10_000)

        async def flush_get(batch: list[str]) -> list[Any]:
            values = await raw.mget(batch)
            return [None if v is None else orjson.loads(v) for v in values]

        merged = TickMerger(flush_get)

        async def flush_set(batch: list[tuple[str, Any]]) -> list[Any]:
            # Each call's own value, serialized per call, as fleetmem does.
            await raw.mset({k: orjson.dumps(v) for k, v in batch})
            return [None] * len(batch)

        merged_set = TickMerger(flush_set)
        loads: dict[str, tuple[Op1, Op1]] = {
            "raw": (
                lambda k: raw.get(f"raw:{keys[k]}"),
                lambda k: raw.set(f"raw:{keys[k]}", orjson.dumps(VALUE)),
            ),
            "raw-merged": (
                lambda k: merged.submit(f"raw:{keys[k]}"),
                lambda k: merged_set.submit((f"raw:{keys[k]}", VALUE)),
            ),
            "fleetmem": (lambda k: store.get(keys[k]), lambda k: store.set(keys[k], VALUE)),
        }

        def peer_load(peer: _RedisPeer) -> tuple[Op1, Op1]:
            return (lambda k: peer.get(keys[k]), lambda k: peer.put(keys[k], VALUE))

        for name, peer in peers.items():
            loads[name] = peer_load(peer)
        await bench.loads("redis", loads)
        await bench_namespaces(bench, raw, store)
        await bench_sync_get(bench, url, raw, store, keys)
    finally:
        with contextlib.suppress(Exception):
            await store.clear()
        with contextlib.suppress(Exception):
            await clear_namespaces(store)
        with contextlib.suppress(Exception):
            for chunk in chunked(raw_namespace_keys(), 5000):
                await raw.delete(*chunk)
        for peer in peers.values():
            with contextlib.suppress(Exception):
                await peer.close()
        with contextlib.suppress(Exception):
            for chunk in chunked(
                [f"raw:k{i:06d}" for i in range(10_000)] + [f"raw:b{i:06d}" for i in range(10_000)],
                5000,
            ):
                await raw.delete(*chunk)
        await store.close()
        await raw.aclose()


def raw_namespace_keys() -> list[str]:
    """The raw side's keys of the ``namespaces()`` workload: ``rawns:<namespace>:<key>``."""
    return [f"rawns:{n}:item-{j}" for n in namespace_names() for j in range(NAMESPACE_ENTRIES)]


async def bench_namespaces(bench: Bench, raw: Any, store: Any) -> None:
    """``namespaces(limit=100)`` over 1,000 small namespaces (and the bench's big one):
    fleetmem's registry sorted set (a liveness check per name) against what a user without a
    registry writes, a ``SCAN MATCH rawns:*`` of the whole keyspace keeping the names seen,
    sorted, the first 100. aiocache and cashews have no call that lists namespaces."""
    await fill_namespaces(store)
    await raw.mset(dict.fromkeys(raw_namespace_keys(), VALUE_BYTES))

    async def raw_op(i: int) -> Any:
        names = {key.split(b":", 2)[1] async for key in raw.scan_iter(b"rawns:*", count=1000)}
        assert len(sorted(names)[:100]) == 100

    async def fm_op(i: int) -> Any:
        assert len(await store.namespaces(limit=100)) == 100

    await bench.single(
        "redis namespaces(limit=100)",
        {"raw": raw_op, "fleetmem": fm_op},
        calls=bench.sizes.namespaces_calls,
    )


async def bench_sync_get(bench: Bench, url: str, raw: Any, store: Any, keys: list[str]) -> None:
    """A single ``get`` through the blocking facade ``fleetmem.sync`` (subject ``fleetmem``),
    against the async store's (``async``) and redis-py's (``raw``), interleaved. The facade's
    store runs on its own loop thread: each call is a hop to that thread and back."""
    import fleetmem.sync

    sync_store = fleetmem.sync.open_store(url, namespace="bench")
    try:

        async def sync_get(i: int) -> Any:
            return sync_store.get(keys[i % 10000])

        async def async_get(i: int) -> Any:
            return await store.get(keys[i % 10000])

        async def raw_get(i: int) -> Any:
            data = await raw.get(f"raw:{keys[i % 10000]}")
            assert data is not None
            return orjson.loads(data)

        await bench.single(
            "redis get via fleetmem.sync",
            {"raw": raw_get, "fleetmem": sync_get, "async": async_get},
            paired=False,
        )
    finally:
        sync_store.close()


async def redis_memory(bench: Bench, raw: Any, store: Any) -> None:
    """Bytes per entry: fleetmem's whole footprint vs a plain ``SET key json``.

    Measured as the change of ``used_memory`` over 20,000 entries, alternating the two,
    ``repetitions`` times (allocator size classes make single figures drift a few percent).
    """
    bench.progress.step("redis bytes per entry")
    n = 20_000
    ns = store.with_namespace("bench-memory")
    values = [{**VALUE, "step": i} for i in range(n)]
    plain_keys = [f"plain:{i:06d}" for i in range(n)]

    async def used() -> int:
        info = await raw.info("memory")
        return int(info["used_memory"])

    async def plain() -> float:
        before = await used()
        await raw.mset({k: orjson.dumps(v) for k, v in zip(plain_keys, values, strict=True)})
        per_entry = (await used() - before) / n
        for chunk in chunked(plain_keys, 5000):
            await raw.delete(*chunk)
        return per_entry

    async def fleet() -> float:
        await ns.clear()
        before = await used()
        await ns.set_many({f"{i:06d}": v for i, v in enumerate(values)})
        per_entry = (await used() - before) / n
        await ns.clear()
        return per_entry

    results = await alternate(bench.reps, {"raw": plain, "fleetmem": fleet})
    for subject, figures in results.items():
        bench.report.add(Measurement("redis bytes per entry", subject, "bytes", figures))


@contextlib.contextmanager
def _peer_deprecations() -> Iterator[None]:
    """The peers close their clients through redis-py's deprecated ``close()``; a warning
    turned into an error (``-W error``) would stop them half way, connections left open."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@dataclass
class _RedisPeer:
    """A peer cache on the bench's Redis workloads: single get/set and its batch calls."""

    get: Callable[[str], Awaitable[Any]]
    put: Callable[[str, Any], Awaitable[Any]]
    get_many: Callable[[list[str]], Awaitable[int]]  # how many keys were found
    set_many: Callable[[dict[str, Any]], Awaitable[Any]]
    close: Callable[[], Awaitable[None]]


async def _redis_peers(bench: Bench, url: str) -> dict[str, _RedisPeer]:
    peers: dict[str, _RedisPeer] = {}
    try:
        from aiocache import RedisCache
        from aiocache.serializers import JsonSerializer
    except ImportError:
        bench.report.notes.append("aiocache not installed: pip install 'fleetmem[bench]'")
    else:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        cache = RedisCache(
            endpoint=parts.hostname,
            port=parts.port or 6379,
            namespace="aio",
            serializer=JsonSerializer(),
        )

        async def aio_get_many(keys: list[str]) -> int:
            return sum(v is not None for v in await cache.multi_get(keys))

        async def aio_close() -> None:
            with contextlib.suppress(Exception):
                await cache.clear(namespace="aio")
            with _peer_deprecations():
                await cache.close()

        peers["aiocache"] = _RedisPeer(
            cache.get,
            lambda k, v: cache.set(k, v),
            aio_get_many,
            lambda items: cache.multi_set(list(items.items())),
            aio_close,
        )
    try:
        from cashews import Cache
    except ImportError:
        bench.report.notes.append("cashews not installed: pip install 'fleetmem[bench]'")
    else:
        cashews = Cache()
        cashews.setup(url, client_side=False)

        async def cw_get_many(keys: list[str]) -> int:
            found = await cashews.get_many(*[f"cw:{k}" for k in keys])
            return sum(v is not None for v in found)

        async def cashews_close() -> None:
            with contextlib.suppress(Exception):
                await cashews.delete_match("cw:*")
            with _peer_deprecations():
                await cashews.close()

        peers["cashews"] = _RedisPeer(
            lambda k: cashews.get(f"cw:{k}"),
            lambda k, v: cashews.set(f"cw:{k}", v),
            cw_get_many,
            lambda items: cashews.set_many({f"cw:{k}": v for k, v in items.items()}),
            cashews_close,
        )
    return peers
