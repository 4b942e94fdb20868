"""A Jepsen-style history checker for any fleetmem store, driven from several OS processes.

Several worker processes (``multiprocessing``, *spawn*) each open a store from URLs and run a
bounded loop of reads and writes against it. Every operation is recorded with the time it was
invoked, the time it completed, and its result or error. The parent merges the histories, lets
a *nemesis* inject faults meanwhile (kill a server, blackhole a proxy, ...), and then checks:

- **no stale read**: every read returns a value no older than the last write that was
  acknowledged before the read began;
- **no lost write**: after the run (and after any server restart), every key holds at least its
  last acknowledged value. A write that failed (``OutcomeUnknownError``,
  ``BackendUnavailableError``, a timeout) may or may not have landed, so a key may also hold
  any value up to the last one *invoked*;
- **no impossible value**: nothing is read that was never written (or not yet invoked).

The histories are simple enough to check exactly, in ``O(n log n)``: each key has **one writer**
(one client, sequential) writing strictly increasing integers ``1, 2, 3, ...``, and readers in
other processes. "Older" is then "smaller", and the register semantics of a key reduce to
comparisons of integers and timestamps.

Times come from :func:`time.monotonic`. On Linux it reads ``CLOCK_MONOTONIC``, which is one
clock for the whole machine: the timestamps of different processes on one machine are
comparable. (Across machines they are not; run every worker on one host.) The recorded times
are conservative: ``invoke`` is taken just before the call and ``complete`` just after it
returns, so a write counted as "acknowledged before the read began" really was.

Use it on your own store::

    from fleetmem.testing.history import StoreSpec, WorkerSpec, run_history

    spec = StoreSpec(url="postgresql://app@db/fleet", namespace="jepsen")
    keys = tuple(f"k{i}" for i in range(8))
    workers = [WorkerSpec(spec, write_keys=keys, clients=4, seconds=10)]
    workers += [WorkerSpec(spec, read_keys=keys, clients=4, seconds=10, seed=s) for s in (1, 2)]

    async def nemesis(clock: Nemesis) -> None:
        await clock.at(3.0)
        clock.record("kill -9 postgres")
        ...

    history = await run_history(workers, nemesis, stop_after_nemesis=2.0)
    async with open_store("postgresql://app@db/fleet", namespace="jepsen") as store:
        final = await read_final(store, history.written_keys())
    report = history.check(final)
    print(report.summary("postgres kill -9"))
    assert report.ok, report.describe()

``check_history`` works on any list of :class:`Op` (the unit tests feed it hand-made histories).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import multiprocessing
import queue as queue_module
import random
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Anomaly",
    "Fault",
    "History",
    "HistoryReport",
    "Nemesis",
    "NemesisFn",
    "Op",
    "StoreSpec",
    "WorkerError",
    "WorkerSpec",
    "check_history",
    "read_final",
    "run_history",
]

OpKind = Literal["read", "write"]


# -- the history ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation, as a client saw it.

    ``process`` identifies the logical client (one coroutine of one worker process): the
    operations of one client are sequential. ``value`` is the value written (a write) or
    returned (a read; ``None`` when the key was absent or the read failed). ``error`` is the
    class name of the exception the call raised, ``None`` when it succeeded. Times are
    :func:`time.monotonic` seconds, comparable across the processes of one machine.
    """

    process: int
    kind: OpKind
    key: str
    value: object
    invoke: float
    complete: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the call returned (a write was acknowledged)."""
        return self.error is None


@dataclass(frozen=True)
class Fault:
    """Something the nemesis did, and when (``time.monotonic()``)."""

    time: float
    description: str


@dataclass(frozen=True)
class Anomaly:
    """One violation found by the checker.

    ``kind`` is ``"stale read"``, ``"lost write"``, ``"impossible read"`` (a value never
    written, or not yet invoked when the read completed) or ``"impossible final value"``.
    ``low`` and ``high`` bound the values that were allowed; ``got`` is what was seen
    (absent reads as 0).
    """

    kind: str
    key: str
    got: object
    low: int
    high: int
    op: Op | None = None

    def __str__(self) -> str:
        where = ""
        if self.op is not None:
            where = (
                f" by client {self.op.process} during "
                f"[{self.op.invoke:.3f}, {self.op.complete:.3f}]"
            )
        return f"{self.kind}: {self.key!r} = {self.got!r}, allowed {self.low}..{self.high}{where}"


@dataclass
class HistoryReport:
    """The counts of one checked history (see :func:`check_history`)."""

    operations: int = 0
    reads: int = 0
    writes: int = 0
    acknowledged_writes: int = 0
    read_failures: dict[str, int] = field(default_factory=dict)
    write_failures: dict[str, int] = field(default_factory=dict)
    keys: int = 0
    faults: int = 0
    duration: float = 0.0
    stale_reads: int = 0
    lost_writes: int = 0
    impossible_reads: int = 0
    #: Reads that returned a value older than one an earlier, finished read had already
    #: returned (possible only with writes that failed but landed, or with a real staleness
    #: bug). The contract does not forbid it after an unacknowledged write; it is counted,
    #: not judged.
    read_regressions: int = 0
    final_checked: bool = False
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def failures(self) -> dict[str, int]:
        """Failed operations by ``"<kind> <exception class>"``."""
        merged = {f"read {k}": v for k, v in self.read_failures.items()}
        merged.update({f"write {k}": v for k, v in self.write_failures.items()})
        return merged

    @property
    def ok(self) -> bool:
        """No stale read, no lost write, no impossible value."""
        return self.stale_reads == 0 and self.lost_writes == 0 and self.impossible_reads == 0

    def summary(self, name: str = "history") -> str:
        """One line with every count (what the reliability tests print)."""
        failed = sum(self.read_failures.values()) + sum(self.write_failures.values())
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.items())) or "none"
        lost = str(self.lost_writes) if self.final_checked else "not checked"
        return (
            f"[{name}] {self.operations} ops in {self.duration:.1f} s on {self.keys} keys "
            f"({self.reads} reads, {self.writes} writes, {self.acknowledged_writes} acked), "
            f"{self.faults} faults, {failed} failed ({classes}); "
            f"stale reads {self.stale_reads}, lost writes {lost}, "
            f"impossible reads {self.impossible_reads}, read regressions {self.read_regressions}"
        )

    def describe(self, limit: int = 10, name: str = "history") -> str:
        """The summary and the first ``limit`` anomalies, one per line."""
        lines = [self.summary(name)]
        lines += [f"  {anomaly}" for anomaly in self.anomalies[:limit]]
        if len(self.anomalies) > limit:
            lines.append(f"  ... and {len(self.anomalies) - limit} more")
        return "\n".join(lines)


def _as_int(value: object) -> int | None:
    """A read's value as the integer it stands for (absent is 0); None when it is no integer."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


@dataclass
class _KeyWrites:
    values: list[int]  # in invocation order, strictly increasing
    invokes: list[float]
    acked_completes: list[float]
    acked_values: list[int]

    def last_acked_before(self, t: float) -> int:
        i = bisect.bisect_left(self.acked_completes, t)
        return self.acked_values[i - 1] if i else 0

    def last_invoked_before(self, t: float) -> int:
        i = bisect.bisect_left(self.invokes, t)
        return self.values[i - 1] if i else 0


def _index_writes(key: str, writes: list[Op]) -> _KeyWrites:
    writes.sort(key=lambda op: op.invoke)
    clients = {op.process for op in writes}
    if len(clients) > 1:
        raise ValueError(f"key {key!r} has {len(clients)} writers; the checker needs one per key")
    indexed = _KeyWrites([], [], [], [])
    previous: Op | None = None
    for op in writes:
        value = _as_int(op.value)
        if value is None or op.value is None or value <= 0:
            raise ValueError(f"key {key!r}: writes must be positive integers, not {op.value!r}")
        if previous is not None:
            if value <= indexed.values[-1]:
                raise ValueError(f"key {key!r}: written values must increase ({op.value!r})")
            if op.invoke < previous.complete:
                raise ValueError(f"key {key!r}: writes of one key must not overlap in time")
        indexed.values.append(value)
        indexed.invokes.append(op.invoke)
        if op.ok:
            indexed.acked_completes.append(op.complete)
            indexed.acked_values.append(value)
        previous = op
    return indexed


def check_history(
    ops: Iterable[Op],
    final: Mapping[str, object] | None = None,
    *,
    faults: Sequence[Fault] = (),
) -> HistoryReport:
    """Check a single-writer-per-key register history; see the module docstring.

    ``final`` maps each written key to the value read after the run (a key missing from it
    is absent); without it lost writes are not checked. Raises ``ValueError`` for a history
    the checker cannot judge (two writers of one key, values that do not increase, writes of
    one key that overlap).
    """
    ops = list(ops)
    report = HistoryReport(operations=len(ops), faults=len(faults))
    if ops:
        report.duration = max(op.complete for op in ops) - min(op.invoke for op in ops)
    by_key_writes: dict[str, list[Op]] = defaultdict(list)
    by_key_reads: dict[str, list[Op]] = defaultdict(list)
    read_failures: Counter[str] = Counter()
    write_failures: Counter[str] = Counter()
    for op in ops:
        if op.complete < op.invoke:
            raise ValueError(f"operation completes before it is invoked: {op}")
        if op.kind == "write":
            report.writes += 1
            by_key_writes[op.key].append(op)
            if op.ok:
                report.acknowledged_writes += 1
            else:
                write_failures[str(op.error)] += 1
        elif op.kind == "read":
            report.reads += 1
            if op.ok:
                by_key_reads[op.key].append(op)
            else:
                read_failures[str(op.error)] += 1
        else:
            raise ValueError(f"unknown operation kind {op.kind!r}")
    report.read_failures = dict(read_failures)
    report.write_failures = dict(write_failures)
    report.keys = len(set(by_key_writes) | set(by_key_reads))
    indexed = {key: _index_writes(key, writes) for key, writes in by_key_writes.items()}
    empty = _KeyWrites([], [], [], [])

    for key, reads in sorted(by_key_reads.items()):
        writes = indexed.get(key, empty)
        written = set(writes.values)
        # Reads in completion order with a running maximum: what had been observed by then.
        done = sorted(reads, key=lambda op: op.complete)
        done_times = [op.complete for op in done]
        observed_max: list[int] = []
        running = 0
        for op in done:
            seen = _as_int(op.value)
            running = max(running, seen if seen is not None else 0)
            observed_max.append(running)
        for op in sorted(reads, key=lambda op: op.invoke):
            low = writes.last_acked_before(op.invoke)
            high = writes.last_invoked_before(op.complete)
            got = _as_int(op.value)
            if got is None or got > high or (got and got not in written):
                report.impossible_reads += 1
                report.anomalies.append(Anomaly("impossible read", key, op.value, low, high, op))
            elif got < low:
                report.stale_reads += 1
                report.anomalies.append(Anomaly("stale read", key, op.value, low, high, op))
            else:
                i = bisect.bisect_left(done_times, op.invoke)
                if i and got < observed_max[i - 1]:
                    report.read_regressions += 1

    if final is not None:
        report.final_checked = True
        for key, writes in sorted(indexed.items()):
            low = writes.acked_values[-1] if writes.acked_values else 0
            high = writes.values[-1]
            raw = final.get(key)
            got = _as_int(raw)
            if got is None or got > high or (got and got not in writes.values):
                report.impossible_reads += 1
                report.anomalies.append(Anomaly("impossible final value", key, raw, low, high))
            elif got < low:
                report.lost_writes += 1
                report.anomalies.append(Anomaly("lost write", key, raw, low, high))
    return report


# -- running workers ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreSpec:
    """How a worker process opens its store: the arguments of :func:`fleetmem.open_store`.

    Give ``url`` (``postgresql://…``, ``redis://…``, ``sqlite:///path``) or
    ``hybrid=(postgres_url, redis_url)``; ``options`` go to the backend (``trust_window``,
    ``allow_stale_reads``, ``postgres_options``, ``timeout``, ...). Everything must pickle.
    """

    url: str | None = None
    hybrid: tuple[str, str] | None = None
    namespace: str = "default"
    options: Mapping[str, Any] = field(default_factory=dict)

    async def open(self) -> Any:
        """Open and connect the store (a :class:`fleetmem.MemoryStore`)."""
        from fleetmem import open_store

        return await open_store(
            self.url, hybrid=self.hybrid, namespace=self.namespace, **dict(self.options)
        )


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its store, the keys it writes and reads, and its bounds.

    The process runs ``clients`` coroutines. ``write_keys`` are dealt out among them (key
    ``i`` to client ``i % clients``), so each key has one writer; a client writes its keys in
    turn, ``1, 2, 3, ...`` each, and reads a random key of ``read_keys`` otherwise (a client
    with no write key only reads; with no ``read_keys`` it only writes). A client stops after
    ``max_ops // clients`` operations, ``seconds`` after the start, or when the parent says
    so (``run_history(stop_after_nemesis=...)``), whichever comes first.
    A call that takes longer than ``op_timeout`` is cancelled and recorded as a
    ``TimeoutError``; after a failure the client waits ``error_pause`` seconds, after a
    success ``pause`` seconds.
    """

    store: StoreSpec
    write_keys: tuple[str, ...] = ()
    read_keys: tuple[str, ...] = ()
    clients: int = 1
    max_ops: int = 1000
    seconds: float = 5.0
    write_fraction: float = 0.5
    op_timeout: float = 30.0
    pause: float = 0.0
    error_pause: float = 0.05
    seed: int = 0


class WorkerError(RuntimeError):
    """A worker process failed outside its operations (opening the store, a crash)."""


class Nemesis:
    """What a nemesis coroutine gets: the run's start time, and a log of the faults."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.faults: list[Fault] = []

    def elapsed(self) -> float:
        """Seconds since the workers started their operations."""
        return time.monotonic() - self.start

    async def at(self, seconds: float) -> None:
        """Sleep until ``seconds`` after the start (at once when that has passed)."""
        delay = self.start + seconds - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def record(self, description: str) -> None:
        """Log a fault now (it appears in :attr:`History.faults`)."""
        self.faults.append(Fault(time.monotonic(), description))


@dataclass
class History:
    """The merged operations of a run, and what the nemesis did during it."""

    ops: list[Op]
    faults: list[Fault]
    start: float
    end: float

    def written_keys(self) -> list[str]:
        """Every key some worker wrote, sorted."""
        return sorted({op.key for op in self.ops if op.kind == "write"})

    def check(self, final: Mapping[str, object] | None = None) -> HistoryReport:
        """:func:`check_history` on this run."""
        report = check_history(self.ops, final, faults=self.faults)
        report.duration = self.end - self.start
        return report


NemesisFn = Callable[[Nemesis], Awaitable[None]]


async def run_history(
    workers: Sequence[WorkerSpec],
    nemesis: NemesisFn | None = None,
    *,
    start_timeout: float = 120.0,
    timeout: float | None = None,
    stop_after_nemesis: float | None = None,
) -> History:
    """Start one spawned process per worker, wait until every one has opened its store, let
    them run while ``nemesis`` (if any) injects faults, and return the merged history.

    Call it from a running event loop: the parent's loop keeps running during the run (a
    :class:`~fleetmem.testing.proxy.TcpProxy` served by it keeps forwarding). ``timeout``
    bounds the run after the start (default: the longest worker's ``seconds`` + 120 s). With
    ``stop_after_nemesis``, the workers are told to stop that many seconds after the nemesis
    returned (their ``seconds`` and ``max_ops`` still cap them): a slow fault, such as a
    server that takes long to start on a busy machine, then never leaves the run without
    operations after it. A worker that fails outside its operations raises
    :class:`WorkerError`.
    """
    if not workers:
        raise ValueError("no workers")
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    go: Any = ctx.Event()
    stop: Any = ctx.Event()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(index, spec, results, go, stop),
            name=f"fleetmem-history-{index}",
            daemon=True,
        )
        for index, spec in enumerate(workers)
    ]
    limit = timeout if timeout is not None else max(w.seconds for w in workers) + 120.0
    ops: list[Op] = []
    clock: Nemesis | None = None
    try:
        for proc in procs:
            proc.start()
        await _collect(results, procs, "ready", len(procs), time.monotonic() + start_timeout)
        clock = Nemesis(time.monotonic())
        go.set()
        collect = asyncio.ensure_future(
            _collect(results, procs, "done", len(procs), clock.start + limit)
        )
        try:
            if nemesis is not None:
                await nemesis(clock)
            if stop_after_nemesis is not None:
                await asyncio.wait([collect], timeout=stop_after_nemesis)
                stop.set()
            batches = await collect
        finally:
            if not collect.done():
                collect.cancel()
                with contextlib.suppress(BaseException):
                    await collect
        for batch in batches:
            ops.extend(Op(*row) for row in batch)
        end = time.monotonic()
    finally:
        stop.set()  # on an error, the workers still waiting or running end soon
        go.set()
        for proc in procs:
            if proc.pid is None:  # never started
                continue
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 10)
        results.close()
    assert clock is not None
    ops.sort(key=lambda op: op.invoke)
    return History(ops, clock.faults, clock.start, end)


async def _collect(
    results: Any, procs: Sequence[Any], wanted: str, count: int, deadline: float
) -> list[Any]:
    got: list[Any] = []
    while len(got) < count:
        if time.monotonic() > deadline:
            raise WorkerError(f"{count - len(got)} worker(s) not {wanted} in time")
        try:
            message = await asyncio.to_thread(results.get, True, 0.5)
        except queue_module.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise WorkerError(f"worker process(es) died: {', '.join(dead)}") from None
            continue
        kind, index, payload = message
        if kind == "error":
            raise WorkerError(f"worker {index} failed:\n{payload}")
        if kind != wanted:
            raise WorkerError(f"worker {index} sent {kind!r} while waiting for {wanted!r}")
        got.append(payload)
    return got


def _worker_main(index: int, spec: WorkerSpec, results: Any, go: Any, stop: Any) -> None:
    """The entry point of a worker process (spawned: it must stay importable)."""
    try:
        rows = asyncio.run(_worker(index, spec, results, go, stop))
    except BaseException:
        results.put(("error", index, traceback.format_exc()))
        return
    results.put(("done", index, rows))


_Row = tuple[int, OpKind, str, object, float, float, str | None]


async def _worker(index: int, spec: WorkerSpec, results: Any, go: Any, stop: Any) -> list[_Row]:
    store = await spec.store.open()
    rows: list[_Row] = []
    try:
        results.put(("ready", index, None))
        while not await asyncio.to_thread(go.wait, 1.0):
            pass
        deadline = time.monotonic() + spec.seconds
        clients = max(1, spec.clients)
        per_client = max(1, spec.max_ops // clients)

        async def client(c: int) -> None:
            process = index * 1000 + c
            rng = random.Random(f"{spec.seed}-{index}-{c}")
            mine = spec.write_keys[c::clients]
            written = dict.fromkeys(mine, 0)
            turn = 0
            for _ in range(per_client):
                if time.monotonic() >= deadline or stop.is_set():
                    break
                value: object
                if mine and (not spec.read_keys or rng.random() < spec.write_fraction):
                    kind: OpKind = "write"
                    key = mine[turn % len(mine)]
                    turn += 1
                    written[key] += 1
                    value = written[key]
                    call: Awaitable[Any] = store.set(key, value)
                elif spec.read_keys:
                    kind = "read"
                    key = rng.choice(spec.read_keys)
                    value = None
                    call = store.get(key)
                else:
                    return
                error: str | None = None
                invoke = time.monotonic()
                try:
                    result = await asyncio.wait_for(call, spec.op_timeout)
                except Exception as exc:
                    error = type(exc).__name__
                else:
                    if kind == "read":
                        value = result
                complete = time.monotonic()
                rows.append((process, kind, key, value, invoke, complete, error))
                await asyncio.sleep(spec.error_pause if error else spec.pause)

        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 10)
    return rows


async def read_final(
    store: Any, keys: Sequence[str], *, timeout: float = 60.0, batch: int = 500
) -> dict[str, object]:
    """Read ``keys`` through ``store`` for the lost-write check, retrying failed reads (a
    server that was just restarted) until ``timeout``. Absent keys are left out."""
    deadline = time.monotonic() + timeout
    final: dict[str, object] = {}
    for start in range(0, len(keys), batch):
        chunk = list(keys[start : start + batch])
        while True:
            try:
                final.update(await store.get_many(chunk))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    return final
