"""``fleetmem demo``: a small fleet of simulated agents sharing one store.

A coordinator enqueues the work items in a durable work queue (``store.queue``, one queue per
run). Agents claim them under a lease, record results with a TTL in a partition of their own,
count progress with ``incr``, keep a shared scoreboard with ``compare_and_set`` and ack each job.
Some agents "crash" while holding a claim; its lease expires and the queue gives the job to
another agent. The coordinator follows the results as they are written through the namespace's
change feed (``store.changes.watch``), whichever process writes them. At the end the demo checks
that the shared state is consistent: each item has exactly one result, the counter equals the
number of results, the scoreboard adds up, the queue holds every job as done, none left, none
dead, and the change feed holds each result's write once, as the coordinator's watch saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import secrets
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetmem.errors import ConfigurationError, VersionConflictError
from fleetmem.factory import open_store
from fleetmem.protocol import MemoryStore

__all__ = ["DemoReport", "run_demo"]

SCOREBOARD = "fleet/scoreboard"
DONE_COUNTER = "fleet/done"
#: How long the queue keeps the results of a run's jobs (seconds), for inspection; the change
#: feed keeps the run's changes as long.
RESULT_TTL = 600.0
#: Seconds the coordinator's watch may lag behind the last result before the run says so.
FEED_PATIENCE = 30.0


@dataclass
class AgentTally:
    done: int = 0
    lost_claims: int = 0
    cas_conflicts: int = 0
    crashes: int = 0
    takeovers: int = 0


@dataclass
class DemoReport:
    """What a demo run did and found."""

    url: str
    namespace: str
    agents: int
    processes: int
    items: int
    seconds: float = 0.0
    tally: AgentTally = field(default_factory=AgentTally)
    results: int = 0
    counter: int = 0
    scoreboard_total: int = 0
    partitions: dict[str, int] = field(default_factory=dict)
    queue: str = ""
    jobs_done: int = 0
    jobs_dead: int = 0
    jobs_left: int = 0
    feed_cursor: str = ""
    feed_results: int = 0
    watched_results: int = 0
    operations: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems


async def _add_to_scoreboard(store: MemoryStore, agent: str, tally: AgentTally) -> int:
    """Add one to ``agent``'s score with an optimistic compare-and-set loop; return the ops."""
    ops = 0
    while True:
        entry = await store.get_entry(SCOREBOARD)
        ops += 1
        board: dict[str, Any] = dict(entry.value) if entry is not None else {}
        board[agent] = int(board.get(agent, 0)) + 1
        try:
            await store.compare_and_set(
                SCOREBOARD, board, version=entry.version if entry is not None else 0
            )
            return ops + 1
        except VersionConflictError:
            tally.cas_conflicts += 1
            ops += 1


async def _agent(
    store: MemoryStore,
    name: str,
    queue_name: str,
    lease: float,
    crash_rate: float,
    work_ms: tuple[float, float],
    tally: AgentTally,
    rng: random.Random,
) -> int:
    """Claim items from the queue until it is empty; ack each with its result."""
    queue = store.queue(queue_name)
    ops = 0
    while True:
        job = await queue.claim(consumer=name, lease=lease, wait=lease * 1.5)
        ops += 1
        if job is None:
            stats = await queue.stats()
            ops += 1
            if stats.ready + stats.delayed + stats.claimed == 0:
                return ops
            continue
        if job.attempts > 1:
            tally.takeovers += 1
        await asyncio.sleep(rng.uniform(*work_ms) / 1000.0)
        if job.attempts == 1 and rng.random() < crash_rate:
            # Simulated crash: the agent walks away holding the claim; once its lease expires
            # the queue gives the job to another agent (the attempt counts).
            tally.crashes += 1
            continue
        item = job.payload["item"]
        written = await store.set_if_absent(
            f"results/{item}",
            {"item": item, "agent": name, "answer": rng.randint(0, 10**6)},
            ttl=3600,
            partition=f"agent-{name}",
        )
        ops += 1
        if written:
            await store.incr(DONE_COUNTER)
            ops += 1 + await _add_to_scoreboard(store, name, tally)
            tally.done += 1
        if not await queue.ack(job, result={"agent": name}, result_ttl=RESULT_TTL):
            tally.lost_claims += 1  # superseded: another agent claimed the job meanwhile
        ops += 1


async def _run_agents_on(
    store: MemoryStore,
    first_agent: int,
    agents: int,
    queue_name: str,
    lease: float,
    crash_rate: float,
    seed: int,
) -> tuple[AgentTally, int]:
    tally = AgentTally()
    rngs = [random.Random(seed * 1000 + first_agent + i) for i in range(agents)]
    counts = await asyncio.gather(
        *(
            _agent(
                store,
                f"a{first_agent + i:02d}",
                queue_name,
                lease,
                crash_rate,
                (1, 8),
                tally,
                rngs[i],
            )
            for i in range(agents)
        )
    )
    return tally, sum(counts)


async def _run_agents(url: str | None, namespace: str, *rest: Any) -> tuple[AgentTally, int]:
    async with open_store(url, namespace=namespace) as store:
        return await _run_agents_on(store, *rest)


def _process_main(args: tuple[Any, ...]) -> tuple[AgentTally, int]:
    return asyncio.run(_run_agents(*args))


async def run_demo(
    url: str | None = None,
    *,
    namespace: str = "demo",
    agents: int = 20,
    items: int = 200,
    processes: int = 1,
    lease: float = 0.3,
    crash_rate: float = 0.05,
    seed: int = 7,
    progress: Callable[[str], None] | None = None,
    on_items: Callable[[int, int], None] | None = None,
) -> DemoReport:
    """Run the fleet simulation on ``url`` (default: the settings, else the embedded SQLite).

    ``progress`` receives messages (an earlier run's entries cleared, the agents started);
    ``on_items(done, total)`` the items done so far, read from the store's shared counter a
    few times a second (so it counts the work of every process). Several ``processes`` on a
    store that lives in one process (``memory://``, an in-memory SQLite database) raise
    :class:`~fleetmem.errors.ConfigurationError` before anything is opened: each process
    would work on a store of its own.
    """
    from fleetmem._urls import redact_url as redact
    from fleetmem._where import describe, effective_url, in_one_process

    say = progress or (lambda _msg: None)
    resolved = effective_url(url)
    if processes > 1 and in_one_process(resolved):
        raise ConfigurationError(
            f"{redact(resolved or '')} lives in one process: each of the {processes} processes "
            "would have a store of its own; use --processes 1, or a file or server store"
        )
    async with open_store(url, namespace=namespace) as store:
        where = describe(resolved) if resolved is not None else store.backend
        await store.changes.disable()  # an earlier run's log goes with its entries
        cleared = await store.clear()
        if cleared:
            say(f"cleared {cleared} entries left by an earlier run in namespace {namespace!r}")
        report = DemoReport(
            url=where, namespace=namespace, agents=agents, processes=processes, items=items
        )
        # Server-side: the agents' writes are recorded whichever process makes them.
        await store.changes.enable(retention=RESULT_TTL)
        report.feed_cursor = await store.changes.cursor()
        seen: set[str] = set()
        follower = asyncio.create_task(_follow_results(store, report.feed_cursor, items, seen))
        report.queue = f"demo-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        say(f"coordinator: enqueueing {items} items in queue {report.queue!r}")
        await store.queue(report.queue).put_many([{"item": f"item-{i:04d}"} for i in range(items)])
        say(f"starting {agents} agents in {processes} process(es) on {where}")
        start = time.perf_counter()
        watcher = asyncio.create_task(_watch_items(store, items, on_items)) if on_items else None
        try:
            tallies, ops = await _run_fleet(
                store, url, namespace, agents, report.queue, processes, lease, crash_rate, seed
            )
            report.seconds = time.perf_counter() - start
            # The watch follows the writes of every process: let it catch up with the last.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(follower), FEED_PATIENCE)
        finally:
            for task in (watcher, follower):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        report.watched_results = len(seen)
        for t in tallies:
            for name in ("done", "lost_claims", "cas_conflicts", "crashes", "takeovers"):
                setattr(report.tally, name, getattr(report.tally, name) + getattr(t, name))
        report.operations = ops
        await _verify(store, report)
        if on_items is not None:
            on_items(report.results, items)
    return report


async def _follow_results(store: MemoryStore, since: str, items: int, seen: set[str]) -> None:
    """The coordinator: follow the results as agents write them, until every item has one."""
    async for change in store.changes.watch("results/*", since=since):
        if change.op == "set" and change.key is not None:
            seen.add(change.key)
            if len(seen) >= items:
                return


async def _watch_items(
    store: MemoryStore, items: int, on_items: Callable[[int, int], None]
) -> None:
    """Report the shared counter of items done until cancelled."""
    while True:
        with contextlib.suppress(Exception):  # a progress display never stops the demo
            on_items(int(await store.get(DONE_COUNTER, 0)), items)
        await asyncio.sleep(0.2)


async def _run_fleet(
    store: MemoryStore,
    url: str | None,
    namespace: str,
    agents: int,
    queue_name: str,
    processes: int,
    lease: float,
    crash_rate: float,
    seed: int,
) -> tuple[list[AgentTally], int]:
    """Run the agents here (one process) or spread over ``processes`` spawned processes."""
    if processes <= 1:
        tally, ops = await _run_agents_on(store, 0, agents, queue_name, lease, crash_rate, seed)
        return [tally], ops
    per_process = max(1, agents // processes)
    jobs = [
        (
            url,
            namespace,
            p * per_process,
            per_process if p < processes - 1 else agents - per_process * (processes - 1),
            queue_name,
            lease,
            crash_rate,
            seed,
        )
        for p in range(processes)
    ]
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    with ctx.Pool(processes) as pool:
        outcome = await loop.run_in_executor(None, pool.map, _process_main, jobs)
    return [t for t, _ in outcome], sum(o for _, o in outcome)


async def _verify(store: MemoryStore, report: DemoReport) -> None:
    results = await store.search("results/*")
    report.results = len(results)
    report.counter = int(await store.get(DONE_COUNTER, 0))
    board = await store.get(SCOREBOARD, {})
    report.scoreboard_total = sum(int(v) for v in board.values())
    stats = await store.stats()
    report.partitions = stats.partitions
    queue = await store.queue(report.queue).stats()
    report.jobs_done, report.jobs_dead = queue.done, queue.dead
    report.jobs_left = queue.ready + queue.delayed + queue.claimed
    missing = [
        f"item-{i:04d}" for i in range(report.items) if f"results/item-{i:04d}" not in results
    ]
    if missing:
        report.problems.append(f"{len(missing)} items have no result (e.g. {missing[0]})")
    if report.counter != report.results:
        report.problems.append(f"counter says {report.counter}, results say {report.results}")
    if report.scoreboard_total != report.results:
        report.problems.append(
            f"scoreboard adds up to {report.scoreboard_total}, results say {report.results}"
        )
    if report.jobs_done != report.items or report.jobs_dead or report.jobs_left:
        report.problems.append(
            f"queue {report.queue!r}: {report.jobs_done} jobs done of {report.items}, "
            f"{report.jobs_dead} dead, {report.jobs_left} not finished"
        )
    feed: list[str] = []
    since: str | None = report.feed_cursor
    while True:
        batch = await store.changes.read(since=since, pattern="results/*")
        feed.extend(c.key for c in batch.changes if c.op == "set" and c.version == 1 and c.key)
        if not batch.changes:
            break
        since = batch.cursor
    report.feed_results = len(feed)
    if len(feed) != report.results or set(feed) != set(results):
        report.problems.append(
            f"the change feed holds {len(feed)} result writes ({len(set(feed))} keys), "
            f"the store {report.results} results"
        )
    if report.watched_results != report.results:
        report.problems.append(
            f"the coordinator's watch saw {report.watched_results} of {report.results} results"
        )
    if report.tally.done != report.results:
        report.problems.append(f"agents recorded {report.tally.done}, store holds {report.results}")
    by_agent: dict[str, int] = {}
    for value in results.values():
        by_agent[value["agent"]] = by_agent.get(value["agent"], 0) + 1
    for agent, count in by_agent.items():
        if board.get(agent) != count:
            report.problems.append(f"agent {agent}: scoreboard {board.get(agent)}, results {count}")
            break


def _partition_summary(partitions: dict[str, int], shown: int = 4) -> str:
    items = [f"{p}={n}" for p, n in partitions.items()]
    return ", ".join(items[:shown]) + (
        f", ... ({len(items) - shown} more)" if len(items) > shown else ""
    )


def format_report(report: DemoReport, inspect: list[str] | None = None) -> str:
    """A readable summary of a demo run; ``inspect``: the commands that show what it left
    (default: ``fleetmem -n NAMESPACE ...`` on the default store)."""
    if inspect is None:
        base = f"fleetmem -n {shlex.quote(report.namespace)}"
        inspect = [f"{base} keys results/ --limit 5", f"{base} stats"]
    t = report.tally
    rate = report.operations / report.seconds if report.seconds else 0.0
    lines = [
        "fleetmem demo: a fleet of agents sharing one store",
        "",
        f"  store          {report.url} (namespace {report.namespace!r})",
        f"  agents         {report.agents} in {report.processes} process(es)",
        f"  items done     {report.results} / {report.items}",
        f"  queue          {report.queue!r}: {report.items} jobs put by the coordinator,"
        f" {report.jobs_done} acked, {report.jobs_dead} dead, {report.jobs_left} left",
        f"  change feed    {report.feed_results} result writes recorded, each once; the"
        f" coordinator's watch saw {report.watched_results} as they were written",
        f"  late acks      {t.lost_claims} refused (another agent had claimed the job since)",
        f"  conflicts      {t.cas_conflicts} compare_and_set conflicts resolved by retry",
        f"  crashes        {t.crashes} agents walked away holding a claim; {t.takeovers} jobs"
        " came back once their lease expired and were claimed again",
        f"  time           {report.seconds:.2f} s, {report.operations} store operations"
        f" ({rate:,.0f} ops/s)",
        f"  partitions     {len(report.partitions)} (one per agent for results, default for"
        " the shared counters): " + _partition_summary(report.partitions),
        *(f"  {'inspect' if i == 0 else '':<15}{command}" for i, command in enumerate(inspect)),
        "",
    ]
    if report.consistent:
        lines.append(
            "  consistent     yes: one result per item; counter, scoreboard and results agree;"
            " every job acked once, none dead, none left; the feed holds each result once"
        )
    else:
        lines.append("  consistent     NO")
        lines.extend(f"    - {p}" for p in report.problems)
    return "\n".join(lines)
