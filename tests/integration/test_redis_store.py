"""RedisStore specifics: key layout, index upkeep, exact integers, credentials, memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, ConfigurationError, InvalidArgumentError
from fleetmem.backends.redis import RedisStore
from fleetmem.testing import connected_store

pytestmark = pytest.mark.redis

aioredis = pytest.importorskip("redis.asyncio")
key_slot = pytest.importorskip("redis.crc").key_slot


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


async def _redis_keys(admin: Any, namespace: str) -> list[bytes]:
    pattern = "fm:{" + namespace + "}:*"
    return sorted([k async for k in admin.scan_iter(match=pattern.replace("[", "\\["))])


async def _index(admin: Any, namespace: str) -> list[bytes]:
    """Every index member of a namespace, bucket after bucket, with the bucket invariants."""
    prefix = f"fm:{{{namespace}}}:".encode()
    bounds = [b"", *await admin.zrange(prefix + b"d", 0, -1)]
    members: list[bytes] = []
    for i, bound in enumerate(bounds):
        bucket = await admin.zrange(prefix + b"b:" + bound, 0, -1)
        assert bound == b"" or bucket, f"empty bucket {bound!r} left in the directory"
        assert len(bucket) < 128, "a bucket outgrew the listpack encoding"
        assert all(m >= bound for m in bucket)
        if i + 1 < len(bounds):
            assert all(m < bounds[i + 1] for m in bucket)
        members += bucket
    return members


async def test_every_key_of_a_namespace_is_in_one_slot(store: RedisStore, admin: Any) -> None:
    await store.set("plain", 1)
    await store.set("{other}/x", 2, ttl=60, partition="{p}")
    await store.set("}{", 3, partition="q")
    await store.incr("n")
    names = await _redis_keys(admin, store.namespace)
    assert len(names) >= 6
    assert {key_slot(name) for name in names} == {key_slot(f"{{{store.namespace}}}".encode())}
    assert all(name.startswith(f"fm:{{{store.namespace}}}:".encode()) for name in names)


async def test_namespaces_sharing_a_prefix_stay_apart(store: RedisStore, admin: Any) -> None:
    views = [store.with_namespace(store.namespace + suffix) for suffix in ("", "b", ".b")]
    try:
        for i, view in enumerate(views):
            await view.set("k", i, partition=f"p{i}")
        for i, view in enumerate(views):
            assert await view.keys() == ["k"]
            assert await view.get("k") == i
            assert await view.partitions() == [f"p{i}"]
            assert (await view.stats()).keys == 1
        assert await views[0].clear() == 1
        assert await views[1].get("k") == 1
        assert await views[2].get("k") == 2
    finally:
        for view in views[1:]:
            await view.clear()


async def test_expired_entries_are_pruned_from_every_index(store: RedisStore, admin: Any) -> None:
    ns = store.namespace
    await store.set_many({f"t/{i}": i for i in range(5)}, ttl=0.05, partition="gone")
    await store.set("t/live", 1, partition="gone")
    await asyncio.sleep(0.15)
    assert await store.keys("t/") == ["t/live"]
    # keys() dropped the members it met; the index and the counts hold live entries only.
    assert await _index(admin, ns) == [b"t/live\x00gone"]
    assert await admin.hgetall(f"fm:{{{ns}}}:c") == {b"gone": b"1"}
    assert await admin.zcard(f"fm:{{{ns}}}:x") == 0
    assert (await store.stats()).expired_pending == 5
    assert await store.cleanup_expired() == 5
    assert (await store.stats()).expired_pending == 0


async def test_index_buckets_split_stay_compact_and_empty_out(
    store: RedisStore, admin: Any
) -> None:
    import random

    rng = random.Random(7)
    ns = store.namespace
    names = [f"k/{i:05d}" for i in range(1500)]
    singles, bulk = names[:300], names[300:]
    for name in rng.sample(singles, len(singles)):
        await store.set(name, 1)
    shuffled = rng.sample(bulk, len(bulk))
    await store.set_many(dict.fromkeys(shuffled[:700], 2))
    await store.set_many(dict.fromkeys(shuffled[700:], 3), partition="p")
    await store.set("k/" + "z" * 90, 4)  # a member past listpack's 64 bytes: still indexed
    names.append("k/" + "z" * 90)

    members = await _index(admin, ns)
    assert sorted(m.split(b"\x00")[0].decode() for m in members) == names
    bounds = await admin.zrange(f"fm:{{{ns}}}:d", 0, -1)
    assert len(bounds) >= 1500 // 127
    encodings = {
        await admin.object("encoding", f"fm:{{{ns}}}:b:".encode() + b) for b in bounds[:-1]
    }
    assert encodings == {b"listpack"}
    assert await store.keys("k/") == names
    page, after = [], None
    while chunk := await store.keys("k/00", limit=97, after=after):
        page += chunk
        after = chunk[-1]
    assert page == names[:1000]
    assert await store.keys("k/010", partition="p") == [
        n for n in names[1000:1100] if n in set(shuffled[700:])
    ]
    # Moving keys to another partition re-files their members in place.
    await store.set_many(dict.fromkeys(names[::3], 5), partition="q")
    assert sorted(m.split(b"\x00")[0].decode() for m in await _index(admin, ns)) == names
    assert await store.keys(partition="q") == names[::3]

    doomed = rng.sample(names, 1200)
    assert await store.delete_many(doomed[:600]) == 600
    for name in doomed[600:]:
        assert await store.delete(name) is True
    left = sorted(set(names) - set(doomed))
    assert sorted(m.split(b"\x00")[0].decode() for m in await _index(admin, ns)) == left
    assert await store.keys("k/") == left
    assert await store.clear() == len(left)
    assert await _redis_keys(admin, ns) == []


async def test_rewriting_a_natively_expired_key_in_another_partition(
    store: RedisStore, admin: Any
) -> None:
    await store.set("k", 1, ttl=0.05, partition="old")
    await asyncio.sleep(0.1)
    entry = await store.set("k", 2, partition="new")
    assert (entry.version, entry.partition) == (1, "new")
    assert await store.keys() == ["k"]
    assert await store.partitions() == ["new"]
    assert await _index(admin, store.namespace) == [b"k\x00new"]


async def test_incr_is_exact_across_int64(store: RedisStore) -> None:
    top = 2**63 - 1
    await store.set("n", top - 10)
    assert await store.incr("n", 10) == top
    with pytest.raises(InvalidArgumentError):
        await store.incr("n")
    assert await store.get("n") == top
    assert (await store.get_entry("n")).version == 2  # type: ignore[union-attr]
    await store.set("m", -(2**63) + 1)
    assert await store.incr("m", -1) == -(2**63)
    with pytest.raises(InvalidArgumentError):
        await store.incr("m", -1)
    await store.set("big", 2**70)
    with pytest.raises(InvalidArgumentError):
        await store.incr("big")
    assert await store.incr("big", 0.5) == float(2**70) + 0.5
    assert await store.incr("f", 0.1) == 0.1
    assert await store.incr("f", 0.2) == 0.1 + 0.2
    assert await store.incr("g", 2.0) == 2.0
    assert isinstance(await store.incr("g", 1), float)


async def test_search_does_not_use_redis_match_semantics(store: RedisStore) -> None:
    await store.set_many({"a%b": 1, "a_b": 2, "axb": 3, "a\\b": 4, "a[b": 5, "a^b": 6})
    assert await store.search("a%b") == {"a%b": 1}
    assert await store.search("a_*") == {"a_b": 2}
    assert await store.search("a[^x]b") == {
        "a%b": 1,
        "a[b": 5,
        "a\\b": 4,
        "a^b": 6,
        "a_b": 2,
    }
    assert await store.search("a\\[b") == {"a[b": 5}


async def test_keys_pages_through_a_large_namespace(store: RedisStore) -> None:
    await store.set_many({f"p/{i:05d}": i for i in range(12_000)}, partition="x")
    await store.set_many({f"q/{i:05d}": i for i in range(100)})
    page = await store.keys("p/", limit=3, after="p/05000")
    assert page == ["p/05001", "p/05002", "p/05003"]
    assert len(await store.keys("p/")) == 12_000
    assert await store.keys(partition="default", limit=2) == ["q/00000", "q/00001"]
    found = await store.search("p/1*5", limit=3)
    assert list(found) == ["p/10005", "p/10015", "p/10025"]
    assert await store.delete_many([f"p/{i:05d}" for i in range(0, 12_000, 2)]) == 6_000
    assert (await store.stats()).partitions == {"default": 100, "x": 6_000}


async def test_the_keys_command_is_never_used(
    fleetmem_redis_factory: Callable[..., Any],
) -> None:
    server = fleetmem_redis_factory()
    async with RedisStore.from_url(server.url, namespace="nokeys") as store:
        await store.set_many({f"k{i}": i for i in range(20)}, ttl=30)
        await store.keys()
        await store.search("k1*")
        await store.partitions()
        await store.stats()
        await store.clear_partition("default")
        admin = aioredis.Redis.from_url(server.url)
        try:
            stats = await admin.info("commandstats")
        finally:
            await admin.aclose()
    assert "cmdstat_keys" not in stats
    assert "cmdstat_scan" not in stats


async def test_injected_client_is_left_open(fleetmem_redis_server: Any) -> None:
    client = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        async with RedisStore(client=client, namespace="injected-open") as store:
            await store.set("k", 1)
            await store.clear()
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_decode_responses_client_is_refused(fleetmem_redis_server: Any) -> None:
    client = aioredis.Redis.from_url(fleetmem_redis_server.url, decode_responses=True)
    try:
        with pytest.raises(ConfigurationError):
            RedisStore(client=client)
    finally:
        await client.aclose()


async def test_acl_credentials_and_no_password_anywhere(
    fleetmem_redis_factory: Callable[..., Any],
) -> None:
    server = fleetmem_redis_factory(
        extra_args=["--user", "fleet", "on", ">hunter2-secret", "~*", "&*", "+@all"]
    )
    host_url = server.url
    good = RedisStore.from_url(
        host_url, namespace="acl", username="fleet", password="hunter2-secret"
    )
    assert "hunter2" not in repr(good)
    async with good:
        await good.set("k", 1)
        health = await good.health()
        assert health.ok and health.latency_ms is not None
        assert "hunter2" not in repr(health)
    with_url = host_url.replace("redis://", "redis://fleet:hunter2-secret@")
    store = RedisStore.from_url(with_url, namespace="acl")
    assert "hunter2" not in repr(store)
    async with store:
        assert await store.get("k") == 1
    bad = RedisStore.from_url(
        host_url.replace("redis://", "redis://fleet:wrong-secret@"), namespace="acl", timeout=1.0
    )
    with pytest.raises(BackendUnavailableError) as info:
        await bad.connect()
    assert "wrong-secret" not in str(info.value)
    assert "wrong-secret" not in repr(bad)
    health = await bad.health()
    assert health.ok is False and "wrong-secret" not in repr(health)
    await bad.close()


def test_from_url_rejects_other_schemes() -> None:
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("postgresql://u:pw@h/db")
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://h", ssl_ca_certs="/ca.pem")
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("unix:///tmp/r.sock", cluster=True)


async def test_unix_socket_url(fleetmem_redis_factory: Callable[..., Any], tmp_path: Any) -> None:
    sock = tmp_path / "redis.sock"
    fleetmem_redis_factory(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    async with RedisStore.from_url(f"unix://{sock}", namespace="unix") as store:
        await store.set("k", [1, 2])
        assert await store.get("k") == [1, 2]


async def test_memory_per_entry_against_plain_set(
    fleetmem_redis_factory: Callable[..., Any],
) -> None:
    """Bytes per entry (value, metadata, index) against a plain ``SET key json``.

    The target is 1.5x (see docs/backends/redis.md for the figures of this shape).
    """
    import orjson

    server = fleetmem_redis_factory()
    value = {
        "agent": "agent-0042",
        "role": "planner",
        "step": 17,
        "notes": "x" * 120,
        "tags": ["a", "b", "c"],
        "score": 0.73,
    }
    n = 5000
    keys = [f"agents/run-1/key-{i:06d}" for i in range(n)]
    admin = aioredis.Redis.from_url(server.url)
    try:
        await admin.mset({k: orjson.dumps(value) for k in keys})
        plain = sum([await admin.memory_usage(k) for k in keys]) / n
        await admin.flushall()
        async with RedisStore.from_url(server.url, namespace="mem") as store:
            await store.set_many(dict.fromkeys(keys, value))
        entries = sum([await admin.memory_usage(f"fm:{{mem}}:e:{k}") for k in keys])
        others = [k for k in await _redis_keys(admin, "mem") if not k.startswith(b"fm:{mem}:e:")]
        assert len(others) > n // 127  # the index buckets, their directory, the counts
        shared = sum([await admin.memory_usage(k, samples=0) for k in others])
        ours = (entries + shared) / n
    finally:
        await admin.aclose()
    assert ours <= 1.5 * plain, (ours, plain)


async def test_merged_calls_keep_the_semantics_of_single_calls(
    store: RedisStore, admin: Any
) -> None:
    """Concurrent calls beyond ``coalesce_max_inflight`` go out as batches (one script call
    or MGET each): every caller still gets exactly what its own call would have returned."""
    assert store.coalescing
    ns = store.namespace
    await store.set_many({f"m/{i:03d}": i for i in range(0, 60, 2)}, partition="old")
    await store.set("m/ttl", 1, ttl=60)

    def write(i: int) -> Any:
        key = f"m/{i:03d}"
        if i % 4 == 0:
            return store.set(key, {"i": i}, partition="new")  # existing: moves partition
        if i % 4 == 1:
            return store.set(key, [i], ttl=30)  # new, with a TTL
        if i % 4 == 2:
            return store.set(key, i * 10)  # existing: keeps its partition
        return store.set(key, str(i), partition="p3")  # new, in a named partition

    entries = await asyncio.gather(
        *(write(i) for i in range(60)), store.set("m/ttl", 2, keep_ttl=True)
    )
    assert store._c_set is not None and store._c_set.batches > 0  # some calls were merged
    for i, entry in enumerate(entries[:60]):
        assert entry.key == f"m/{i:03d}"
        assert entry.version == (2 if i % 2 == 0 else 1)
        assert entry.partition == ("new", None, "old", "p3")[i % 4] or i % 4 == 1
        assert (entry.expires_at is not None) == (i % 4 == 1)
        assert entry.updated_at >= entry.created_at
    assert entries[1].partition == "default"
    kept = entries[60]
    assert kept.version == 2 and kept.expires_at is not None
    assert (await store.get_entry("m/ttl")).expires_at == kept.expires_at  # type: ignore[union-attr]
    stats = await store.stats()
    assert stats.partitions == {"default": 16, "new": 15, "old": 15, "p3": 15}
    assert await admin.hgetall(f"fm:{{{ns}}}:c") == {
        b"default": b"16",
        b"new": b"15",
        b"old": b"15",
        b"p3": b"15",
    }
    assert len(await store.keys("m/")) == 61

    keys = [f"m/{i:03d}" for i in range(70)]
    values, got, flags = await asyncio.gather(
        asyncio.gather(*(store.get(k, "none") for k in keys)),
        asyncio.gather(*(store.get_entry(k) for k in keys)),
        asyncio.gather(*(store.exists(k) for k in keys)),
    )
    for i, (value, entry, flag) in enumerate(zip(values, got, flags, strict=True)):
        if i >= 60:
            assert (value, entry, flag) == ("none", None, False)
            continue
        assert value == entries[i].value and flag is True
        assert entry is not None and entry.version == entries[i].version
        assert (entry.partition, entry.expires_at) == (entries[i].partition, entries[i].expires_at)
    deleted = await asyncio.gather(*(store.delete(k) for k in keys))
    assert deleted == [i < 60 for i in range(70)]
    assert (await store.stats()).partitions == {"default": 1}
    assert await store.keys("m/") == ["m/ttl"]


async def test_function_library_is_reloaded_after_function_flush(
    store: RedisStore, admin: Any
) -> None:
    await store.set("k", 1)
    for _ in range(3):
        await admin.execute_command("FUNCTION", "FLUSH")
        assert (await store.incr("k")) >= 2
    assert (await store.set("k", 10)).version == 5
    libraries = await admin.execute_command("FUNCTION", "LIST")
    assert len(libraries) == 1


async def test_scripts_are_used_when_function_load_is_not_allowed(
    fleetmem_redis_factory: Callable[..., Any],
) -> None:
    server = fleetmem_redis_factory(
        extra_args=["--user", "nofn", "on", ">pw", "~*", "&*", "+@all", "-function"]
    )
    url = server.url.replace("redis://", "redis://nofn:pw@")
    async with RedisStore.from_url(url, namespace="nofn") as store:
        assert (await store.set("k", 1)).version == 1
        assert (await store.set("k", 2, partition="p")).version == 2
        assert await store.keys() == ["k"]
        assert await store.delete("k") is True
        admin = aioredis.Redis.from_url(server.url)
        try:
            stats = await admin.info("commandstats")
        finally:
            await admin.aclose()
    assert "cmdstat_fcall" in stats  # tried once, refused ...
    assert stats["cmdstat_evalsha"]["calls"] >= 3  # ... then scripts


async def test_set_many_over_existing_new_and_expired_keys(store: RedisStore, admin: Any) -> None:
    ns = store.namespace
    await store.set_many({f"s/{i}": i for i in range(10)}, partition="a")
    await store.set_many({f"s/{i}": i for i in range(5)}, ttl=0.05, partition="b")
    await asyncio.sleep(0.1)  # s/0..4 expired natively, still indexed under "b"
    assert await store.set_many({f"s/{i}": -i for i in range(15)}) == 15
    entries = [await store.get_entry(f"s/{i}") for i in range(15)]
    assert [e.version for e in entries if e] == [1] * 5 + [2] * 5 + [1] * 5
    assert [e.partition for e in entries if e] == ["default"] * 5 + ["a"] * 5 + ["default"] * 5
    assert all(e is not None and e.expires_at is None for e in entries)
    assert (await store.stats()).partitions == {"a": 5, "default": 10}
    assert len(await _index(admin, ns)) == 15
    assert await store.set_many({f"s/{i}": i for i in range(0, 15, 3)}, ttl=60, partition="c") == 5
    assert (await store.stats()).partitions == {"a": 3, "c": 5, "default": 7}
    ttl = await store.ttl("s/3")
    assert ttl is not None and 59 < ttl <= 60
    assert (await store.get_entry("s/6")).version == 3  # type: ignore[union-attr]


async def test_long_digit_runs_and_long_partitions_round_trip(
    store: RedisStore, admin: Any
) -> None:
    """Values with a run of 19+ digits are marked in the entry string and read back exactly
    on every path; a partition name too long for the first header read is read in full."""
    big = {"n": 2**70, "s": "1234567890123456789012", "f": 1e300}
    plain = {"n": 10**17, "s": "abc"}
    part = "p" * 255
    await store.set("big", big, partition=part)
    await store.set("plain", plain)
    await store.set_many({"big2": big, "num": 2**80})
    ns = store.namespace
    raw_big = await admin.get(f"fm:{{{ns}}}:e:big")
    assert raw_big[0] == 255 and raw_big[19 : 19 + 255] == part.encode()
    assert raw_big[19 + 255 : 19 + 256] == b"!"
    raw_plain = await admin.get(f"fm:{{{ns}}}:e:plain")
    assert raw_plain[0] == 0 and raw_plain[19:20] == b"{"
    assert await store.get("big") == big
    assert await store.get_many(["big", "plain", "big2", "num"]) == {
        "big": big,
        "plain": plain,
        "big2": big,
        "num": 2**80,
    }
    entry = await store.get_entry("big")
    assert entry is not None and (entry.value, entry.partition, entry.version) == (big, part, 1)
    assert await store.search("b*") == {"big": big, "big2": big}
    values = await asyncio.gather(*(store.get(k) for k in ("big", "plain", "big2", "num")))
    assert values == [big, plain, big, 2**80]
    with pytest.raises(InvalidArgumentError):
        await store.incr("num")
    assert await store.incr("num", 0.5) == float(2**80) + 0.5
    moved = await store.set("big", 1, partition="q")
    assert (moved.version, moved.partition) == (2, "q")
    assert (await store.stats()).partitions == {"default": 3, "q": 1}
