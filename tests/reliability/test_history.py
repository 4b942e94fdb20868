"""Jepsen-style histories under faults, on servers the harness started for these tests.

Each scenario runs several spawned worker processes against real servers (see
``fleetmem.testing.history``): one writer per key writing 1, 2, 3, ..., readers in other
processes, every operation recorded with its invoke and complete times. A nemesis in this
process injects the faults (a TCP proxy, kill -9, restarts) while they run. Afterwards the
checker asserts 0 stale reads, 0 lost writes (each key read after the run holds at least its
last acknowledged value) and 0 impossible values, and prints one summary line per scenario
(``-s``). Numbers and commands: docs/reliability.md.

Faults only ever hit servers from ``fleetmem_postgres_factory`` / ``fleetmem_redis_factory``
or a proxy of the test's own; the shared servers are only used through proxies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest

from fleetmem.testing.history import (
    History,
    HistoryReport,
    Nemesis,
    NemesisFn,
    Op,
    StoreSpec,
    WorkerSpec,
    check_history,
    read_final,
    run_history,
)
from fleetmem.testing.proxy import TcpProxy
from fleetmem.testing.servers import PostgresServer, RedisServer

pytest.importorskip("asyncpg")
pytest.importorskip("redis")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ProxyFactory = Callable[[str, int], Awaitable[TcpProxy]]

#: The bug-A scenario's hybrid option: readers trust their cache only while they confirmed
#: the durable epoch within this many seconds; a writer that cannot reach Redis waits it out.
TRUST_WINDOW = 0.2

#: The workers stop this long after the nemesis is done (after its last fault healed)...
TAIL = 2.5
#: ... and in any case this long after the start, or after MAX_OPS operations per process.
SECONDS = 40.0
MAX_OPS = 20_000


def cross_layout(
    spec_for: Callable[[int], StoreSpec],
    *,
    processes: int = 3,
    keys_per_process: int = 4,
    clients: int = 2,
    seconds: float = SECONDS,
    max_ops: int = MAX_OPS,
) -> list[WorkerSpec]:
    """Each process writes keys of its own and reads the keys of every other process."""
    keys = [tuple(f"p{i}-k{j}" for j in range(keys_per_process)) for i in range(processes)]
    return [
        WorkerSpec(
            spec_for(i),
            write_keys=keys[i],
            read_keys=tuple(k for j, ks in enumerate(keys) if j != i for k in ks),
            clients=clients,
            max_ops=max_ops,
            seconds=seconds,
            pause=0.002,
            op_timeout=15.0,
            seed=i,
        )
        for i in range(processes)
    ]


async def final_values(spec: StoreSpec, keys: Sequence[str]) -> dict[str, object]:
    """The keys' values read through a fresh store (retried while a server comes back)."""
    for attempt in range(60):
        try:
            store = await spec.open()
            break
        except Exception:
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    try:
        return await read_final(store, keys, timeout=60)
    finally:
        await store.close()


async def finish(
    name: str, history: History, spec: StoreSpec, durable: StoreSpec | None = None
) -> HistoryReport:
    """Check the history against the values read through ``spec`` after the run; for the
    hybrid, ``durable`` (PostgreSQL alone) must hold every acknowledged write too."""
    keys = history.written_keys()
    report = history.check(await final_values(spec, keys))
    print(report.summary(name))
    for fault in history.faults:
        print(f"    t={fault.time - history.start:5.2f} s  {fault.description}")
    assert report.stale_reads == 0, report.describe(name=name)
    assert report.lost_writes == 0, report.describe(name=name)
    assert report.impossible_reads == 0, report.describe(name=name)
    if durable is not None:
        in_postgres = check_history(history.ops, await final_values(durable, keys))
        assert in_postgres.lost_writes == 0, in_postgres.describe(name=f"{name}, PostgreSQL")
        assert in_postgres.impossible_reads == 0, in_postgres.describe(name=f"{name}, PostgreSQL")
    return report


def acked(history: History, kind: str, after: int, before: int | None = None) -> list[Op]:
    """Successful operations of ``kind`` invoked after fault number ``after`` and completed
    before fault number ``before`` (or the end)."""
    t0 = history.faults[after].time
    t1 = history.faults[before].time if before is not None else history.end
    return [
        op
        for op in history.ops
        if op.kind == kind and op.ok and t0 <= op.invoke and op.complete <= t1
    ]


async def in_thread(call: Callable[[], None]) -> None:
    """Server handles block; the parent's loop (and its proxies) keeps running meanwhile."""
    await asyncio.to_thread(call)


def kill_twice(server: PostgresServer | RedisServer, name: str, restarted: str) -> NemesisFn:
    """A nemesis: kill -9 ``server`` at 1.5 s and 4.5 s, start it again at 3.0 s and 5.5 s."""

    async def nemesis(clock: Nemesis) -> None:
        for kill_at, start_at in ((1.5, 3.0), (4.5, 5.5)):
            await clock.at(kill_at)
            clock.record(f"kill -9 {name}")
            await in_thread(server.kill)
            await clock.at(start_at)
            await in_thread(server.start)
            clock.record(restarted)

    return nemesis


@pytest.fixture
def own_redis(
    fleetmem_redis_factory: Callable[..., RedisServer],
) -> Iterator[Callable[..., RedisServer]]:
    """``own_redis(appendonly=...)``: a Redis of this test's own, removed after it."""
    started: list[RedisServer] = []

    def make(**options: Any) -> RedisServer:
        server = fleetmem_redis_factory(**options)
        started.append(server)
        return server

    yield make
    for server in started:
        server.resume()
        server.close()


@pytest.fixture
async def own_postgres(
    fleetmem_postgres_factory: Callable[..., PostgresServer],
) -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own (it is killed), schema installed, removed after it."""
    server = fleetmem_postgres_factory()
    from fleetmem.backends.postgres import PostgresStore

    async with PostgresStore.from_url(server.dsn, namespace="schema"):  # migrates, once
        pass
    yield server
    server.resume()
    server.close()


# 1 -------------------------------------------------------------------------------------------


async def run_one_writer_partitioned_from_redis(
    pg_dsn: str, redis: RedisServer, proxy: TcpProxy, namespace: str, options: dict[str, Any]
) -> History:
    """One writer process reaches Redis through ``proxy``, two reader processes directly."""
    via_proxy = f"redis://{proxy.host}:{proxy.port}/0"
    writer = StoreSpec(hybrid=(pg_dsn, via_proxy), namespace=namespace, options=options)
    reader = StoreSpec(hybrid=(pg_dsn, redis.url), namespace=namespace, options=options)
    keys = tuple(f"k{i}" for i in range(6))
    common: dict[str, Any] = {"max_ops": MAX_OPS, "seconds": SECONDS, "op_timeout": 15.0}
    workers = [
        WorkerSpec(writer, write_keys=keys, clients=2, pause=0.01, **common),
        WorkerSpec(reader, read_keys=keys, clients=2, pause=0.002, seed=1, **common),
        WorkerSpec(reader, read_keys=keys, clients=2, pause=0.002, seed=2, **common),
    ]

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(1.5)
        proxy.blackhole(True)
        clock.record("blackhole between the writer and Redis")
        await clock.at(3.5)
        proxy.heal()
        clock.record("healed")
        await clock.at(4.5)
        proxy.reset_connections()
        clock.record("writer's Redis connections reset")
        await clock.at(5.5)
        proxy.set_latency(0.4)
        clock.record("latency 0.4 s each way (over the 0.25 s cache deadline)")
        await clock.at(7.0)
        proxy.heal()
        clock.record("healed")

    return await run_history(workers, nemesis, stop_after_nemesis=TAIL)


@pytest.mark.hybrid
@pytest.mark.postgres
@pytest.mark.redis
async def test_hybrid_one_writer_cut_from_redis_readers_connected(
    fleetmem_postgres_database: str,
    fleetmem_redis_server: RedisServer,
    fleetmem_proxy: ProxyFactory,
    fleetmem_namespace: str,
) -> None:
    """Issue 14 bug A: the writer cannot reach Redis (blackhole, reset, latency) while the
    readers can: no reader may serve a value its cache held before an acknowledged write."""
    rs = fleetmem_redis_server
    proxy = await fleetmem_proxy(rs.host, rs.port)
    options: dict[str, Any] = {"trust_window": TRUST_WINDOW}
    history = await run_one_writer_partitioned_from_redis(
        fleetmem_postgres_database, rs, proxy, fleetmem_namespace, options
    )
    spec = StoreSpec(hybrid=(fleetmem_postgres_database, rs.url), namespace=fleetmem_namespace)
    durable = StoreSpec(url=fleetmem_postgres_database, namespace=fleetmem_namespace)
    report = await finish("hybrid, writer cut from Redis", history, spec, durable)
    assert len(history.faults) == 5
    # Writes were acknowledged during the blackhole, and the readers kept reading meanwhile.
    assert acked(history, "write", after=0, before=1)
    assert len(acked(history, "read", after=0, before=1)) >= 20
    assert report.acknowledged_writes >= 50


# 2 -------------------------------------------------------------------------------------------


@pytest.mark.hybrid
@pytest.mark.postgres
@pytest.mark.redis
async def test_hybrid_app_cut_from_postgres(
    fleetmem_postgres_database: str,
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_proxy: ProxyFactory,
    fleetmem_namespace: str,
) -> None:
    """Every process reaches PostgreSQL through a proxy that blackholes and resets: writes
    fail (BackendUnavailableError / OutcomeUnknownError), reads fail (no stale reads allowed),
    and once healed nothing stale is read and no acknowledged write is lost."""
    pg, rs = fleetmem_postgres_server, fleetmem_redis_server
    proxy = await fleetmem_proxy(pg.host, pg.port)
    database = fleetmem_postgres_database.rsplit("/", 1)[1]
    via_proxy = f"postgresql://{pg.user}@{proxy.host}:{proxy.port}/{database}"
    options: dict[str, Any] = {
        "allow_stale_reads": False,
        "postgres_options": {"acquire_timeout": 1.0, "command_timeout": 1.0},
    }
    spec = StoreSpec(hybrid=(via_proxy, rs.url), namespace=fleetmem_namespace, options=options)
    # Whether the workers' own reads miss the cache during a cut depends on timing (12 hot
    # keys are usually cached): a probe reads a key no one wrote, which needs PostgreSQL.
    from fleetmem.backends.hybrid import HybridStore

    probe_failures: list[str] = []
    probe = HybridStore.from_urls(via_proxy, rs.url, namespace=fleetmem_namespace, **options)
    await probe.connect()

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(1.5)
        proxy.blackhole(True)
        clock.record("blackhole between the app and PostgreSQL")
        try:
            await asyncio.wait_for(probe.get("probe-never-written"), timeout=30)
            probe_failures.append("none: the read was answered")
        except Exception as exc:  # the failure is what is checked below
            probe_failures.append(type(exc).__name__)
        await clock.at(3.5)
        proxy.heal()
        proxy.reset_connections()  # the blackholed connections are dead anyway
        clock.record("healed (blackholed connections reset)")
        for at in (4.5, 5.0, 5.5):
            await clock.at(at)
            proxy.reset_connections()
            clock.record("PostgreSQL connections reset")
        await clock.at(6.0)
        proxy.blackhole(True)
        clock.record("blackhole between the app and PostgreSQL")
        await clock.at(6.8)
        proxy.heal()
        proxy.reset_connections()
        clock.record("healed (blackholed connections reset)")

    history = await run_history(cross_layout(lambda i: spec), nemesis, stop_after_nemesis=TAIL)
    direct = StoreSpec(
        hybrid=(fleetmem_postgres_database, rs.url), namespace=fleetmem_namespace, options={}
    )
    durable = StoreSpec(url=fleetmem_postgres_database, namespace=fleetmem_namespace)
    report = await finish("hybrid, app cut from PostgreSQL", history, direct, durable)
    allowed = {"BackendUnavailableError", "OutcomeUnknownError"}
    assert report.write_failures, "no write failed while PostgreSQL was cut off"
    assert set(report.write_failures) <= allowed, report.write_failures
    await probe.close()
    assert probe_failures and set(probe_failures) <= allowed, (
        f"a read needing PostgreSQL during the cut: {probe_failures}"
    )
    assert set(report.read_failures) <= allowed, report.read_failures
    # The stores recovered: writes were acknowledged again after the last fault.
    assert acked(history, "write", after=-1)


# 3 -------------------------------------------------------------------------------------------


@pytest.mark.hybrid
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("aof", [False, True], ids=["no-persistence", "aof-reload"])
async def test_hybrid_redis_killed_and_restarted(
    fleetmem_postgres_database: str,
    own_redis: Callable[..., RedisServer],
    fleetmem_namespace: str,
    aof: bool,
) -> None:
    """kill -9 of the cache Redis twice, restarted each time: without persistence it comes
    back empty; with ``appendonly yes`` it reloads its AOF and comes back with values cached
    before the writes it missed. Operations go on from PostgreSQL meanwhile; nothing stale is
    read after the restart."""
    rs = own_redis(appendonly=aof, appendfsync="always")
    spec = StoreSpec(hybrid=(fleetmem_postgres_database, rs.url), namespace=fleetmem_namespace)

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(1.5)
        clock.record("kill -9 Redis")
        await in_thread(rs.kill)
        await clock.at(3.0)
        await in_thread(rs.start)
        clock.record("Redis started again" + (" from its AOF" if aof else " (empty)"))
        await clock.at(4.5)
        if aof:
            clock.record("Redis stopped (SIGTERM)")
            await in_thread(lambda: rs.restart("fast"))
            clock.record("Redis started again from its AOF")
        else:
            clock.record("kill -9 Redis")
            await in_thread(rs.kill)
            await clock.at(5.5)
            await in_thread(rs.start)
            clock.record("Redis started again (empty)")

    history = await run_history(cross_layout(lambda i: spec), nemesis, stop_after_nemesis=TAIL)
    durable = StoreSpec(url=fleetmem_postgres_database, namespace=fleetmem_namespace)
    name = "hybrid, Redis " + ("AOF reload" if aof else "kill -9")
    report = await finish(name, history, spec, durable)
    assert report.write_failures == {}, "a write failed although PostgreSQL was up"
    assert report.read_failures == {}, "a read failed although PostgreSQL was up"
    # Writes were acknowledged while Redis was dead, and after it was back.
    assert acked(history, "write", after=0, before=1)
    assert acked(history, "write", after=-1)


@pytest.mark.hybrid
@pytest.mark.postgres
@pytest.mark.redis
async def test_hybrid_postgres_killed_and_restarted(
    own_postgres: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    """kill -9 of PostgreSQL twice, restarted each time: writes and reads fail while it is
    down; after the restart every acknowledged write is there (read through the hybrid and
    through PostgreSQL alone) and no read was stale."""
    pg, rs = own_postgres, fleetmem_redis_server
    options: dict[str, Any] = {
        "postgres_options": {"acquire_timeout": 2.0, "command_timeout": 2.0},
    }
    spec = StoreSpec(hybrid=(pg.dsn, rs.url), namespace=fleetmem_namespace, options=options)

    nemesis = kill_twice(pg, "PostgreSQL", "PostgreSQL started again")
    history = await run_history(cross_layout(lambda i: spec), nemesis, stop_after_nemesis=TAIL)
    durable = StoreSpec(url=pg.dsn, namespace=fleetmem_namespace)
    report = await finish("hybrid, PostgreSQL kill -9", history, spec, durable)
    assert report.write_failures, "no write failed while PostgreSQL was dead"
    assert set(report.write_failures) <= {"BackendUnavailableError", "OutcomeUnknownError"}
    assert acked(history, "write", after=-1), "no write acknowledged after the restart"


@pytest.mark.postgres
async def test_postgres_killed_and_restarted(
    own_postgres: PostgresServer, fleetmem_namespace: str
) -> None:
    """PostgresStore, kill -9 twice: every write acknowledged before a crash is read after the
    restart, no read is stale."""
    pg = own_postgres
    spec = StoreSpec(
        url=pg.dsn,
        namespace=fleetmem_namespace,
        options={"acquire_timeout": 2.0, "command_timeout": 2.0},
    )

    nemesis = kill_twice(pg, "PostgreSQL", "PostgreSQL started again")
    history = await run_history(cross_layout(lambda i: spec), nemesis, stop_after_nemesis=TAIL)
    report = await finish("PostgresStore, kill -9", history, spec)
    assert report.write_failures, "no write failed while PostgreSQL was dead"
    assert set(report.write_failures) <= {"BackendUnavailableError", "OutcomeUnknownError"}
    assert acked(history, "write", after=-1), "no write acknowledged after the restart"


@pytest.mark.redis
async def test_redis_killed_and_restarted_with_aof_always(
    own_redis: Callable[..., RedisServer], fleetmem_namespace: str
) -> None:
    """RedisStore on ``appendonly yes``, ``appendfsync always``, kill -9 twice: every write
    acknowledged before a crash is there after the AOF reload, no read is stale."""
    rs = own_redis(appendonly=True, appendfsync="always")
    spec = StoreSpec(url=rs.url, namespace=fleetmem_namespace, options={"timeout": 1.0})

    nemesis = kill_twice(rs, "Redis", "Redis started again from its AOF")
    history = await run_history(cross_layout(lambda i: spec), nemesis, stop_after_nemesis=TAIL)
    report = await finish("RedisStore, kill -9, appendfsync always", history, spec)
    assert report.write_failures, "no write failed while Redis was dead"
    assert set(report.write_failures) <= {"BackendUnavailableError", "OutcomeUnknownError"}
    assert acked(history, "write", after=-1), "no write acknowledged after the restart"
