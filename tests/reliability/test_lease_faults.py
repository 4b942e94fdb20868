"""Leases, fenced writes and agents under faults: a holder killed, servers restarted, a lost
``LISTEN`` connection. Servers that are stopped or killed are the harness's own, started for
these tests (``fleetmem_postgres_factory``, ``fleetmem_redis_factory``).

The assertions are on order, tokens and the server's clock; the few on this machine's clock
have seconds of slack, so a loaded machine does not fail them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lease_worker import WorkerProcess, lease_from_json, open_spec_store, store_spec

from fleetmem import BackendUnavailableError, LeaseLostError
from fleetmem.testing.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).with_name("lease_worker.py")
#: The killed holder's TTL (seconds); lock() renews it every TTL/3.
TTL = 2.0
#: Slack (seconds) for a loaded machine: a renewal's round trip, a late wake-up.
SLACK = 1.0
#: The most a waiter may take after the TTL: the backend's poll, plus generous slack.
LATE = 5.0

T = TypeVar("T")


# ---------------------------------------------------------------- a killed lease holder


class Holder(WorkerProcess):
    """A ``hold`` worker: it takes a lease, writes it to a file and reports its renewals."""


@pytest.fixture
async def spawn_holder() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Holder]]]:
    holders: list[Holder] = []

    async def start(spec: dict[str, Any]) -> Holder:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            json.dumps(spec),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        holders.append(Holder(proc))
        return holders[-1]

    try:
        yield start
    finally:
        for holder in holders:
            if holder.proc.returncode is None:
                holder.proc.kill()
            await holder.proc.wait()


KILL_BACKENDS = [
    pytest.param("sqlite", marks=[pytest.mark.sqlite], id="sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres], id="postgres"),
    pytest.param("redis", marks=[pytest.mark.redis], id="redis"),
    pytest.param(
        "hybrid", marks=[pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis], id="hybrid"
    ),
]


@pytest.mark.parametrize("backend", KILL_BACKENDS)
async def test_a_killed_holders_lease_goes_to_a_waiter_after_its_ttl(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fleetmem_namespace: str,
    spawn_holder: Callable[[dict[str, Any]], Awaitable[Holder]],
) -> None:
    """A process holding a lease (lock(), renewing) is killed with SIGKILL: the lease stays
    its own until its TTL runs out on the server's clock, then a waiting acquire gets it with a
    greater token, within the TTL plus one poll (plus slack), and the dead holder's token fences
    nothing any more."""
    spec = store_spec(backend, fleetmem_namespace, request.getfixturevalue, tmp_path)
    lease_file = tmp_path / "lease.json"
    async with open_spec_store(spec) as store:
        holder = await spawn_holder(
            {
                **spec,
                "mode": "hold",
                "lease": "L",
                "owner": "doomed",
                "ttl": TTL,
                "key": "work",
                "lease_file": str(lease_file),
            }
        )
        held = await holder.event(timeout=90.0)
        assert held["event"] == "held", held
        # Another client waits for the lease from now on, while the holder is alive.
        started = time.monotonic()
        waiting = asyncio.create_task(
            store.leases.acquire("L", owner="taker", ttl=30, wait=2 * TTL + LATE + 30)
        )
        # Kill it just after a background renewal, so the lease has (nearly) a whole TTL left.
        renewed = await holder.event(timeout=30.0)
        assert renewed["event"] == "renewed", renewed
        assert not waiting.done(), "the lease was granted while its holder renewed it"
        holder.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await holder.proc.wait()
        assert holder.proc.returncode == -signal.SIGKILL

        dead = lease_from_json(json.loads(lease_file.read_text()))
        assert dead.token == held["lease"]["token"] == renewed["lease"]["token"]
        assert await store.get("work") == {"by": "doomed", "token": dead.token}
        last_expiry = lease_from_json(renewed["lease"]).expires_at

        # Dead, but its lease is live until its TTL runs out: nobody else gets it before.
        current = await store.leases.holder("L")
        other = await store.leases.acquire("L", owner="other", ttl=30)
        if time.monotonic() < renewed["mono"] + TTL - SLACK:  # not this late (a loaded box)
            assert current is not None and current.token == dead.token, current
            assert other is None, other
            assert not waiting.done()
        if other is not None:  # the waiter cannot have it too; let it wait for this one
            assert await store.leases.release(other)

        taken = await waiting
        granted_at = time.monotonic()
        assert taken is not None, "the waiter never got the dead holder's lease"
        assert taken.token > dead.token
        # Not before the dead lease expired, on the server's clock...
        assert taken.acquired_at >= last_expiry, (taken.acquired_at, last_expiry)
        # ... nor on this machine's (the renewal took place at most a round trip before the
        # holder reported it), and within the TTL plus one poll (plus slack) of the kill.
        assert granted_at >= renewed["mono"] + TTL - SLACK, granted_at - renewed["mono"]
        assert granted_at - killed_at <= TTL + store.leases.backend.poll_interval + LATE, (
            granted_at - killed_at
        )
        print(
            f"{backend}: granted {granted_at - killed_at:.3f} s after the kill, "
            f"{granted_at - renewed['mono']:.3f} s after the last renewal (TTL {TTL} s), "
            f"waited {granted_at - started:.3f} s"
        )

        # The dead holder's lease, rebuilt from its file, fences nothing any more.
        zombie_writes: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.set("work", {"by": "zombie"}, fence=dead),
            lambda: store.compare_and_set("work", {"by": "zombie"}, version=1, fence=dead),
            lambda: store.incr("zombie-count", fence=dead),
            lambda: store.set_if_absent("zombie-key", 1, fence=dead),
            lambda: store.delete("work", fence=dead),
        ]
        for write in zombie_writes:
            with pytest.raises(LeaseLostError):
                await write()
        with pytest.raises(LeaseLostError):
            await store.leases.renew(dead)
        assert await store.leases.release(dead) is False
        assert await store.get("work") == {"by": "doomed", "token": dead.token}
        assert not await store.exists("zombie-count")
        assert not await store.exists("zombie-key")
        # The new holder's fence works; the dead one's still does not.
        await store.set("work", {"by": "taker", "token": taken.token}, fence=taken)
        with pytest.raises(LeaseLostError):
            await store.set("work", {"by": "zombie"}, fence=dead)
        assert await store.get("work") == {"by": "taker", "token": taken.token}
        holder_now = await store.leases.holder("L")
        assert holder_now is not None and holder_now.token == taken.token
        assert await store.leases.release(taken) is True
        await store.clear()


# ---------------------------------------------------------------- servers restarted


async def retrying(call: Callable[[], Awaitable[T]], seconds: float = 30.0) -> T:
    """``call()``, tried again while the server is still coming back."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except BackendUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def pg_lease_server(fleetmem_postgres_factory: Callable[..., PostgresServer]) -> PostgresServer:
    """A PostgreSQL server of this module's own: it is restarted and killed."""
    return fleetmem_postgres_factory()


@pytest.fixture
def pg_victim(pg_lease_server: PostgresServer) -> Any:
    yield pg_lease_server
    pg_lease_server.start()  # running again for the next test, whatever this one did


async def _state_before_restart(store: Any) -> tuple[int, dict[str, int], Any]:
    """Tokens and generations to beat after the restart: a lease taken and released, one
    still held (TTL 120 s), an agent that registered and deregistered, one that expires."""
    first = await store.leases.acquire("L", owner="before", ttl=30)
    assert first is not None
    assert await store.leases.release(first)
    second = await store.leases.acquire("L", owner="before", ttl=30)
    assert second is not None and second.token > first.token
    assert await store.leases.release(second)
    kept = await store.leases.acquire("kept", owner="before", ttl=120)
    assert kept is not None
    await store.set("fenced", "before", fence=kept)

    agent = await store.agents.register("a1", info={"run": 1}, ttl=60)
    assert await store.agents.deregister("a1")
    again = await store.agents.register("a1", info={"run": 1}, ttl=60)
    assert again.generation > agent.generation
    assert await store.agents.deregister("a1")
    brief = await store.agents.register("a2", info={"run": 1}, ttl=0.2)
    return second.token, {"a1": again.generation, "a2": brief.generation}, kept


async def _check_after_restart(
    store: Any, token: int, generations: dict[str, int], kept: Any
) -> None:
    after = await retrying(lambda: store.leases.acquire("L", owner="after", ttl=30))
    assert after is not None
    assert after.token > token, (after.token, token)
    assert await store.leases.release(after)
    # The lease held across the restart is still its holder's, and still fences.
    still = await store.leases.holder("kept")
    assert still is not None and still.token == kept.token
    assert await store.leases.acquire("kept", owner="after", ttl=30) is None
    await store.set("fenced", "after", fence=kept)
    assert await store.get("fenced") == "after"
    assert await store.leases.release(kept)
    # Agents: gone ones register again with a greater generation.
    await asyncio.sleep(0.3)  # a2's 0.2 s have passed on any clock
    assert await store.agents.get("a1") is None
    assert await store.agents.get("a2") is None
    for agent_id, before in generations.items():
        again = await store.agents.register(agent_id, info={"run": 2}, ttl=60)
        assert again.generation > before, (agent_id, again.generation, before)
        assert again.info == {"run": 2}


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["kill", "fast"], ids=["kill-9", "stop-fast"])
async def test_tokens_and_generations_grow_across_a_postgres_restart(
    pg_victim: PostgresServer, fleetmem_namespace: str, how: str
) -> None:
    spec = {"backend": "postgres", "dsn": pg_victim.dsn, "namespace": fleetmem_namespace}
    async with open_spec_store(spec) as store:
        token, generations, kept = await _state_before_restart(store)
        if how == "kill":
            await asyncio.to_thread(pg_victim.kill)
            await asyncio.to_thread(pg_victim.start)
        else:
            await asyncio.to_thread(pg_victim.restart, "fast")
        # The same store (its pool reconnects), then a new one: nothing kept in the client.
        after = await retrying(lambda: store.leases.acquire("L", owner="same", ttl=30))
        assert after is not None and after.token > token
        assert await store.leases.release(after)
        token = after.token
    async with open_spec_store(spec) as fresh:
        await _check_after_restart(fresh, token, generations, kept)
        await fresh.clear()


@pytest.mark.redis
async def test_tokens_and_generations_grow_across_a_redis_restart_with_aof(
    fleetmem_redis_factory: Callable[..., RedisServer], fleetmem_namespace: str
) -> None:
    """Redis keeps the promise as far as its persistence does: with appendonly (fsync always)
    a kill -9 and a restart keep tokens and generations growing."""
    server = fleetmem_redis_factory(appendonly=True)
    spec = {"backend": "redis", "url": server.url, "namespace": fleetmem_namespace}
    try:
        async with open_spec_store(spec) as store:
            token, generations, kept = await _state_before_restart(store)
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            await retrying(lambda: store.get("fenced"))
        async with open_spec_store(spec) as fresh:
            await _check_after_restart(fresh, token, generations, kept)
            await fresh.clear()
    finally:
        server.close()


@pytest.mark.postgres
async def test_a_lock_outlives_a_postgres_outage_shorter_than_its_ttl(
    pg_victim: PostgresServer, fleetmem_namespace: str
) -> None:
    """A lock() whose renewals fail for a moment (PostgreSQL killed and started again, well
    within the TTL) keeps its lease: same token, a later expiry, fenced writes still work."""
    spec = {"backend": "postgres", "dsn": pg_victim.dsn, "namespace": fleetmem_namespace}
    ttl = 9.0
    async with open_spec_store(spec) as store:
        async with store.leases.lock("R", owner="o", ttl=ttl) as held:
            first = held.lease
            await store.set("k", 1, fence=held)
            await asyncio.to_thread(pg_victim.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(pg_victim.start)
            # Two renewal periods (ttl/3) after the outage: renewed again since.
            await asyncio.sleep(2 * ttl / 3 + 0.5)
            assert not held.lost.is_set()
            assert held.lease.token == first.token
            assert held.lease.expires_at > first.expires_at
            await retrying(lambda: store.set("k", 2, fence=held))
            current = await store.leases.holder("R")
            assert current is not None and current.token == first.token
        assert await store.leases.holder("R") is None  # released on exit
        assert await store.get("k") == 2
        await store.clear()


@pytest.mark.postgres
async def test_a_lock_whose_renewals_fail_past_its_ttl_is_lost(
    pg_victim: PostgresServer, fleetmem_namespace: str
) -> None:
    """PostgreSQL down for longer than a lock()'s TTL: ``lost`` is set, the lease expired on
    the server's clock and goes to the next acquirer with a greater token, and every fenced
    write with the old one is refused (by the front end and by the server)."""
    from fleetmem.backends.postgres import PostgresStore

    store = PostgresStore.from_url(pg_victim.dsn, namespace=fleetmem_namespace, acquire_timeout=1.0)
    async with store:
        async with store.leases.lock("R", owner="o", ttl=TTL) as held:
            await store.set("k", "mine", fence=held)
            down_at = time.monotonic()
            await asyncio.to_thread(pg_victim.stop, "immediate")
            try:
                await asyncio.wait_for(held.lost.wait(), TTL + LATE + 1.0)
                lost_after = time.monotonic() - down_at
            finally:
                await asyncio.to_thread(pg_victim.start)
            with pytest.raises(LeaseLostError):
                await store.set("k", "stale", fence=held)  # refused before any I/O
            with pytest.raises(LeaseLostError):
                await retrying(lambda: store.set("k", "stale", fence=held.lease))  # by the server
            taken = await retrying(lambda: store.leases.acquire("R", owner="next", ttl=30))
            assert taken is not None and taken.token > held.lease.token
        # The exit raised nothing, and did not free the new holder's lease.
        current = await store.leases.holder("R")
        assert current is not None and current.token == taken.token
        assert await store.get("k") == "mine"
        print(f"lock() lost {lost_after:.3f} s after PostgreSQL went down (TTL {TTL} s)")
        assert lost_after >= TTL - SLACK, lost_after
        await store.clear()


# ---------------------------------------------------------------- the LISTEN connection killed


#: The waiting store's application name: its backends are found by it.
WAITER_APP = "fleetmem-lease-waiter"


async def _listener_pids(admin: Any) -> list[int]:
    """The waiting store's listening connections: their last statement was the ``LISTEN`` or a
    ``NOTIFY`` (the probe a listener sends itself); the pool's were lease statements."""
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 "
        "AND (query ILIKE 'LISTEN%' OR query ILIKE 'NOTIFY%')",
        WAITER_APP,
    )
    return [int(row["pid"]) for row in rows]


async def _terminate(admin: Any, pids: list[int]) -> None:
    await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)


async def _release_wakes_waiter(
    owner: Any, waiter: Any, meanwhile: Callable[[], Awaitable[None]] | None = None
) -> float:
    """Seconds from a release by ``owner`` to the grant of ``waiter``'s waiting acquire.

    The waiter starts waiting 0.3 s before the release, while ``owner`` holds the lease for
    60 s: its next poll is 1 s after it began, so a grant well before that came from a
    notification. ``meanwhile()`` runs while the waiter waits, before the release."""
    held = await owner.leases.acquire("L", owner="owner", ttl=60)
    assert held is not None
    waiting = asyncio.create_task(waiter.leases.acquire("L", owner="waiter", wait=60))
    await asyncio.sleep(0.3)
    if meanwhile is not None:
        await meanwhile()
    assert not waiting.done()
    released_at = time.monotonic()
    assert await owner.leases.release(held)
    got = await asyncio.wait_for(waiting, 60)
    lag = time.monotonic() - released_at
    assert got is not None and got.token > held.token
    assert await waiter.leases.release(got)
    return lag


@pytest.mark.postgres
async def test_a_waiter_survives_the_loss_of_its_listen_connection(
    pg_victim: PostgresServer, fleetmem_namespace: str
) -> None:
    """The waiter's LISTEN connection is terminated (pg_terminate_backend) while the database
    refuses new connections, so it cannot listen again: the waiting acquire still gets the
    lease after the release, by polling. Once connections are allowed again, the store
    listens again: a release wakes a waiter well before its next poll."""
    asyncpg = pytest.importorskip("asyncpg")
    from fleetmem.backends.postgres import PostgresStore

    spec = {"backend": "postgres", "dsn": pg_victim.dsn, "namespace": fleetmem_namespace}
    admin = await retrying(lambda: asyncpg.connect(pg_victim.dsn_for("template1"), timeout=10))
    # Two pooled connections opened up front: the pool needs no new one while the database
    # refuses them; only the listener does.
    waiter_store = PostgresStore.from_url(
        pg_victim.dsn,
        namespace=fleetmem_namespace,
        min_size=2,
        max_size=2,
        server_settings={"application_name": WAITER_APP},
    )
    database = pg_victim.database
    try:
        async with waiter_store as waiter, open_spec_store(spec) as owner:
            poll = waiter.leases.backend.poll_interval
            assert poll <= 1.0  # the contract: a poll at least once a second
            listening = await _release_wakes_waiter(owner, waiter)
            pids = await _listener_pids(admin)
            assert pids, "the waiter does not listen"

            await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
            try:
                await _terminate(admin, pids)
                await asyncio.sleep(0.5)
                assert await _listener_pids(admin) == []
                polling = await _release_wakes_waiter(owner, waiter)
                assert await _listener_pids(admin) == []  # it was polling indeed
            finally:
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
            assert polling <= poll + LATE, polling

            # The listener comes back by itself (its reconnect backoff is at most 5 s).
            deadline = time.monotonic() + 30
            while not (back := await _listener_pids(admin)):
                assert time.monotonic() < deadline, "the waiter never listened again"
                await asyncio.sleep(0.1)
            assert not set(back) & set(pids)
            again = await _release_wakes_waiter(owner, waiter)
            print(
                f"release -> grant: {listening:.3f} s listening, {polling:.3f} s with the "
                f"listener gone (poll {poll} s), {again:.3f} s listening again"
            )
            # Woken by the notification, not by the poll 0.7 s after the release.
            assert listening < 0.5, listening
            assert again < 0.5, again
            await waiter.clear()
    finally:
        await admin.close()


#: ACL rules that refuse every kind of SUBSCRIBE and nothing else (PUBLISH still works).
DENY_SUBSCRIBE = ("-subscribe", "-psubscribe", "-ssubscribe")


async def _acl(admin: Any, *rules: str) -> None:
    await admin.execute_command("ACL", "SETUSER", "default", *rules)


@pytest.fixture
async def redis_acl_victim(
    fleetmem_redis_factory: Callable[..., RedisServer],
) -> AsyncIterator[tuple[RedisServer, Any]]:
    """A Redis of this test's own and an admin client on it."""
    import redis.asyncio as aioredis

    server = fleetmem_redis_factory()
    admin = aioredis.Redis.from_url(server.url)
    try:
        yield server, admin
    finally:
        await admin.aclose()
        server.close()


@pytest.mark.redis
async def test_a_waiter_survives_the_loss_of_its_redis_subscription(
    redis_acl_victim: tuple[RedisServer, Any], fleetmem_namespace: str
) -> None:
    """While a waiter waits, the server starts refusing SUBSCRIBE (an ACL) and its pub/sub
    connection is killed (CLIENT KILL TYPE pubsub), so it cannot subscribe again: it still
    gets the lease after the release, by polling. Once SUBSCRIBE is allowed again the store
    subscribes again by itself, and a release wakes a waiter well before its next poll."""
    from fleetmem.backends.redis import RedisStore

    server, admin = redis_acl_victim
    ns = fleetmem_namespace
    async with (
        RedisStore.from_url(server.url, namespace=ns) as waiter,
        RedisStore.from_url(server.url, namespace=ns) as owner,
    ):
        poll = waiter.leases.backend.poll_interval
        assert poll <= 1.0
        listening = await _release_wakes_waiter(owner, waiter)
        assert await admin.client_list(_type="pubsub"), "the waiter does not subscribe"

        async def lose_the_subscription() -> None:
            await _acl(admin, *DENY_SUBSCRIBE)
            assert await admin.client_kill_filter(_type="pubsub") >= 1
            await asyncio.sleep(0.5)
            assert await admin.client_list(_type="pubsub") == []

        try:
            polling = await _release_wakes_waiter(owner, waiter, lose_the_subscription)
            assert await admin.client_list(_type="pubsub") == []  # it polled indeed
        finally:
            await _acl(admin, "+@all")
        assert polling <= poll + LATE, polling

        deadline = time.monotonic() + 30
        while not await admin.client_list(_type="pubsub"):
            assert time.monotonic() < deadline, "the waiter never subscribed again"
            await asyncio.sleep(0.1)
        again = await _release_wakes_waiter(owner, waiter)
        print(
            f"release -> grant: {listening:.3f} s subscribed, {polling:.3f} s with no "
            f"subscription (poll {poll} s), {again:.3f} s subscribed again"
        )
        assert listening < 0.5, listening
        assert again < 0.5, again
        await waiter.clear()


@pytest.mark.redis
async def test_a_waiting_acquire_of_a_free_lease_is_not_held_up_without_a_subscription(
    redis_acl_victim: tuple[RedisServer, Any], fleetmem_namespace: str
) -> None:
    """With no subscription possible (SUBSCRIBE refused), acquire(wait=...) still tries
    within a poll interval: a free lease is not held up by a wait for the subscription
    longer than the contract's poll (it once waited the store's 2 s timeout every time)."""
    from fleetmem.backends.redis import RedisStore

    server, admin = redis_acl_victim
    await _acl(admin, *DENY_SUBSCRIBE)
    async with RedisStore.from_url(server.url, namespace=fleetmem_namespace) as store:
        poll = store.leases.backend.poll_interval
        took = []
        for _ in range(3):
            started = time.monotonic()
            lease = await store.leases.acquire("free", owner="a", ttl=30, wait=30)
            took.append(time.monotonic() - started)
            assert lease is not None
            assert await store.leases.release(lease)
        assert await admin.client_list(_type="pubsub") == []
        print(f"free lease, acquire(wait=30) without a subscription: {took}")
        # The contract: a poll at least once a second (plus slack for a loaded machine).
        assert max(took) < poll + 0.5, took
