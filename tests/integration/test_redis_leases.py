"""Redis-specific behaviour of leases, fenced writes and agents (the rules themselves are proven
by the conformance suite on every backend).

* a release made through another client wakes a waiter by pub/sub (the fallback poll is
  pushed out of reach, so only a notification can wake it in time), on a standalone server and
  on a Cluster whatever node the lease's slot and the subscription live on;
* the release listener subscribes again after its connection is killed, and its task ends with
  the store;
* the key layout: lease and agent records keep their token and generation (no native TTL),
  ``clear()`` leaves them, none of them shows among entries;
* tokens survive a restart of a server with ``appendfsync always``;
* fenced scripts: each fenced twin keeps its script's flags and checks the fence first; on a
  full server (``maxmemory``, ``noeviction``) reads, renewals, releases and fenced deletes run,
  grants and fenced sets are refused with nothing written;
* many coroutines on two connectors over a few names: one holder at a time, tokens growing;
* large fenced batches, with the lease taken by another client between script calls (the
  store's connector is wrapped to pick the moment; Redis is real): a ``set_many`` of 5,000
  items and a ``delete_many`` of 10,000 keys are one call, all or nothing; beyond one call
  (15,000 items, 12,000 keys) the error says how many items the earlier calls wrote or
  deleted; on a Cluster a 10,000-item chunk is one call on the namespace's slot.

Every server that is restarted or filled is started by the harness for the test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import pytest

from fleetmem import BackendUnavailableError, LeaseLostError, OutcomeUnknownError
from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis.leases import RedisLeases
from fleetmem.backends.redis.scripts import FENCED, LEASE_FLAGS, SCRIPT_LIBRARY, SCRIPTS
from fleetmem.testing import connected_store

pytestmark = pytest.mark.redis

aioredis = pytest.importorskip("redis.asyncio")

_LISTENER_TASK = "fleetmem redis lease listener"
#: A wake-up promised within 100 ms, checked with slack but well under the 1 s fallback poll.
_WAKE = 0.8


@pytest.fixture
def no_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Push the waiters' fallback poll out of reach: only a notification wakes them in time."""
    monkeypatch.setattr(RedisLeases, "poll_interval", 60.0)


async def _granted_after_release(waiter: RedisStore, releaser: RedisStore, name: str) -> float:
    """Seconds from a release made through ``releaser`` to the grant of a waiting acquire on
    ``waiter`` (a different connector, hence different connections)."""
    held = await releaser.leases.acquire(name, owner="holder", ttl=60)
    assert held is not None
    task = asyncio.create_task(waiter.leases.acquire(name, owner="waiter", ttl=60, wait=20))
    await asyncio.sleep(0.3)  # the waiter subscribed, tried and sleeps
    assert not task.done()
    released_at = time.monotonic()
    assert await releaser.leases.release(held) is True
    lease = await asyncio.wait_for(task, 10)
    took = time.monotonic() - released_at
    assert lease is not None and lease.owner == "waiter" and lease.token == held.token + 1
    assert await waiter.leases.release(lease) is True
    return took


@pytest.fixture
async def two_stores(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    url = fleetmem_redis_server.url
    async with (
        connected_store(RedisStore.from_url(url, namespace=fleetmem_namespace)) as a,
        connected_store(RedisStore.from_url(url, namespace=fleetmem_namespace)) as b,
    ):
        yield a, b


async def test_a_release_through_another_client_wakes_a_waiter(
    two_stores: tuple[RedisStore, RedisStore], no_poll: None
) -> None:
    waiter, releaser = two_stores
    took = [await _granted_after_release(waiter, releaser, f"job{i}") for i in range(5)]
    print(f"\nstandalone: release -> grant in another client: {[round(t, 4) for t in took]} s")
    assert max(took) < _WAKE, took


@pytest.mark.cluster
async def test_a_release_wakes_a_waiter_on_a_cluster(
    fleetmem_redis_cluster: Any, fleetmem_namespace: str, no_poll: None
) -> None:
    """Namespaces spread over the three masters: the listener subscribes on one node, and a
    release published by the script on the node of the lease's slot reaches it."""
    url = fleetmem_redis_cluster.url
    took: list[float] = []
    for suffix in ("a", "b", "c", "d", "e", "f"):
        ns = fleetmem_namespace + suffix
        async with (
            connected_store(RedisStore.from_url(url, namespace=ns)) as waiter,
            connected_store(RedisStore.from_url(url, namespace=ns)) as releaser,
        ):
            took.append(await _granted_after_release(waiter, releaser, "job"))
    print(f"\ncluster: release -> grant in another client: {[round(t, 4) for t in took]} s")
    assert max(took) < _WAKE, took
    slots = {
        await _slot_owner(url, f"fm:{{{fleetmem_namespace + s}}}:") for s in ("a", "b", "c", "d")
    }
    assert len(slots) >= 2, "the namespaces did not spread over the masters"


async def _slot_owner(url: str, key: str) -> str:
    from redis.asyncio.cluster import RedisCluster

    client = RedisCluster.from_url(url)
    try:
        await client.initialize()
        node = client.get_node_from_key(key)
        assert node is not None
        return str(node.name)
    finally:
        await client.aclose()


async def _pubsub_ids(admin: Any, name: str) -> list[str]:
    """Client ids of the pub/sub connections named ``name``."""
    listing = (await admin.execute_command("CLIENT", "LIST", "TYPE", "pubsub")).decode()
    ids = []
    for line in listing.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("name") == name:
            ids.append(fields["id"])
    return ids


async def test_the_listener_subscribes_again_after_its_connection_dies(
    fleetmem_redis_server: Any, fleetmem_namespace: str, no_poll: None
) -> None:
    url = fleetmem_redis_server.url
    name = "fm-lease-test-" + uuid.uuid4().hex[:8]
    admin = aioredis.Redis.from_url(url)
    try:
        async with (
            connected_store(
                RedisStore.from_url(url, namespace=fleetmem_namespace, client_name=name)
            ) as waiter,
            connected_store(RedisStore.from_url(url, namespace=fleetmem_namespace)) as releaser,
        ):
            await _granted_after_release(waiter, releaser, "before")
            ids = await _pubsub_ids(admin, name)
            assert len(ids) == 1, ids
            held = await releaser.leases.acquire("job", owner="holder", ttl=60)
            assert held is not None
            task = asyncio.create_task(
                waiter.leases.acquire("job", owner="waiter", ttl=60, wait=30)
            )
            await asyncio.sleep(0.2)
            await admin.execute_command("CLIENT", "KILL", "ID", ids[0])
            deadline = time.monotonic() + 10
            while True:  # a new subscription, on a new connection
                again = await _pubsub_ids(admin, name)
                if again and again != ids:
                    break
                assert time.monotonic() < deadline, "the listener did not subscribe again"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # its SUBSCRIBE is answered
            assert not task.done()  # woken by the reconnection, it tried and waits again
            released_at = time.monotonic()
            assert await releaser.leases.release(held)
            lease = await asyncio.wait_for(task, 10)
            assert lease is not None and lease.owner == "waiter"
            assert time.monotonic() - released_at < _WAKE
    finally:
        await admin.aclose()


async def test_the_listener_ends_with_the_store(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    store = RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
    async with connected_store(store):
        # A waiting acquire starts the listener (and nothing before it).
        assert not [t for t in asyncio.all_tasks() if t.get_name() == _LISTENER_TASK]
        assert await store.leases.acquire("x", owner="a", ttl=60, wait=0.1) is not None
        assert await store.leases.acquire("x", owner="b", ttl=60, wait=0.1) is None
        assert [t for t in asyncio.all_tasks() if t.get_name() == _LISTENER_TASK]
        view = store.with_namespace(fleetmem_namespace + "v")
        assert await view.leases.acquire("x", owner="a", ttl=60, wait=0.1) is not None
        # One listener per connector, whatever the views and namespaces.
        assert len([t for t in asyncio.all_tasks() if t.get_name() == _LISTENER_TASK]) == 1
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == _LISTENER_TASK]


async def test_records_keep_tokens_and_generations_outside_the_entries(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    ns = fleetmem_namespace
    admin = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        async with connected_store(
            RedisStore.from_url(fleetmem_redis_server.url, namespace=ns)
        ) as store:
            lease = await store.leases.acquire("e:x", owner="a", ttl=60)
            assert lease is not None and lease.token == 1
            await store.agents.register("e:x", info={"a": 1}, ttl=60)
            raw = await admin.hgetall(f"fm:{{{ns}}}:l:e:x")
            assert raw[b"o"] == b"a" and raw[b"t"] == b"1" and raw[b"d"] == b"60000"
            assert await admin.pttl(f"fm:{{{ns}}}:l:e:x") == -1
            assert await admin.pttl(f"fm:{{{ns}}}:a:e:x") == -1
            # Neither is an entry, and clear() (entries only) leaves both.
            assert await store.keys() == [] and (await store.stats()).keys == 0
            assert await store.exists("e:x") is False
            await store.set("e:x", "an entry")
            assert await store.clear() == 1
            holder = await store.leases.holder("e:x")
            assert holder is not None and holder.token == 1
            assert await store.agents.count() == 1
            assert await store.leases.release(lease)
            await store.agents.deregister("e:x")
            # The records stay, holding the last token and generation.
            assert await admin.hget(f"fm:{{{ns}}}:l:e:x", "t") == b"1"
            assert await admin.hget(f"fm:{{{ns}}}:a:e:x", "g") == b"1"
            again = await store.leases.acquire("e:x", owner="b", ttl=60)
            assert again is not None and again.token == 2
            agent = await store.agents.register("e:x", ttl=60)
            assert agent.generation == 2
    finally:
        await admin.delete(f"fm:{{{ns}}}:l:e:x", f"fm:{{{ns}}}:a:e:x")
        await admin.delete(f"fm:{{{ns}}}:ai", f"fm:{{{ns}}}:ae")
        await admin.aclose()


@pytest.mark.slow
async def test_tokens_grow_across_a_restart_with_appendfsync_always(
    fleetmem_redis_factory: Callable[..., Any], fleetmem_namespace: str
) -> None:
    server = fleetmem_redis_factory(appendonly=True, appendfsync="always")
    async with connected_store(
        RedisStore.from_url(server.url, namespace=fleetmem_namespace)
    ) as store:
        lease = await store.leases.acquire("job", owner="a", ttl=60)
        agent = await store.agents.register("a1", ttl=0.2)
        assert lease is not None
        server.kill()
        server.start()
        # The lease survived (live, same token); after its release the next one is greater.
        holder = await store.leases.holder("job")
        assert holder is not None and holder.token == lease.token
        assert await store.leases.release(lease)
        again = await store.leases.acquire("job", owner="b", ttl=60)
        assert again is not None and again.token == lease.token + 1
        await asyncio.sleep(0.5)
        assert (await store.agents.register("a1", ttl=60)).generation == agent.generation + 1


def test_fenced_twins_keep_their_flags_and_check_the_fence_first() -> None:
    lua = resources.files("fleetmem.backends.redis").joinpath("lua").joinpath("kv")
    fence = lua.joinpath("_fence.lua").read_bytes()
    for name in FENCED:
        plain, fenced = SCRIPTS[name], SCRIPTS[f"fenced_{name}"]
        assert fenced.flags == plain.flags, name
        # The plain (EVALSHA) form: the same shebang and prelude, then the fence, the body.
        body = lua.joinpath(f"{name}.lua").read_bytes()
        assert plain.source.endswith(body)
        assert fenced.source == plain.source[: -len(body)] + fence + body
        # The function form carries the fenced twin too.
        assert fenced.function in SCRIPT_LIBRARY.source
    # Unfenced scripts are untouched: no fence in them.
    for name in FENCED:
        assert fence not in SCRIPTS[name].source
    assert SCRIPT_LIBRARY.source.count(fence) == len(FENCED)
    leases = SCRIPT_LIBRARY.group("leases")
    for name, flags in LEASE_FLAGS.items():
        assert leases[name].flags == flags
    assert leases["acquire"].flags == () and leases["agent_register"].flags == ()


async def test_functions_hold_the_fenced_twins(
    fleetmem_redis_server: Any, fleetmem_namespace: str
) -> None:
    """On a standalone server the fenced writes run as functions of the one library, with
    the flags of their unfenced forms."""
    admin = aioredis.Redis.from_url(fleetmem_redis_server.url)
    try:
        async with connected_store(
            RedisStore.from_url(fleetmem_redis_server.url, namespace=fleetmem_namespace)
        ) as store:
            lease = await store.leases.acquire("job", owner="a", ttl=60)
            assert lease is not None
            await store.set("k", 1, fence=lease)
            libs = await admin.execute_command(
                "FUNCTION", "LIST", "LIBRARYNAME", SCRIPT_LIBRARY.name
            )
            assert libs, "the library is not loaded"
            functions = {}
            lib = _pairs(libs[0])
            for f in lib[b"functions"]:
                f = _pairs(f)
                functions[f[b"name"]] = sorted(f[b"flags"])
            for name in FENCED:
                plain, fenced = SCRIPTS[name], SCRIPTS[f"fenced_{name}"]
                assert functions[fenced.function] == functions[plain.function]
                assert [x.decode() for x in functions[fenced.function]] == sorted(plain.flags)
    finally:
        await admin.aclose()


def _pairs(flat: Any) -> dict[bytes, Any]:
    if isinstance(flat, dict):
        return {k if isinstance(k, bytes) else str(k).encode(): v for k, v in flat.items()}
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


@pytest.mark.cluster
async def test_a_lost_fence_is_refused_on_a_cluster(
    fleetmem_redis_cluster: Any, fleetmem_namespace: str
) -> None:
    """EVALSHA form, and after the script cache was flushed (EVAL, then cached again)."""
    async with connected_store(
        RedisStore.from_url(fleetmem_redis_cluster.url, namespace=fleetmem_namespace)
    ) as store:
        lease = await store.leases.acquire("job", owner="a", ttl=60)
        assert lease is not None
        await store.set("k", 1, fence=lease)
        assert await store.leases.release(lease)
        client = store.client
        await client.execute_command("SCRIPT", "FLUSH", target_nodes=client.ALL_NODES)
        with pytest.raises(LeaseLostError):
            await store.set("k", 2, fence=lease)
        with pytest.raises(LeaseLostError):
            await store.compare_and_set("k", 2, version=9, fence=lease)
        with pytest.raises(LeaseLostError):
            await store.delete_many(["k"], fence=lease)
        assert await store.get("k") == 1


MAXMEMORY = 3 * 1024 * 1024


@pytest.mark.slow
async def test_a_full_server_keeps_leases_readable_renewable_and_releasable(
    fleetmem_redis_factory: Callable[..., Any], fleetmem_namespace: str
) -> None:
    server = fleetmem_redis_factory(
        extra_args=["--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "noeviction"]
    )
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with connected_store(
            RedisStore.from_url(server.url, namespace=fleetmem_namespace)
        ) as store:
            lease = await store.leases.acquire("job", owner="a", ttl=60)
            old = await store.leases.acquire("old", owner="a", ttl=60)
            assert lease is not None and old is not None
            assert await store.leases.release(old)
            await store.agents.register("a1", ttl=60)
            await store.set("keep", 1)
            n = 0
            while True:  # fill until Redis refuses
                items = {f"k/{n + i:06d}": "x" * 200 for i in range(200)}
                try:
                    await store.set_many(items)
                except BackendUnavailableError as exc:
                    assert not isinstance(exc, OutcomeUnknownError)
                    break
                n += 200
                assert n < 100_000, "maxmemory never reached"
            used = int((await admin.info("memory"))["used_memory"])
            await admin.config_set("maxmemory", str(used - 256 * 1024))
            # Refused before they run, nothing written.
            with pytest.raises(BackendUnavailableError, match="full"):
                await store.leases.acquire("new", owner="a", ttl=60)
            with pytest.raises(BackendUnavailableError, match="full"):
                await store.set("keep", 2, fence=lease)
            with pytest.raises(BackendUnavailableError, match="full"):
                await store.agents.register("a2", ttl=60)
            assert await store.leases.holder("new") is None
            # Reads, renewals, releases, fenced deletes (checked first) still run.
            holder = await store.leases.holder("job")
            assert holder is not None and holder.token == lease.token
            renewed = await store.leases.renew(lease, ttl=120)
            assert renewed.token == lease.token
            with pytest.raises(LeaseLostError):
                await store.delete("keep", fence=old)
            assert await store.delete("keep", fence=lease) is True
            assert await store.agents.count() == 1
            assert [a.id for a in await store.agents.list()] == ["a1"]
            assert await store.agents.deregister("a1") is True
            assert await store.leases.release(lease) is True
            assert await store.leases.holder("job") is None
            await admin.config_set("maxmemory", "0")
    finally:
        await admin.aclose()


async def test_many_waiters_on_two_clients_take_turns(
    two_stores: tuple[RedisStore, RedisStore],
) -> None:
    """64 coroutines over 8 names on two connectors: at most one holder per name at any time,
    each grant's token greater than the last of its name, fenced writes of holders land."""
    stores = two_stores
    names = [f"n{i}" for i in range(8)]
    holding: dict[str, int] = {}
    last: dict[str, int] = {}
    rounds = 3

    async def worker(i: int) -> None:
        store = stores[i % 2]
        name = names[i % len(names)]
        for _ in range(rounds):
            lease = await store.leases.acquire(name, owner=f"w{i}", ttl=30, wait=60)
            assert lease is not None
            assert name not in holding, f"{name} held twice"
            holding[name] = lease.token
            assert lease.token > last.get(name, 0)
            last[name] = lease.token
            await store.incr(f"count/{name}", fence=lease)
            await asyncio.sleep(0.001)
            del holding[name]
            assert await store.leases.release(lease)

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(64)))
    took = time.monotonic() - started
    counts = await stores[0].get_many([f"count/{n}" for n in names])
    assert counts == {f"count/{n}": 8 * rounds for n in names}
    print(f"\n{64 * rounds} acquisitions over 8 names in {took:.2f} s")


async def test_waiters_of_one_process_share_an_acquire_in_flight(
    fleetmem_redis_factory: Callable[..., Any], fleetmem_namespace: str
) -> None:
    """A release wakes every waiter of the name in the process; one ``acquire`` goes out and
    the others are refused with it when it wins: about two script calls (release, acquire) per
    grant, not one per waiter (counted by the server, on a server of this test's own)."""
    server = fleetmem_redis_factory()
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with connected_store(
            RedisStore.from_url(server.url, namespace=fleetmem_namespace)
        ) as store:
            grants = 0

            async def worker(i: int) -> None:
                nonlocal grants
                for _ in range(5):
                    lease = await store.leases.acquire(f"n{i % 2}", owner="w", ttl=30, wait=60)
                    assert lease is not None
                    grants += 1
                    await asyncio.sleep(0.002)
                    assert await store.leases.release(lease)

            await store.leases.holder("warm-up")  # loads the library: FCALL counting starts
            before = await _fcalls(admin)
            await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(16))), 60)
            calls = await _fcalls(admin) - before
            assert grants == 80
            # 80 releases + 80 winning acquires + a first try per worker, with slack.
            assert calls <= 2 * grants + 16 + 40, calls
    finally:
        await admin.aclose()


async def _fcalls(admin: Any) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_fcall", {}).get("calls", 0))


def _steal_after(
    monkeypatch: pytest.MonkeyPatch,
    store: RedisStore,
    thief: RedisStore,
    lease: Any,
    script: str,
    after: int,
) -> list[int]:
    """Wrap ``store``'s connector so that as soon as ``after`` calls of ``script`` (a fenced
    script) have returned (0: before the first goes out), ``thief`` (another client) releases
    ``lease`` and takes it over. Redis itself is real; only the moment is chosen. Returns the
    list of the script's calls (their argument counts), growing."""
    connector = store._kv.connector
    real = connector.call
    target = SCRIPTS[script]
    calls: list[int] = []

    async def steal() -> None:
        assert await thief.leases.release(lease) is True
        assert await thief.leases.acquire(lease.name, owner="thief", ttl=60) is not None

    async def call(s: Any, keys: Any, *args: Any, write: bool) -> Any:
        if s is target:
            if after == 0 and not calls:
                await steal()
            calls.append(len(args))
        res = await real(s, keys, *args, write=write)
        if s is target and after and len(calls) == after:
            await steal()
        return res

    monkeypatch.setattr(connector, "call", call)
    return calls


async def _present(store: RedisStore, keys: list[str]) -> int:
    return sum(1 for v in (await store.get_many(keys)).values() if v is not None)


@pytest.mark.parametrize("after", [0, 1])
async def test_a_fenced_set_many_of_5000_items_is_all_or_nothing(
    two_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """The lease is taken by another client before the first script call of the write, or
    as soon as that call returns: either nothing or all 5,000 items are written, never a part
    (they used to go out as three calls of 2,000, each checking the fence)."""
    a, b = two_stores
    lease = await a.leases.acquire("job", owner="a", ttl=60)
    assert lease is not None
    items = {f"k{i}": i for i in range(5000)}
    calls = _steal_after(monkeypatch, a, b, lease, "fenced_set_many", after)
    if after == 0:
        with pytest.raises(LeaseLostError, match="nothing was changed"):
            await a.set_many(items, fence=lease)
        assert await _present(a, list(items)) == 0
    else:
        assert await a.set_many(items, fence=lease) == 5000
        assert await _present(a, list(items)) == 5000
    assert len(calls) == 1  # one script call for the whole chunk
    assert (await a.leases.holder("job")).owner == "thief"  # type: ignore[union-attr]


@pytest.mark.parametrize("after", [0, 1])
async def test_a_fenced_delete_many_of_10000_keys_is_all_or_nothing(
    two_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    a, b = two_stores
    keys = [f"k{i}" for i in range(10_000)]
    await a.set_many(dict.fromkeys(keys, 1))
    lease = await a.leases.acquire("job", owner="a", ttl=60)
    assert lease is not None
    calls = _steal_after(monkeypatch, a, b, lease, "fenced_delete_many", after)
    if after == 0:
        with pytest.raises(LeaseLostError, match="nothing was changed"):
            await a.delete_many(keys, fence=lease)
        assert await _present(a, keys) == 10_000
    else:
        assert await a.delete_many(keys, fence=lease) == 10_000
        assert await _present(a, keys) == 0
    assert len(calls) == 1


async def test_a_fenced_delete_many_refused_after_its_first_call_says_what_was_deleted(
    two_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """12,000 keys take two calls; the lease is lost between them: the first 10,000 stay
    deleted and the error says so, instead of "nothing was changed"."""
    a, b = two_stores
    keys = [f"k{i}" for i in range(12_000)]
    await a.set_many(dict.fromkeys(keys, 1))
    lease = await a.leases.acquire("job", owner="a", ttl=60)
    assert lease is not None
    calls = _steal_after(monkeypatch, a, b, lease, "fenced_delete_many", 1)
    with pytest.raises(LeaseLostError) as info:
        await a.delete_many(keys, fence=lease)
    text = str(info.value)
    assert "nothing was changed" not in text
    assert "10,000 items were already deleted" in text and "12,000 keys" in text
    assert len(calls) == 2
    assert await _present(a, keys[:10_000]) == 0
    assert await _present(a, keys[10_000:]) == 2000


async def test_a_fenced_set_many_refused_after_its_first_chunk_says_what_was_written(
    two_stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """15,000 items are two front-end chunks (SET_MANY_CHUNK), one script call each: the
    first chunk stays written, the second is not, and the error says how many were written."""
    a, b = two_stores
    items = {f"k{i}": i for i in range(15_000)}
    lease = await a.leases.acquire("job", owner="a", ttl=60)
    assert lease is not None
    calls = _steal_after(monkeypatch, a, b, lease, "fenced_set_many", 1)
    with pytest.raises(LeaseLostError) as info:
        await a.set_many(items, fence=lease)
    text = str(info.value)
    assert "nothing was changed" not in text and "10,000 items were already written" in text
    assert len(calls) == 2
    keys = list(items)
    assert await _present(a, keys[:10_000]) == 10_000
    assert await _present(a, keys[10_000:]) == 0


@pytest.mark.cluster
async def test_a_fenced_set_many_of_a_full_chunk_is_one_call_on_a_cluster(
    fleetmem_redis_cluster: Any, fleetmem_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All keys of a namespace share its hash tag, so a 10,000-item chunk is one script call
    on one slot (EVALSHA form), and is refused whole once the lease is gone."""
    async with connected_store(
        RedisStore.from_url(fleetmem_redis_cluster.url, namespace=fleetmem_namespace)
    ) as store:
        lease = await store.leases.acquire("job", owner="a", ttl=60)
        assert lease is not None
        items = {f"k{i}": i for i in range(10_000)}
        assert await store.set_many(items, fence=lease) == 10_000
        assert await store.delete_many(list(items), fence=lease) == 10_000
        assert await store.leases.release(lease)
        with pytest.raises(LeaseLostError, match="nothing was changed"):
            await store.set_many(items, fence=lease)
        assert await _present(store, list(items)) == 0
