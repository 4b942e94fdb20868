"""RedisStore on a full Redis (``maxmemory`` under ``noeviction``) and on evicting policies.

A full store must stay readable and deletable (every read path answers, every delete frees
memory, writes work again once memory is free), a write that would add data is refused with
``BackendUnavailableError`` and changes nothing, and ``connect()`` refuses a server whose
eviction policy may drop fleetmem's keys unless ``allow_eviction=True``.

Every server here is started by the harness (``fleetmem_redis_factory``) or is the harness's
Cluster, whose settings are restored; the machine's own Redis is never touched. Numbers are
printed (``pytest -s``) for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleetmem import (
    BackendUnavailableError,
    ConfigurationError,
    KeyNotFoundError,
    OutcomeUnknownError,
)
from fleetmem.backends.redis import RedisStore

pytestmark = [pytest.mark.redis, pytest.mark.slow]

aioredis = pytest.importorskip("redis.asyncio")

MAXMEMORY = 4 * 1024 * 1024
#: Once the first write was refused, maxmemory is lowered this far below the memory in use: the
#: refused command's buffers, freed with it, and the few index members the reads drop cannot
#: lift the server out of its full state.
MARGIN = 256 * 1024
#: Generous: big keys() / clear() calls on a loaded 2-core machine.
DEADLINE = 10.0
PARTITIONS = ("p0", "p1", "p2", "p3")
EVICTING = (
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)


def _value(i: int) -> dict[str, Any]:
    return {"i": i, "text": f"entry {i} " + "x" * 120, "tags": ["a", "b"]}


def _key(i: int) -> str:
    return f"k/{i:06d}"


async def _memory(admin: Any) -> tuple[int, int]:
    info = await admin.info("memory")
    return int(info["used_memory"]), int(info["maxmemory"])


async def _assert_full(admin: Any) -> None:
    used, limit = await _memory(admin)
    assert limit and used > limit, f"not full: used {used} <= maxmemory {limit}"


async def _hold_full(admin: Any, margin: int = MARGIN) -> None:
    """Lower maxmemory below the memory in use: the server stays full until margin is freed."""
    used, _ = await _memory(admin)
    await admin.config_set("maxmemory", str(used - margin))
    await _assert_full(admin)


async def _refused(call: Callable[[], Any]) -> BackendUnavailableError:
    with pytest.raises(BackendUnavailableError) as info:
        await call()
    assert not isinstance(info.value, OutcomeUnknownError), "a refused write was not applied"
    assert "full" in str(info.value) and "maxmemory" in str(info.value)
    return info.value


async def _fill(store: RedisStore, chunk: int = 200) -> dict[str, tuple[Any, str]]:
    """set_many until Redis refuses: key -> (value, partition) of every acknowledged entry."""
    written: dict[str, tuple[Any, str]] = {}
    n = 0
    while True:
        part = PARTITIONS[(n // chunk) % len(PARTITIONS)]
        items = {_key(i): _value(i) for i in range(n, n + chunk)}
        try:
            assert await store.set_many(items, partition=part) == chunk
        except BackendUnavailableError as exc:
            assert not isinstance(exc, OutcomeUnknownError)
            assert "full" in str(exc)
            return written
        written.update({k: (v, part) for k, v in items.items()})
        n += chunk
        assert n < 200_000, "maxmemory never reached"


async def _expired_entries(store: RedisStore, count: int) -> list[str]:
    """``count`` entries with a 1 s TTL, in partition "short", returned once all expired."""
    keys = [f"short/{i:03d}" for i in range(count)]
    await store.set_many({k: i for i, k in enumerate(keys)}, ttl=1, partition="short")
    deadline = time.monotonic() + 30
    while await store.get_many(keys):  # the server's clock decides
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    return keys


@pytest.fixture
def server(fleetmem_redis_factory: Callable[..., Any]) -> Any:
    return fleetmem_redis_factory(
        extra_args=["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]
    )


@pytest.fixture
async def admin(server: Any) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(server: Any) -> AsyncIterator[RedisStore]:
    created = await RedisStore.from_url(server.url, namespace="full", timeout=DEADLINE).connect()
    try:
        yield created
    finally:
        await created.close()


async def _check_reads(
    store: RedisStore, written: dict[str, tuple[Any, str]], expired: list[str]
) -> int:
    """Every read path on the full store; returns how many calls answered."""
    keys = sorted(written)
    by_part = {p: sorted(k for k, (_, part) in written.items() if part == p) for p in PARTITIONS}
    calls = 0
    for key in (keys[0], keys[len(keys) // 2], keys[-1]):
        value, part = written[key]
        assert await store.get(key) == value
        entry = await store.get_entry(key)
        assert entry is not None
        assert (entry.value, entry.partition, entry.version, entry.expires_at) == (
            value,
            part,
            1,
            None,
        )
        assert await store.exists(key) is True
        assert await store.ttl(key) is None
        calls += 4
    for key in (expired[0], "missing"):
        assert await store.get(key, "none") == "none"
        assert await store.get_entry(key) is None
        assert await store.exists(key) is False
        with pytest.raises(KeyNotFoundError):
            await store.ttl(key)
        calls += 4
    sample = [*keys[:1000], *expired[:10], "missing"]
    assert await store.get_many(sample) == {k: written[k][0] for k in keys[:1000]}
    calls += 1
    # Concurrent single-key calls are merged into MGET / script batches.
    merged = keys[:64]
    values, entries, flags = await asyncio.gather(
        asyncio.gather(*(store.get(k) for k in merged)),
        asyncio.gather(*(store.get_entry(k) for k in merged)),
        asyncio.gather(*(store.exists(k) for k in merged)),
    )
    assert values == [written[k][0] for k in merged]
    assert [e.value if e else None for e in entries] == values
    assert flags == [True] * 64
    calls += 3 * 64
    assert await store.keys() == keys  # also drops the expired entries' index members
    assert await store.keys(partition="p1") == by_part["p1"]
    assert await store.keys("k/0001", limit=5, after="k/000103") == keys[104:109]
    assert await store.keys("short/") == []
    calls += 4
    hits = await store.search("k/00012?")
    assert hits == {k: written[k][0] for k in keys[120:130]}
    assert await store.search("short/*") == {}
    assert await store.search("k/*", partition="p2", limit=3) == {
        k: written[k][0] for k in by_part["p2"][:3]
    }
    calls += 3
    assert await store.partitions() == list(PARTITIONS)
    stats = await store.stats()
    assert stats.keys == len(written)
    assert stats.partitions == {p: len(ks) for p, ks in by_part.items()}
    assert stats.expired_pending == len(expired)
    calls += 2
    return calls


async def test_a_full_store_stays_readable_and_can_be_emptied(
    store: RedisStore, admin: Any
) -> None:
    expired = await _expired_entries(store, 40)
    baseline, _ = await _memory(admin)
    written = await _fill(store)
    full_at, _ = await _memory(admin)
    assert len(written) > 1000
    # The refused command's own buffers are freed with it: hold the server full from here.
    await _hold_full(admin)

    # Writes that would add data are refused whole; nothing changes.
    first = _key(0)
    for call in (
        lambda: store.set("new", 1),
        lambda: store.set(first, "changed"),
        lambda: store.set_many({"new": 1, first: 2}),
        lambda: store.set_if_absent("new", 1),
        lambda: store.compare_and_set(first, "changed", version=1),
        lambda: store.incr("counter"),
        lambda: store.expire(first, 60),
    ):
        await _refused(call)
    assert (await store.get_entry(first)) is not None
    assert (await store.get_entry(first)).version == 1  # type: ignore[union-attr]
    assert await store.exists("new") is False

    reads = await _check_reads(store, written, expired)
    await _assert_full(admin)  # every read above ran on a full server

    # Deletes work and free memory.
    keys = sorted(written)
    before_deletes, _ = await _memory(admin)
    assert await store.delete(keys[0]) is True
    assert await store.delete("missing") is False
    assert await store.delete_many(keys[1:501]) == 500
    merged = keys[501:565]
    assert await asyncio.gather(*(store.delete(k) for k in merged)) == [True] * 64
    deleted = 1 + 500 + 64
    gone = set(keys[:565])
    in_p1 = sum(1 for k, (_, p) in written.items() if p == "p1" and k not in gone)
    assert await store.clear_partition("p1") == in_p1
    assert await store.cleanup_expired() == len(expired)
    # Redis may free a deleted value in a background thread (lazy freeing of big objects such
    # as a partition's index): the memory falls within moments, on a busy machine a little later.
    deadline = time.monotonic() + 15
    while True:
        after_deletes, limit = await _memory(admin)
        if after_deletes < limit or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert after_deletes < limit, "deleting did not bring the server below maxmemory"

    # Writes work again.
    assert (await store.set("new", 1)).version == 1
    assert await store.incr("counter") == 1
    left = len(written) - deleted - in_p1
    assert (await store.stats()).keys == left + 2
    assert await store.clear() == left + 2
    assert await store.keys() == []
    cleared, _ = await _memory(admin)
    print(
        f"\nfull Redis (maxmemory {MAXMEMORY} B, noeviction): {len(written)} entries "
        f"written before the first refusal (used {full_at} B, empty {baseline} B); "
        f"7 kinds of write refused; {reads} reads answered while full; "
        f"{deleted} deleted one by one or in bulk, {in_p1} by clear_partition, "
        f"{len(expired)} expired cleaned up: {before_deletes - after_deletes} B freed; "
        f"writes accepted again; clear() of {left + 2}: {before_deletes - cleared} B freed "
        "in all"
    )


async def test_a_full_store_that_lost_its_function_library_still_reads_and_deletes(
    store: RedisStore, admin: Any
) -> None:
    """FUNCTION LOAD is refused at maxmemory: reads and deletes go out as scripts instead."""
    written = await _fill(store)
    await admin.execute_command("FUNCTION", "FLUSH")
    await _hold_full(admin)
    keys = sorted(written)
    entry = await store.get_entry(keys[0])
    assert entry is not None and entry.value == written[keys[0]][0]
    assert await store.keys() == keys
    assert (await store.stats()).keys == len(written)
    await _refused(lambda: store.set("new", 1))
    assert await store.delete_many(keys[: len(keys) // 2]) == len(keys) // 2
    assert (await store.set("new", 1)).version == 1
    libraries = await admin.execute_command("FUNCTION", "LIST")
    assert len(libraries) == 1, "the library is loaded again once memory is free"
    assert await store.clear() == len(keys) - len(keys) // 2 + 1


# -------------------------------------------------------------------- the eviction policy


@pytest.fixture(scope="module")
def policy_server(fleetmem_redis_factory: Callable[..., Any]) -> Any:
    return fleetmem_redis_factory(extra_args=["--maxmemory", "64mb"])


@pytest.fixture
async def policy_admin(policy_server: Any) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(policy_server.url)
    try:
        yield client
    finally:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()


@pytest.mark.parametrize("policy", EVICTING)
async def test_connect_refuses_a_policy_that_may_evict(
    policy: str, policy_server: Any, policy_admin: Any
) -> None:
    await policy_admin.config_set("maxmemory-policy", policy)
    store = RedisStore.from_url(policy_server.url, namespace="policy")
    try:
        with pytest.raises(ConfigurationError) as info:
            await store.connect()
        message = str(info.value)
        assert repr(policy) in message and "noeviction" in message
        assert "allow_eviction=True" in message
        # A store used without connect() meets the same refusal on every call.
        for _ in range(2):
            with pytest.raises(ConfigurationError):
                await store.set("k", 1)
    finally:
        await store.close()
    assert await policy_admin.exists("fm:{policy}:e:k") == 0

    allowed = await RedisStore.from_url(
        policy_server.url, namespace="policy", allow_eviction=True
    ).connect()
    try:
        assert (await allowed.set("k", 1)).version == 1
        assert await allowed.get("k") == 1
        assert await allowed.clear() == 1
    finally:
        await allowed.close()


async def test_connect_accepts_noeviction_and_checks_an_injected_client(
    policy_server: Any, policy_admin: Any
) -> None:
    async with RedisStore.from_url(policy_server.url, namespace="policy") as store:
        assert (await store.set("k", 1)).version == 1
        assert await store.delete("k") is True
    await policy_admin.config_set("maxmemory-policy", "volatile-lru")
    client = aioredis.Redis.from_url(policy_server.url)
    try:
        with pytest.raises(ConfigurationError, match="volatile-lru"):
            await RedisStore(client=client, namespace="policy").connect()
        injected = await RedisStore(
            client=client, namespace="policy", allow_eviction=True
        ).connect()
        assert await injected.get("k") is None
        await injected.close()
        assert await client.ping() is True  # an injected client is never closed by the store
    finally:
        await client.aclose()


async def test_the_policy_is_read_from_info_when_config_is_refused(
    fleetmem_redis_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    acl = ["~*", "&*", "+@all", "-config"]
    server = fleetmem_redis_factory(
        extra_args=[
            "--maxmemory-policy",
            "allkeys-lru",
            *("--user", "noconfig", "on", ">pw", *acl),
            *("--user", "noinfo", "on", ">pw", *acl, "-info"),
        ]
    )
    noconfig = server.url.replace("redis://", "redis://noconfig:pw@")
    with pytest.raises(ConfigurationError, match="allkeys-lru"):
        await RedisStore.from_url(noconfig, namespace="acl").connect()
    # Neither CONFIG nor INFO: the policy cannot be known; a loud warning, not a refusal.
    noinfo = server.url.replace("redis://", "redis://noinfo:pw@")
    with caplog.at_level(logging.WARNING, logger="fleetmem.redis"):
        async with RedisStore.from_url(noinfo, namespace="acl", cluster=False) as store:
            assert (await store.set("k", 1)).version == 1
            assert await store.clear() == 1
    assert any("could not read maxmemory-policy" in r.getMessage() for r in caplog.records)
    assert all("pw" not in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------- Redis Cluster


@pytest.fixture
async def cluster_admins(fleetmem_redis_cluster: Any) -> AsyncIterator[list[Any]]:
    """A client per node of the harness's Cluster; every setting a test changes is put back."""
    admins = [aioredis.Redis(host=h, port=p) for h, p in fleetmem_redis_cluster.nodes]
    try:
        yield admins
    finally:
        for admin in admins:
            await admin.config_set("maxmemory", "0")
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.aclose()


@pytest.mark.cluster
async def test_cluster_connect_checks_every_primary(
    fleetmem_redis_cluster: Any, cluster_admins: list[Any]
) -> None:
    last = cluster_admins[-1]
    await last.config_set("maxmemory-policy", "allkeys-lfu")
    try:
        with pytest.raises(ConfigurationError, match="allkeys-lfu") as info:
            await RedisStore.from_url(fleetmem_redis_cluster.url, namespace="cpolicy").connect()
        port = fleetmem_redis_cluster.nodes[-1][1]
        assert f":{port}" in str(info.value)  # names the primary
        allowed = await RedisStore.from_url(
            fleetmem_redis_cluster.url, namespace="cpolicy", allow_eviction=True
        ).connect()
        assert (await allowed.set("k", 1)).version == 1
        assert await allowed.clear() == 1
        await allowed.close()
    finally:
        await last.config_set("maxmemory-policy", "noeviction")


@pytest.mark.cluster
async def test_cluster_full_store_stays_readable_and_deletable(
    fleetmem_redis_cluster: Any, cluster_admins: list[Any]
) -> None:
    """On a Cluster the scripts go out as EVALSHA: their shebang flags do what the library's
    function flags do on a standalone server."""
    async with RedisStore.from_url(
        fleetmem_redis_cluster.url, namespace="cfull", timeout=DEADLINE
    ) as store:
        items = {_key(i): _value(i) for i in range(1500)}
        await store.set_many(items, partition="p0")
        await store.set("t", 1, ttl=60, partition="p1")
        node = store.client.get_node_from_key("fm:{cfull}:")
        admin = next(
            a
            for a, (h, p) in zip(cluster_admins, fleetmem_redis_cluster.nodes, strict=True)
            if (h, p) == (node.host, node.port)
        )
        try:
            await _hold_full(admin, 32 * 1024)
            await _refused(lambda: store.set("new", 1))
            await _refused(lambda: store.set_many({"new": 1}))
            keys = sorted(items)
            assert await store.get(keys[0]) == items[keys[0]]
            entry = await store.get_entry("t")
            assert entry is not None and entry.partition == "p1"
            assert await store.get_many(keys[:3]) == {k: items[k] for k in keys[:3]}
            assert await store.exists("t") is True
            assert await store.keys() == sorted([*keys, "t"])
            assert await store.search("k/00001?") == {k: items[k] for k in keys[10:20]}
            assert await store.partitions() == ["p0", "p1"]
            assert (await store.stats()).keys == 1501
            await _assert_full(admin)
            # The node's memory moves with more than the data (its script cache, for one):
            # full again, from what it holds now.
            await _hold_full(admin, 32 * 1024)
            assert await store.delete("t") is True
            assert await store.delete_many(keys[:100]) == 100
            assert await store.clear_partition("p0") == 1400
            assert await store.cleanup_expired() == 0
            assert (await store.set("new", 1)).version == 1
            assert await store.clear() == 1
        finally:
            await admin.config_set("maxmemory", "0")
