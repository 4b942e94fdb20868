"""Leases, fenced writes and agents on PostgreSQL beyond the conformance suite: the LISTEN
wake-up from another connection, the fence against a takeover racing a blocked write, the
schema and table settings, the plans of fenced statements, tokens across a server restart.
Every test talks to a real server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from fleetmem import LeaseLostError

pytestmark = pytest.mark.postgres

asyncpg = pytest.importorskip("asyncpg")

from fleetmem.backends.postgres import PostgresStore, init_connection  # noqa: E402
from fleetmem.backends.postgres.connector import statements  # noqa: E402
from fleetmem.backends.postgres.kv import fenced_statement  # noqa: E402
from fleetmem.backends.postgres.leases import Listener  # noqa: E402


async def _fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def two_stores(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database and namespace with connectors (pools, notifiers) of their
    own: what two processes see."""
    async with (
        PostgresStore.from_url(fleetmem_postgres_database, namespace=fleetmem_namespace) as one,
        PostgresStore.from_url(fleetmem_postgres_database, namespace=fleetmem_namespace) as two,
    ):
        yield one, two


# ------------------------------------------------------------------------------ LISTEN


async def test_a_release_on_another_connection_wakes_the_waiter_through_listen(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    waiting_store, holding_store = two_stores
    # Polling would take a minute: only the notification can wake the waiter in time.
    backend = waiting_store.leases.backend
    backend.poll_interval = 60.0  # type: ignore[misc]
    held = await holding_store.leases.acquire("build", owner="holder", ttl=60)
    assert held is not None
    waiter = asyncio.create_task(
        waiting_store.leases.acquire("build", owner="waiter", ttl=60, wait=30)
    )
    notifier = waiting_store.kv.connector.notifier
    await _until(lambda: notifier.watching((waiting_store.namespace, "build")))
    listener = waiting_store.kv.connector.listener
    assert isinstance(listener, Listener) and listener.listening
    released_at = time.monotonic()
    assert await holding_store.leases.release(held)
    lease = await asyncio.wait_for(waiter, 30)
    latency = time.monotonic() - released_at
    assert lease is not None and lease.owner == "waiter" and lease.token == held.token + 1
    assert latency < 5.0, latency  # the contract's 100 ms, with room for a loaded host


async def test_the_waiter_of_another_name_is_not_granted(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    waiting_store, holding_store = two_stores
    held = await holding_store.leases.acquire("a", owner="h", ttl=60)
    other = await holding_store.leases.acquire("b", owner="h", ttl=60)
    assert held is not None and other is not None
    assert await waiting_store.leases.acquire("b", owner="w", ttl=60, wait=0.3) is None
    assert await holding_store.leases.release(held)
    assert await waiting_store.leases.acquire("b", owner="w", ttl=60, wait=0.3) is None


async def test_a_lost_listening_connection_is_replaced_and_waiters_still_get_the_lease(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    waiting_store, holding_store = two_stores
    held = await holding_store.leases.acquire("job", owner="h", ttl=60)
    assert held is not None
    await waiting_store.leases.backend.listen()
    listener = waiting_store.kv.connector.listener
    assert isinstance(listener, Listener) and listener.listening
    channel = waiting_store.kv.connector.channel
    killed = await _fetch(
        fleetmem_postgres_database,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND query LIKE 'NOTIFY \"' || $1 || '\"%'",
        channel,
    )
    assert [r[0] for r in killed] == [True]
    waiter = asyncio.create_task(waiting_store.leases.acquire("job", owner="w", ttl=60, wait=30))
    await asyncio.sleep(0.2)
    assert await holding_store.leases.release(held)
    lease = await asyncio.wait_for(waiter, 30)
    assert lease is not None and lease.token == held.token + 1
    await _until(lambda: listener.listening)  # reconnected
    assert listener.problem is None


async def test_waiters_poll_when_notifications_are_not_delivered(
    two_stores: tuple[PostgresStore, PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a transaction-mode pooler does to LISTEN: it is accepted and nothing arrives. The
    probe notification does not come back, a warning says so once, and waiters fall back to
    polling once a second."""
    from fleetmem.backends.postgres import leases as pg_leases

    monkeypatch.setattr(pg_leases, "_PROBE_TIMEOUT", 0.5)
    monkeypatch.setattr(Listener, "_on_notify", lambda self, *args: None)  # nothing arrives
    waiting_store, holding_store = two_stores
    held = await holding_store.leases.acquire("job", owner="h", ttl=60)
    assert held is not None
    waiter = asyncio.create_task(waiting_store.leases.acquire("job", owner="w", ttl=60, wait=30))
    await _until(lambda: getattr(waiting_store.kv.connector.listener, "undelivered", False))
    listener = waiting_store.kv.connector.listener
    assert not listener.listening and "not delivered" in (listener.problem or "")
    assert await holding_store.leases.release(held)
    released_at = time.monotonic()
    lease = await asyncio.wait_for(waiter, 30)
    assert lease is not None and lease.token == held.token + 1
    assert time.monotonic() - released_at < 10.0  # one poll (1 s), with room for the host
    warnings = [r for r in caplog.records if "LISTEN unavailable" in r.getMessage()]
    assert len(warnings) == 1
    # Later waits poll at once, without trying to listen again.
    assert await waiting_store.leases.acquire("job", owner="x", ttl=60, wait=0.2) is None
    assert waiting_store.kv.connector.listener is listener and listener.undelivered


async def test_an_injected_pool_lends_the_listener_a_connection_only_while_waiting(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    pool = await asyncpg.create_pool(
        fleetmem_postgres_database, min_size=1, max_size=3, init=init_connection
    )
    try:
        store = PostgresStore(pool=pool, namespace=fleetmem_namespace)
        await store.connect()
        other = await store.leases.acquire("x", owner="a", ttl=60)
        assert other is not None
        assert await store.leases.acquire("x", owner="b", ttl=60, wait=0.2) is None
        listener = store.kv.connector.listener
        assert isinstance(listener, Listener)
        await _until(lambda: pool.get_idle_size() == pool.get_size())  # given back
        assert not listener.listening
        # The caller's pool closes at once: the store holds none of its connections.
        await asyncio.wait_for(pool.close(), 10)
        await store.close()
    finally:
        pool.terminate()


# ------------------------------------------------------------------------------ fences


async def test_a_takeover_waits_for_a_fenced_write_blocked_on_the_entry(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    """The READ COMMITTED hole a fence must close: the old holder's write passes its check,
    then waits for the entry's row lock; meanwhile its lease expires and a new holder takes it
    and writes the key. Holding the lease row FOR SHARE until the write commits keeps the
    lease from being granted before then, so the new holder's write is the last one."""
    old_store, new_store = two_stores
    ns = old_store.namespace
    await old_store.set("report", "initial")
    old = await old_store.leases.acquire("writer", owner="old", ttl=1.5)
    assert old is not None
    blocker = await asyncpg.connect(fleetmem_postgres_database)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM fleetmem.entries WHERE namespace = $1 AND key = 'report' FOR UPDATE",
            ns,
        )
        late_write = asyncio.create_task(old_store.set("report", "old", fence=old))
        # The old write has passed its check and waits for the entry's row lock.
        await _until_waiting(fleetmem_postgres_database, "fleetmem.entries")
        # While the lease is live, a refused acquire answers at once: it takes no lock.
        refused = new_store.leases.acquire("writer", owner="new", ttl=30)
        assert await asyncio.wait_for(refused, 10) is None
        left = (old.expires_at - datetime.now(timezone.utc)).total_seconds()
        await asyncio.sleep(max(0.0, left) + 0.3)
        # Expired, but not grantable while the write is in flight: refused at once, and a
        # waiter keeps trying until the write has landed.
        refused = new_store.leases.acquire("writer", owner="new", ttl=30)
        assert await asyncio.wait_for(refused, 10) is None
        takeover = asyncio.create_task(
            new_store.leases.acquire("writer", owner="new", ttl=30, wait=60)
        )
        await asyncio.sleep(0.5)
        assert not takeover.done()  # still refused, whatever the host's speed
        await tx.rollback()
        await asyncio.wait_for(late_write, 30)
        new = await asyncio.wait_for(takeover, 30)
        assert new is not None and new.token == old.token + 1
        await new_store.set("report", "new", fence=new)
        assert await old_store.get("report") == "new"
        with pytest.raises(LeaseLostError):
            await old_store.set("report", "old again", fence=old)
        assert await new_store.get("report") == "new"
    finally:
        await blocker.close()


async def test_an_acquire_does_not_wait_for_a_fenced_write_that_holds_an_expired_lease(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    """An old holder's fenced write, blocked on an entry's row lock, holds the lease row FOR
    SHARE past the lease's expiry. An acquire must not queue behind it: without ``wait`` it
    returns None at once; with ``wait`` it keeps trying and, once the write has landed, gets a
    lease stamped when it was granted -- not an expiry computed from when it started waiting."""
    old_store, new_store = two_stores
    ns = old_store.namespace
    await old_store.set("report", "initial")
    blocker = await asyncpg.connect(fleetmem_postgres_database)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM fleetmem.entries WHERE namespace = $1 AND key = 'report' FOR UPDATE",
            ns,
        )
        old = await old_store.leases.acquire("writer", owner="old", ttl=1)
        assert old is not None
        late_write = asyncio.create_task(old_store.set("report", "old", fence=old))
        await _until_waiting(fleetmem_postgres_database, "fleetmem.entries")
        await _until_expired(new_store, "writer")
        # Not grantable now (the row is locked by the write in flight): None, at once.
        started = time.monotonic()
        refused = new_store.leases.acquire("writer", owner="new", ttl=1)
        assert await asyncio.wait_for(refused, 10) is None
        assert time.monotonic() - started < 1.0  # "at once": one round trip, on a loaded host
        # A short wait runs out like any other, the write still blocked.
        brief = new_store.leases.acquire("writer", owner="new", ttl=1, wait=0.3)
        assert await asyncio.wait_for(brief, 10) is None
        assert not late_write.done()
        waiter = asyncio.create_task(
            new_store.leases.acquire("writer", owner="new", ttl=1, wait=30)
        )
        await asyncio.sleep(1.5)  # longer than the waiter's TTL
        assert not waiter.done()
        await tx.commit()
        await asyncio.wait_for(late_write, 30)  # the old write lands before the grant
        new = await asyncio.wait_for(waiter, 30)
        assert new is not None and new.token == old.token + 1
        server_now = (await _fetch(fleetmem_postgres_database, "SELECT clock_timestamp()"))[0][0]
        assert new.expires_at > server_now, (new, server_now)
        assert new.acquired_at < new.expires_at
        holder = await new_store.leases.holder("writer")
        assert holder is not None and holder.token == new.token
        assert await new_store.set("report", "new", fence=new)
        assert await old_store.get("report") == "new"
    finally:
        await blocker.close()


async def test_a_renewal_that_waits_past_the_expiry_finds_the_lease_lost(
    two_stores: tuple[PostgresStore, PostgresStore], fleetmem_postgres_database: str
) -> None:
    """A renewal waits for the holder's fenced writes in flight (they hold the lease row FOR
    SHARE); if the lease expires meanwhile it is lost, as for a renewal asked after the expiry,
    and not revived with an expiry counted from before the wait."""
    store, _ = two_stores
    ns = store.namespace
    await store.set("report", "initial")
    blocker = await asyncpg.connect(fleetmem_postgres_database)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "SELECT 1 FROM fleetmem.entries WHERE namespace = $1 AND key = 'report' FOR UPDATE",
            ns,
        )
        lease = await store.leases.acquire("writer", owner="o", ttl=1)
        assert lease is not None
        late_write = asyncio.create_task(store.set("report", "late", fence=lease))
        await _until_waiting(fleetmem_postgres_database, "fleetmem.entries")
        renewal = asyncio.create_task(store.leases.renew(lease, ttl=30))
        await _until_expired(store, "writer")
        await asyncio.sleep(0.2)
        assert not renewal.done()  # it waits for the write
        await tx.commit()
        await asyncio.wait_for(late_write, 30)
        with pytest.raises(LeaseLostError):
            await asyncio.wait_for(renewal, 30)
        assert await store.leases.holder("writer") is None
        assert await store.get("report") == "late"
    finally:
        await blocker.close()


async def test_an_acquire_that_is_refused_takes_no_row_lock(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A refused acquire locks no row, so it writes nothing (a polling waiter writes no WAL):
    a lease live in its snapshot is not tried; an expired one whose row another transaction
    holds (the old holder's fenced writes in flight) is skipped, and refused at once."""
    dsn = fleetmem_postgres_database
    ns = fleetmem_namespace
    acquire = statements("leases.sql", "fleetmem", "entries")["acquire"]
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        live = await store.leases.acquire("live", owner="o", ttl=60)
        gone = await store.leases.acquire("gone", owner="o", ttl=0.001)
        assert live is not None and gone is not None
        await _until_expired(store, "gone")
    conn = await asyncpg.connect(dsn)
    holder = await asyncpg.connect(dsn)
    try:

        async def attempt(name: str) -> tuple[Any, Any]:
            """What the acquire statement returns, and whether it got a transaction id (which
            locking or writing a row takes), in a transaction rolled back after."""
            tx = conn.transaction()
            await tx.start()
            try:
                row = await conn.fetchrow(acquire, ns, name, "new", 60_000)
                return row, await conn.fetchval("SELECT txid_current_if_assigned()")
            finally:
                await tx.rollback()

        row, xid = await attempt("live")
        assert row[0] is None and 0 < row[3] <= 60_000 and xid is None
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM fleetmem.entries_leases WHERE namespace = $1 AND name = 'gone' "
                "FOR SHARE",
                ns,
            )
            row, xid = await asyncio.wait_for(attempt("gone"), 10)
            assert row[0] is None and row[3] == 20 and xid is None  # "try again soon"
        row, xid = await attempt("gone")  # the row is free again: granted
        assert row[0] == gone.token + 1 and xid is not None
    finally:
        await conn.close()
        await holder.close()


async def _until_expired(store: PostgresStore, name: str, timeout: float = 20.0) -> None:
    """Until lease ``name`` has no live holder on the server's clock."""
    deadline = time.monotonic() + timeout
    while await store.leases.holder(name) is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.05)


async def _until_waiting(dsn: str, relation: str, timeout: float = 20.0) -> None:
    """Until some session waits for a row lock (a transaction id) on ``relation``'s row."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await _fetch(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
            relation.split(".")[-1],
        )
        if rows[0][0] >= 1:
            return
        assert time.monotonic() < deadline, "the fenced write never waited"
        await asyncio.sleep(0.02)


async def test_every_fenced_write_is_refused_after_a_takeover_and_changes_nothing(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    store, other = two_stores
    await store.set_many({"a": 1, "b": 2, "s": "text"})
    old = await store.leases.acquire("l", owner="o", ttl=30)
    assert old is not None
    assert await store.leases.release(old)
    new = await other.leases.acquire("l", owner="n", ttl=30)
    assert new is not None
    writes = [
        store.set("a", 9, fence=old),
        store.set_many({"a": 9, "z": 9}, fence=old),
        store.set_many({f"m{i}": i for i in range(3000)}, fence=old),  # several chunks
        store.set_if_absent("new", 9, fence=old),
        store.compare_and_set("a", 9, version=999, fence=old),  # a lost lease wins
        store.incr("s", 1, fence=old),  # over "not a number"
        store.incr("a", 1, fence=old),
        store.delete("a", fence=old),
        store.delete("absent", fence=old),
        store.delete_many(["a", "b"], fence=old),
    ]
    for write in writes:
        with pytest.raises(LeaseLostError, match=r"'l'.*token 1"):
            await write
    assert await store.get_many(["a", "b", "s", "new", "z", "m0"]) == {"a": 1, "b": 2, "s": "text"}
    assert await store.set("a", 10, fence=new)
    assert await store.set_many({f"m{i}": i for i in range(3000)}, fence=new) == 3000
    assert await store.get("a") == 10


async def test_a_large_fenced_set_many_with_a_lost_lease_fails_before_streaming(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """A fenced set_many whose first chunk is large checks its lease before the COPY: with the
    lease lost, no chunk after the first is even encoded. A small one is checked by its
    upsert alone. Either way nothing is written."""
    from fleetmem.backends.seam import Fence

    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace
    ) as store:
        lease = await store.leases.acquire("l", owner="o", ttl=30)
        assert lease is not None
        assert await store.leases.release(lease)
        pulled = 0

        def chunks(size: int, count: int) -> Iterator[list[tuple[str, bytes]]]:
            nonlocal pulled
            for c in range(count):
                pulled += 1
                yield [(f"k{c}-{i}", b"1") for i in range(size)]

        fence = Fence(lease.name, lease.token)
        with pytest.raises(LeaseLostError, match=r"'l'.*token 1"):
            await store.kv.set_many(chunks(1000, 5), None, None, fence)
        assert pulled == 1
        pulled = 0
        with pytest.raises(LeaseLostError, match=r"'l'.*token 1"):
            await store.kv.set_many(chunks(10, 3), None, None, fence)
        assert pulled == 3
        assert await store.keys() == []
        again = await store.leases.acquire("l", owner="o", ttl=30)
        assert again is not None
        fence = Fence(again.name, again.token)
        assert await store.kv.set_many(chunks(1000, 3), None, None, fence) == 3000
        assert len(await store.keys()) == 3000


async def test_fenced_statements_use_the_primary_key(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    dsn = fleetmem_postgres_database
    ns = fleetmem_namespace
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        await store.set_many({f"k{i:05}": i for i in range(5000)})
        lease = await store.leases.acquire("l", owner="o", ttl=60)
        assert lease is not None
    q = statements("kv.sql", "fleetmem", "entries")
    fence = '"fleetmem"."entries_fence"'
    cases = {
        "set": (ns, "k00001", b"1", None, None, False),
        "set_if_absent": (ns, "k00001", b"1", None, None),
        "compare_and_set": (ns, "k00001", b"1", None, None, 1),
        "incr": (ns, "k00001", "1", None, None, False),
        "delete": (ns, "k00001"),
        "delete_many": (ns, ["k00001", "k00002"]),
    }
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE fleetmem.entries")
        await init_connection(conn)
        for name, args in cases.items():
            sql = fenced_statement(q[name], fence)
            assert '"entries_fence"($1, $' in sql
            rows = await conn.fetch("EXPLAIN " + sql, *args, "l", lease.token)
            plan = "\n".join(r[0] for r in rows)
            assert "InitPlan" in plan, plan
            assert "entries_pkey" in plan, plan
            if not sql.startswith("INSERT"):
                # Checked before the scan starts, also when no row matches.
                assert "One-Time Filter" in plan, plan
            assert "Seq Scan" not in plan, plan
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ schema


async def test_a_custom_schema_and_table_have_their_own_leases_and_agents(
    fleetmem_postgres_empty_database: str,
) -> None:
    dsn = fleetmem_postgres_empty_database
    async with (
        PostgresStore.from_url(dsn, namespace="n", schema="coord", table="kv") as custom,
        PostgresStore.from_url(dsn, namespace="n") as default,
    ):
        a = await custom.leases.acquire("l", owner="custom", ttl=30)
        b = await default.leases.acquire("l", owner="default", ttl=30)
        assert a is not None and b is not None and a.token == b.token == 1
        assert await default.leases.release(b)
        b = await default.leases.acquire("l", owner="default", ttl=30)
        assert b is not None and b.token == 2
        await custom.set("k", "custom", fence=a)
        with pytest.raises(LeaseLostError):  # the fence is checked in its own table
            await default.set("k", "default", fence=a)
        await custom.agents.register("agent", info={"t": "custom"}, ttl=30)
        assert await default.agents.count() == 0
        assert custom.kv.connector.channel != default.kv.connector.channel
        waiter = asyncio.create_task(default.leases.acquire("l", owner="w", ttl=30, wait=30))
        await asyncio.sleep(0.2)
        assert await custom.leases.release(a)  # another table's release wakes nobody here
        assert await default.leases.release(b)
        granted = await asyncio.wait_for(waiter, 30)
        assert granted is not None and granted.token == 3
    rows = await _fetch(
        dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'coord' "
        "ORDER BY table_name",
    )
    assert [r[0] for r in rows] == [
        "alembic_version_kv",
        "kv",
        "kv_agents",
        "kv_changes",
        "kv_feeds",
        "kv_jobs",
        "kv_jobs_awaited",
        "kv_leases",
        "kv_snapshot_records",
        "kv_snapshots",
    ]
    rows = await _fetch(dsn, "SELECT owner, token FROM coord.kv_leases")
    assert [tuple(r) for r in rows] == [("custom", 1)]


async def test_agent_ids_list_in_code_point_order_for_any_unicode(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    ids = ["a", "a\U0010ffff", "a\uffff", "a\ue000", "ab", "b", "é", "\U0001f600x", "A"]
    async with PostgresStore.from_url(
        fleetmem_postgres_database, namespace=fleetmem_namespace
    ) as store:
        for agent_id in ids:
            await store.agents.register(agent_id, info={}, ttl=30)
        assert [a.id for a in await store.agents.list()] == sorted(ids)
        assert [a.id for a in await store.agents.list(prefix="a")] == sorted(
            i for i in ids if i.startswith("a")
        )
        page = await store.agents.list(prefix="a", after="a\ue000", limit=2)
        assert [a.id for a in page] == ["a\uffff", "a\U0010ffff"]


async def test_tokens_and_generations_grow_across_a_server_restart(
    fleetmem_postgres_factory: Any,
) -> None:
    server = fleetmem_postgres_factory(durable=True)
    async with PostgresStore.from_url(server.dsn, namespace="n") as store:
        first = await store.leases.acquire("l", owner="o", ttl=0.05)
        assert first is not None
        agent = await store.agents.register("a", info={}, ttl=0.05)
    await asyncio.to_thread(server.restart)
    await asyncio.sleep(0.1)
    async with PostgresStore.from_url(server.dsn, namespace="n") as store:
        second = await store.leases.acquire("l", owner="o", ttl=30)
        assert second is not None and second.token > first.token
        again = await store.agents.register("a", info={}, ttl=30)
        assert again.generation > agent.generation


async def test_the_least_privilege_grants_from_the_docs_cover_leases_and_agents(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    dsn = fleetmem_postgres_database
    database = urlsplit(dsn).path.lstrip("/")
    role = "fm_coord_" + fleetmem_namespace.replace("-", "_").lower()[:40]
    await _fetch(dsn, f'CREATE ROLE "{role}" LOGIN')
    try:
        for grant in (
            f'GRANT USAGE ON SCHEMA fleetmem TO "{role}"',
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries TO "{role}"',
            "GRANT SELECT, INSERT, UPDATE ON fleetmem.entries_leases, fleetmem.entries_agents "
            f'TO "{role}"',
            f'GRANT EXECUTE ON FUNCTION fleetmem.entries_fence(text, text, bigint) TO "{role}"',
            # Every write looks its namespace's change feed up (migration 0005).
            "GRANT SELECT, INSERT, UPDATE, DELETE ON fleetmem.entries_feeds, "
            f'fleetmem.entries_changes TO "{role}"',
            f'GRANT SELECT ON fleetmem.alembic_version TO "{role}"',
            f'GRANT TEMPORARY ON DATABASE "{database}" TO "{role}"',
        ):
            await _fetch(dsn, grant)
        parts = urlsplit(dsn)
        app_dsn = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        async with PostgresStore.from_url(app_dsn, namespace="lp", auto_migrate=False) as store:
            lease = await store.leases.acquire("l", owner="o", ttl=30)
            assert lease is not None
            await store.set("k", 1, fence=lease)
            assert await store.set_many({"a": 1}, fence=lease) == 1
            assert await store.delete("k", fence=lease)
            assert await store.leases.renew(lease)
            assert await store.leases.release(lease)
            assert await store.leases.acquire("l", owner="o", ttl=30, wait=0.1) is not None
            await store.agents.register("a", info={}, ttl=30)
            assert await store.agents.count() == 1
    finally:
        await _fetch(dsn, f'DROP OWNED BY "{role}"')
        await _fetch(dsn, f'DROP ROLE "{role}"')


async def test_the_fence_is_judged_when_the_write_starts_not_when_its_transaction_did(
    fleetmem_postgres_database: str, fleetmem_namespace: str
) -> None:
    """set_many writes at the end of a transaction (after its COPY): a lease that expired
    meanwhile must fail the fence, though it was live at the transaction's start."""
    dsn = fleetmem_postgres_database
    ns = fleetmem_namespace
    async with PostgresStore.from_url(dsn, namespace=ns) as store:
        lease = await store.leases.acquire("slow-copy", owner="o", ttl=0.5)
        assert lease is not None
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                live = await conn.fetchval(
                    "SELECT fleetmem.entries_fence($1, $2, $3)", ns, lease.name, lease.token
                )
                assert live == ns  # live at the transaction's start
                await asyncio.sleep(1.0)  # the lease runs out, as during a long COPY
                with pytest.raises(asyncpg.PostgresError) as raised:
                    await conn.fetchval(
                        "SELECT fleetmem.entries_fence($1, $2, $3)", ns, lease.name, lease.token
                    )
                assert raised.value.sqlstate == "FL001"
        finally:
            await conn.close()
        # The same through the store: the lease is gone, a fenced set_many changes nothing.
        with pytest.raises(LeaseLostError):
            await store.set_many({f"k{i}": i for i in range(2000)}, fence=lease)
        assert await store.keys("k", limit=1) == []
