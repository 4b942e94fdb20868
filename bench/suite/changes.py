"""``--only changes``: the change feed (``store.changes``): what it costs writers, and how soon a
watcher in another process sees a write.

Four workloads per backend (memory, SQLite, PostgreSQL, Redis, hybrid), every subject in one
run against the same server, the subjects taking turns:

* ``<backend> set no feed p50`` (µs) and ``<backend> set_many 10k no feed`` (keys/s): a
  namespace whose feed was never enabled, written by fleetmem as it is now (subject
  ``fleetmem``) and by fleetmem before the change feed existed (subject ``before #19``: commit
  :data:`BASE_COMMIT`, taken from this checkout's git history with ``git archive``). The two
  versions cannot share one interpreter, so each runs in a child process of its own (the same
  code below, ``PYTHONPATH`` pointing at one version's ``src``), side by side on the same
  server. Subject ``control`` is fleetmem as it is now in a third process: ``fleetmem`` vs
  ``control`` is what two processes running the same code differ by on this machine at this
  moment, the floor below which the comparison with before means nothing. The three take
  turns block by block (a block: 250 single ``set`` calls in a full run, 80 blocks each; or
  one ``set_many`` of 10,000, 20 each), the first one rotating: short blocks, so that the
  machine's drift weighs on all alike. Each has its own namespace and, on PostgreSQL, its own
  schema (``bench_changes_base`` at the old schema revision, ``bench_changes_head`` and
  ``bench_changes_control`` at the current one; all dropped at the end), on SQLite its own
  file. Target: within 3% of before (``p50`` ratio, and the time ratio of ``set_many``).
* ``<backend> set feed on p50`` and ``<backend> set_many 10k feed on``: the same calls on a
  namespace whose feed is enabled (subject ``fleetmem``) against a namespace without one
  (subject ``no feed``), one store, one process: single sets interleaved call by call, batches
  taking turns. Targets: ``set`` ≤ 1.3x, ``set_many`` of 10,000 ≤ 1.5x (time).
* ``<backend> set feed watched p50`` and ``<backend> set_many 10k feed watched``: the same with
  a watcher (``watch("*")``) following the namespace from another process (from a task of this
  process on the in-memory store), so that each write also pays for waking it (on PostgreSQL a
  ``NOTIFY``). Measured in blocks (1,000 sets, or one batch) that take turns with ``no feed``
  blocks, the run waiting after each watched block until the watcher has seen every change:
  its reads do not spill into the other subject's calls. Same targets.
* ``<backend> watch latency p50`` / ``p99`` (ms): a writer in another process sets one key every
  10 ms (200 writes a repetition in a full run), each value carrying ``time.time()`` taken just
  before its ``set``; the watcher's ``async for`` takes ``time.time()`` when the change is
  yielded. Target: p99 ≤ 100 ms. The run checks that every write was yielded once, in order.
  Subject ``raw``, the drivers' ceiling for a notification that carries its data (and loses it
  when nobody listens): on PostgreSQL an upsert whose statement also calls ``pg_notify`` with
  the value, received by an asyncpg ``LISTEN``; on Redis an ``XADD`` to a stream read by a loop
  of ``XREAD BLOCK``. No Python key-value peer offers a lossless feed to compare with. On the
  in-memory store the writer is a task of the same process (its store is that process's).

A backend whose feed is not in this build (``enable()`` raises ``ConfigurationError``) is
measured without a feed only, with a note. The targets are notes with their figure and verdict
(they are ratios to subjects the other sections do not have).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from fleetmem.errors import ConfigurationError, FleetmemError

from .timing import interleaved_latency, load_average, sequential_latency
from .workloads import SMOKE, VALUE, Bench

#: fleetmem before the change feed (issue #19): what "a namespace without a feed pays nothing"
#: is measured against.
BASE_COMMIT = "9ebca92"
BEFORE = "before #19"
#: fleetmem as it is now, in a third process: the no-feed comparison's noise floor.
CONTROL = "control"
#: PostgreSQL schemas of the two versions (each its own tables, migrated to its own revision).
BASE_SCHEMA = "bench_changes_base"
HEAD_SCHEMA = "bench_changes_head"
CONTROL_SCHEMA = "bench_changes_control"
#: Namespaces: the no-feed comparison's two versions, then the feed workloads' (one store).
NS_BASE = "bench-changes-base"
NS_HEAD = "bench-changes-head"
NS_CONTROL = "bench-changes-control"
NS_OFF = "bench-changes-off"
NS_ON = "bench-changes-on"
NS_WATCHED = "bench-changes-watched"
NS_LATENCY = "bench-changes-latency"
#: The raw latency peers: a table (in HEAD_SCHEMA) and channel on PostgreSQL, a stream on Redis.
RAW_TABLE = "raw_changes"
RAW_CHANNEL = "bench_raw_changes"
RAW_STREAM = "rawc:{bench}:changes"

#: Keys of the batch workloads (the workload names say 10k).
BATCH = 10_000
#: The latency writer's pace.
INTERVAL = 0.010
#: Targets of the issue (reported as notes, never asserted).
NO_FEED_BOUND = 1.03
SET_BOUND = 1.3
SET_MANY_BOUND = 1.5
P99_MS = 100.0

#: (workload suffix, reference subject, latency (else throughput), bound, what): each a cost
#: ratio, fleetmem's p50 over the reference's or the reference's keys/s over fleetmem's.
_TARGETS: list[tuple[str, str, bool, float, str]] = [
    ("set no feed p50", BEFORE, True, NO_FEED_BOUND, f"set without a feed ≤ 1.03x {BEFORE} (p50)"),
    (
        "set_many 10k no feed",
        BEFORE,
        False,
        NO_FEED_BOUND,
        f"set_many 10k without a feed ≤ 1.03x {BEFORE} (time)",
    ),
    ("set feed on p50", "no feed", True, SET_BOUND, "set with a feed ≤ 1.3x without (p50)"),
    (
        "set feed watched p50",
        "no feed",
        True,
        SET_BOUND,
        "set with a watched feed ≤ 1.3x without (p50)",
    ),
    (
        "set_many 10k feed on",
        "no feed",
        False,
        SET_MANY_BOUND,
        "set_many 10k with a feed ≤ 1.5x without (time)",
    ),
    (
        "set_many 10k feed watched",
        "no feed",
        False,
        SET_MANY_BOUND,
        "set_many 10k with a watched feed ≤ 1.5x without (time)",
    ),
]

STEPS_PER_BACKEND = 4
BACKENDS = ("memory", "sqlite", "postgres", "redis", "hybrid")
BENCH_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ChangeSizes:
    block: int  # single sets per block of the no-feed comparison
    watched_block: int  # single sets per block of the watched feed
    blocks_per_rep: int  # blocks of the no-feed comparison per subject and repetition
    batches_per_rep: int  # set_many of the no-feed comparison per subject and repetition
    single: int  # interleaved sets per subject and repetition (feed on vs off)
    keys: int  # distinct keys of the single sets
    writes: int  # latency writes per subject and repetition
    settle: float  # seconds a watcher gets to start before the first write


def change_sizes(bench: Bench) -> ChangeSizes:
    """A full run keeps the section to ~4 minutes on a 2-vCPU machine; ``--quick`` to ~1."""
    if bench.sizes == SMOKE:
        return ChangeSizes(30, 30, 2, 1, 50, 100, 20, 0.1)
    if bench.quick:
        return ChangeSizes(100, 300, 6, 2, 500, 300, 100, 0.3)
    return ChangeSizes(250, 1000, 16, 4, 2000, 1000, 200, 0.3)


def change_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    return STEPS_PER_BACKEND * (2 + int(pg) + int(rs) + int(pg and rs))


def _key(i: int, keys: int) -> str:
    return f"s{i % keys:05d}"


def _batch() -> dict[str, Any]:
    return {f"m{i:05d}": VALUE for i in range(BATCH)}


def _stamped(i: int) -> dict[str, Any]:
    """A latency write's value: its number and the time just before its write."""
    return {**VALUE, "i": i, "t": time.time()}


# --------------------------------------------------------------------------- both processes


async def open_store(config: dict[str, Any]) -> Any:
    """A connected store from a config (the parent's and the child's): ``backend``,
    ``namespace``, and ``path`` / ``dsn`` + ``schema`` / ``url`` as the backend needs. Only
    what fleetmem before :data:`BASE_COMMIT` had too."""
    backend, namespace = config["backend"], config["namespace"]
    store: Any
    if backend == "memory":
        from fleetmem.backends.memory import InMemoryStore

        store = InMemoryStore(namespace=namespace)
    elif backend == "sqlite":
        from fleetmem.backends.sqlite import SQLiteStore

        store = SQLiteStore(config["path"], namespace=namespace)
    elif backend == "postgres":
        from fleetmem.backends.postgres import PostgresStore

        store = PostgresStore.from_url(config["dsn"], namespace=namespace, schema=config["schema"])
    elif backend == "redis":
        from fleetmem.backends.redis import RedisStore

        store = RedisStore.from_url(config["url"], namespace=namespace)
    else:
        from fleetmem.backends.hybrid import HybridStore

        store = HybridStore.from_urls(
            config["dsn"],
            config["url"],
            namespace=namespace,
            postgres_options={"schema": config["schema"]},
        )
    await store.connect()
    return store


async def paced_writes(store: Any, n: int, interval: float, prefix: str) -> None:
    """``n`` sets of ``prefix<i>``, one every ``interval`` seconds (back to back when a set
    takes longer), each value stamped just before its set."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    for i in range(n):
        due += interval
        await store.set(f"{prefix}{i:05d}", _stamped(i))
        await asyncio.sleep(max(0.0, due - loop.time()))


class LocalWatcher:
    """``watch("*")`` on a store of this process, counting the changes it yields."""

    def __init__(self) -> None:
        self.seen = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self, store: Any) -> None:
        since = await store.changes.cursor()  # every write after this returns is counted
        self._task = asyncio.create_task(self._consume(store, since))

    async def _consume(self, store: Any, since: str) -> None:
        async for _change in store.changes.watch("*", since=since):
            self.seen += 1

    async def caught_up(self, at_least: int, timeout: float = 60.0) -> int:
        """Wait until the watcher has yielded ``at_least`` changes (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.seen < at_least and time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # its failure
                break
            await asyncio.sleep(0.002)
        return self.seen

    async def stop(self) -> int:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.seen


# --------------------------------------------------------------------------- the child process

_RAW_PG_WRITE = (
    "WITH w AS (INSERT INTO {table} (key, value) VALUES ($1, $2::text::jsonb) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value RETURNING 1) "
    "SELECT pg_notify($3, $2::text) FROM w"
)


class _Worker:
    """The child's commands (one JSON object a line on stdin, one reply a line): open and close
    stores, time single sets and batches, write at a pace, watch."""

    def __init__(self) -> None:
        self.stores: dict[str, Any] = {}
        self.watchers: dict[str, LocalWatcher] = {}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "open":
            self.stores[cmd["name"]] = await open_store(cmd["config"])
            import fleetmem

            return {"fleetmem": str(Path(fleetmem.__file__).resolve().parents[1])}
        if op == "sets":
            store, keys = self.stores[cmd["store"]], int(cmd["keys"])

            async def one(i: int) -> Any:
                return await store.set(_key(i, keys), VALUE)

            gc.collect()
            p50, ops = await sequential_latency(one, int(cmd["n"]))
            return {"p50_us": p50, "ops": ops}
        if op == "set_many":
            store, items = self.stores[cmd["store"]], _batch()
            gc.collect()
            t0 = time.perf_counter()
            await store.set_many(items)
            return {"keys_per_s": len(items) / (time.perf_counter() - t0)}
        if op == "paced":
            await paced_writes(
                self.stores[cmd["store"]], int(cmd["n"]), float(cmd["interval"]), cmd["prefix"]
            )
            return {}
        if op == "raw_pg_paced":
            await self._raw_pg_paced(cmd)
            return {}
        if op == "raw_redis_paced":
            await self._raw_redis_paced(cmd)
            return {}
        if op == "watch":
            watcher = LocalWatcher()
            await watcher.start(self.stores[cmd["store"]])
            self.watchers[cmd["store"]] = watcher
            return {}
        if op == "caught_up":
            seen = await self.watchers[cmd["store"]].caught_up(int(cmd["at_least"]))
            return {"seen": seen}
        if op == "unwatch":
            return {"seen": await self.watchers.pop(cmd["store"]).stop()}
        if op == "close":
            store = self.stores.pop(cmd["name"])
            try:
                if cmd.get("clear"):
                    await store.clear()
            finally:
                await store.close()
            return {}
        raise ValueError(f"unknown command {op!r}")

    async def _raw_pg_paced(self, cmd: dict[str, Any]) -> None:
        import asyncpg

        conn = await asyncpg.connect(cmd["dsn"])
        try:
            stmt = await conn.prepare(_RAW_PG_WRITE.format(table=cmd["table"]))
            loop = asyncio.get_running_loop()
            due = loop.time()
            for i in range(int(cmd["n"])):
                due += float(cmd["interval"])
                payload = orjson.dumps(_stamped(i)).decode()
                await stmt.fetchval(f"{cmd['prefix']}{i:05d}", payload, cmd["channel"])
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            await conn.close()

    async def _raw_redis_paced(self, cmd: dict[str, Any]) -> None:
        import redis.asyncio as aioredis

        client = aioredis.from_url(cmd["url"])
        try:
            loop = asyncio.get_running_loop()
            due = loop.time()
            for i in range(int(cmd["n"])):
                due += float(cmd["interval"])
                payload = orjson.dumps(_stamped(i))
                await client.xadd(cmd["stream"], {"v": payload}, maxlen=10_000, approximate=True)
                await asyncio.sleep(max(0.0, due - loop.time()))
        finally:
            await client.aclose()

    async def close(self) -> None:
        for watcher in self.watchers.values():
            await watcher.stop()
        for store in self.stores.values():
            with contextlib.suppress(Exception):
                await store.close()


def worker_main() -> None:
    """The child process's entry point. Its replies go to a copy of the original stdout;
    anything else printing to stdout lands on stderr, so the protocol stays clean."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    asyncio.run(_serve(proto))


async def _serve(proto: Any) -> None:
    loop = asyncio.get_running_loop()
    worker = _Worker()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = orjson.loads(line)
            if cmd["op"] == "quit":
                return
            try:
                reply = {"ok": True, **(await worker.handle(cmd))}
            except Exception as exc:  # reported to the parent, which raises it there
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            proto.write(orjson.dumps(reply).decode() + "\n")
            proto.flush()
    finally:
        await worker.close()


class ChildError(RuntimeError):
    """A command failed in a child process (or the child died)."""


class Child:
    """A child process running :func:`worker_main` with one fleetmem version's ``src`` first
    on its path."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, src: Path) -> None:
        self.proc = proc
        self.log = log
        self.src = src

    @classmethod
    async def start(cls, src: Path, log: Path) -> Child:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(src), str(BENCH_DIR), *filter(None, [env.get("PYTHONPATH")])]
        )
        with log.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory: only the paths above, then site-packages
                "-c",
                "from suite.changes import worker_main; worker_main()",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=log.parent,
                env=env,
            )
        return cls(proc, log, src)

    async def call(self, op: str, timeout: float = 300.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps({"op": op, **args}) + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise ChildError(f"the child process ({self.src}) died: {self._log_tail()}")
        reply: dict[str, Any] = orjson.loads(line)
        if not reply.pop("ok"):
            raise ChildError(f"{op} in the child process ({self.src}): {reply['error']}")
        return reply

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(Exception):
                self.proc.stdin.write(b'{"op": "quit"}\n')
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except (TimeoutError, asyncio.TimeoutError):
                self.proc.kill()
                await self.proc.wait()


class ChildWatcher:
    """A :class:`LocalWatcher` in a child process."""

    def __init__(self, child: Child, store: str) -> None:
        self.child = child
        self.store = store

    async def caught_up(self, at_least: int) -> int:
        return int(
            (await self.child.call("caught_up", store=self.store, at_least=at_least))["seen"]
        )

    async def stop(self) -> int:
        return int((await self.child.call("unwatch", store=self.store))["seen"])


class _Watcher(Protocol):
    async def caught_up(self, at_least: int) -> int: ...

    async def stop(self) -> int: ...


# --------------------------------------------------------------------------- the parent


@dataclass
class _Env:
    folder: Path
    base_src: Path | None
    head_src: Path
    dsn: str | None
    url: str | None

    def config(self, backend: str, namespace: str, schema: str, file: str) -> dict[str, Any]:
        return {
            "backend": backend,
            "namespace": namespace,
            "schema": schema,
            "path": str(self.folder / file),
            "dsn": self.dsn,
            "url": self.url,
        }


def _extract_base(folder: Path) -> Path:
    """fleetmem at :data:`BASE_COMMIT` (its ``src`` and ``migrations``) from this checkout's
    git history, into ``folder``; returns its ``src``. ``git archive`` only reads the
    repository: nothing is checked out, nothing to remove but the folder."""
    repo = BENCH_DIR.parent
    out = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", BASE_COMMIT, "src", "migrations"],
        capture_output=True,
        check=False,
        timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode(errors="replace").strip() or "git archive failed")
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(folder, filter="data")
        else:  # pragma: no cover - our own repository's archive
            tar.extractall(folder)  # noqa: S202
    return folder / "src"


async def _drop_schemas(dsn: str | None) -> None:
    if dsn is None:
        return
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for schema in (BASE_SCHEMA, HEAD_SCHEMA, CONTROL_SCHEMA):
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _delete_stream(url: str | None) -> None:
    if url is None:
        return
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        await client.delete(RAW_STREAM)
    finally:
        await client.aclose()


async def bench_changes(bench: Bench, dsn: str | None, url: str | None) -> None:
    """The four workloads on memory and SQLite, and on PostgreSQL, Redis and the hybrid when
    their servers are given."""
    import tempfile

    import fleetmem

    notes = bench.report.notes
    before = load_average()
    sizes = change_sizes(bench)
    with tempfile.TemporaryDirectory(prefix="fleetmem-bench-changes-") as tmp:
        folder = Path(tmp)
        base_src: Path | None = None
        try:
            base_src = _extract_base(folder / "base")
        except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError) as exc:
            notes.append(
                f"changes: no comparison with fleetmem {BEFORE} ({BASE_COMMIT}): it is taken "
                f"from the checkout's git history, which failed: {exc}"
            )
        env = _Env(folder, base_src, Path(fleetmem.__file__).resolve().parents[1], dsn, url)
        notes.append(
            f"changes: {BEFORE} is fleetmem at {BASE_COMMIT}; each version writes from a child "
            f"process of its own, in blocks of {sizes.block:,} sets or one set_many of "
            f"{BATCH:,}, taking turns; latency: one write every {INTERVAL * 1000:.0f} ms, "
            f"{sizes.writes} a repetition, from another process (memory: the same process)"
        )
        await _drop_schemas(dsn)  # a run interrupted before it could drop them
        took: list[str] = []
        try:
            for backend in BACKENDS:
                if backend in ("postgres", "hybrid") and dsn is None:
                    continue
                if backend in ("redis", "hybrid") and url is None:
                    continue
                started = time.monotonic()
                try:
                    await _bench_backend(bench, backend, env)
                except (ChildError, OSError, FleetmemError) as exc:
                    # A backend being built (or a server in trouble) costs its rows, not the run.
                    notes.append(f"changes: {backend} stopped: {type(exc).__name__}: {exc}")
                took.append(f"{backend} {time.monotonic() - started:.0f} s")
        finally:
            await _drop_schemas(dsn)
            await _delete_stream(url)
    notes.append("changes: time per backend: " + ", ".join(took))
    if before:
        notes.append(
            f"changes: 1-minute load average {before} before the section, {load_average()} after"
        )
    _verdicts(bench)


async def _bench_backend(bench: Bench, backend: str, env: _Env) -> None:
    notes = bench.report.notes
    async with contextlib.AsyncExitStack() as stack:
        head = await Child.start(env.head_src, env.folder / f"{backend}-head.log")
        stack.push_async_callback(head.close)
        if env.base_src is not None:
            try:
                await _no_feed(bench, backend, env, head)
            except ChildError as exc:
                notes.append(f"changes: {backend}: the comparison with {BEFORE} failed: {exc}")
        else:
            bench.progress.step(f"{backend} set no feed (skipped)")

        store = await open_store(env.config(backend, NS_OFF, HEAD_SCHEMA, "feed.db"))
        stack.push_async_callback(_close_store, store)
        try:
            for ns in (NS_ON, NS_WATCHED, NS_LATENCY):
                await store.with_namespace(ns).changes.enable()
        except (ConfigurationError, NotImplementedError) as exc:
            notes.append(
                f"changes: {backend}: no change feed in this build, measured without: {exc}"
            )
            for what in ("set feed", "set_many feed", "watch latency"):
                bench.progress.step(f"{backend} {what} (skipped)")
            return
        for ns in (NS_ON, NS_WATCHED, NS_LATENCY):
            stack.push_async_callback(_disable, store.with_namespace(ns))
        await _with_feed(bench, backend, env, store, head)
        await _latency(bench, backend, env, store, head)


async def _close_store(store: Any) -> None:
    try:
        with contextlib.suppress(Exception):
            await store.clear()
    finally:
        await store.close()


async def _disable(view: Any) -> None:
    with contextlib.suppress(Exception):
        await view.changes.disable()
        await view.clear()


# ----- 1. no feed: now against before


async def _no_feed(bench: Bench, backend: str, env: _Env, head: Child) -> None:
    """fleetmem now (``head``, the child that also writes for the later workloads), fleetmem
    before, and the control (fleetmem now in a third process), taking turns block by block."""
    assert env.base_src is not None
    label = f"{backend} set no feed"
    bench.progress.step(f"{label} vs {BEFORE}")
    sizes = change_sizes(bench)
    async with contextlib.AsyncExitStack() as stack:
        base = await Child.start(env.base_src, env.folder / f"{backend}-base.log")
        stack.push_async_callback(base.close)
        control = await Child.start(env.head_src, env.folder / f"{backend}-control.log")
        stack.push_async_callback(control.close)
        children = {"fleetmem": head, BEFORE: base, CONTROL: control}
        setups = {
            "fleetmem": (NS_HEAD, HEAD_SCHEMA, "head.db"),
            BEFORE: (NS_BASE, BASE_SCHEMA, "base.db"),
            CONTROL: (NS_CONTROL, CONTROL_SCHEMA, "control.db"),
        }
        for name, child in children.items():
            ns, schema, file = setups[name]
            opened = await child.call(
                "open", name="nofeed", config=env.config(backend, ns, schema, file)
            )
            stack.push_async_callback(_close_in, child, "nofeed")
            if Path(opened["fleetmem"]) != child.src.resolve():
                raise ChildError(f"{name} imported fleetmem from {opened['fleetmem']}")
        for child in children.values():  # warm up: every key written once, statements, scripts
            await child.call("sets", store="nofeed", n=sizes.keys, keys=sizes.keys)
            await child.call("set_many", store="nofeed")
        names = list(children)
        p50s: dict[str, list[float]] = {n: [] for n in names}
        rates: dict[str, list[float]] = {n: [] for n in names}
        for block in range(bench.reps * sizes.blocks_per_rep):
            for name in names[block % 3 :] + names[: block % 3]:
                got = await children[name].call(
                    "sets", store="nofeed", n=sizes.block, keys=sizes.keys
                )
                p50s[name].append(got["p50_us"])
                rates[name].append(got["ops"])
        bench.record(label + " p50", "us", p50s)
        bench.record(label, "ops/s", rates)
        batch: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(bench.reps * sizes.batches_per_rep):
            for name in names[rep % 3 :] + names[: rep % 3]:
                got = await children[name].call("set_many", store="nofeed")
                batch[name].append(got["keys_per_s"])
        bench.record(f"{backend} set_many 10k no feed", "keys/s", batch)
        parts = []
        for ref in (BEFORE, CONTROL):
            pairs = [a / b for a, b in zip(p50s["fleetmem"], p50s[ref], strict=True)]
            many = [b / a for a, b in zip(batch["fleetmem"], batch[ref], strict=True)]
            parts.append(
                f"fleetmem / {ref}: set p50 {_spread(pairs)}, set_many time {_spread(many)}"
            )
        bench.report.notes.append(
            f"changes: {backend} no feed, block by block (min / median / max): " + "; ".join(parts)
        )


async def _close_in(child: Child, name: str) -> None:
    with contextlib.suppress(ChildError):
        await child.call("close", name=name, clear=True)


def _spread(ratios: list[float]) -> str:
    """min / median / max of per-block ratios: how far one block's figure is from the truth."""
    if not ratios:
        return "-"
    return f"{min(ratios):.3f} / {statistics.median(ratios):.3f} / {max(ratios):.3f}"


# ----- 2. with a feed: on and watched against off


async def _with_feed(bench: Bench, backend: str, env: _Env, store: Any, head: Child) -> None:
    sizes = change_sizes(bench)
    off, on, watched = store, store.with_namespace(NS_ON), store.with_namespace(NS_WATCHED)
    views = {"fleetmem": on, "no feed": off, "watched": watched}
    watcher: _Watcher
    if backend == "memory":
        local = LocalWatcher()
        await local.start(watched)
        watcher = local
    else:
        await head.call(
            "open", name="watched", config=env.config(backend, NS_WATCHED, HEAD_SCHEMA, "feed.db")
        )
        await head.call("watch", store="watched")
        watcher = ChildWatcher(head, "watched")
    expected = 0
    items = _batch()
    behind: list[str] = []

    async def drain(at_least: int) -> None:
        """Wait for the watcher to catch up; once it failed to within a minute, not again."""
        if not behind:
            seen = await watcher.caught_up(at_least)
            if seen < at_least:
                behind.append(f"{seen:,} of {at_least:,} changes seen after a minute")

    def setter(view: Any) -> Callable[[int], Awaitable[Any]]:
        async def one(i: int) -> Any:
            return await view.set(_key(i, sizes.keys), VALUE)

        return one

    sets = {name: setter(view) for name, view in views.items()}
    try:
        for name, view in views.items():  # warm up: every key written once, statements, scripts
            await sequential_latency(sets[name], sizes.keys)
            await view.set_many(items)
        expected += sizes.keys + BATCH
        await drain(expected)

        label = f"{backend} set feed on"
        bench.progress.step(label)
        lat: dict[str, list[float]] = {"fleetmem": [], "no feed": []}
        ops: dict[str, list[float]] = {"fleetmem": [], "no feed": []}
        pair = {name: sets[name] for name in lat}
        for rep in range(bench.reps):
            gc.collect()
            for name, (p50, rate) in (
                await interleaved_latency(pair, sizes.single, seed=rep)
            ).items():
                lat[name].append(p50)
                ops[name].append(rate)
        bench.record(label + " p50", "us", lat)
        bench.record(label, "ops/s", ops)

        # Watched: blocks taking turns with no-feed blocks; after each watched block the run
        # waits for the watcher to catch up, so its reads do not slow the next block down.
        wlat: dict[str, list[float]] = {"fleetmem": [], "no feed": []}
        wops: dict[str, list[float]] = {"fleetmem": [], "no feed": []}
        for rep in range(bench.reps):
            names = ["fleetmem", "no feed"]
            for name in names[rep % 2 :] + names[: rep % 2]:
                gc.collect()
                p50, rate = await sequential_latency(
                    sets["watched" if name == "fleetmem" else "no feed"], sizes.watched_block
                )
                wlat[name].append(p50)
                wops[name].append(rate)
                if name == "fleetmem":
                    expected += sizes.watched_block
                    await drain(expected)
        bench.record(f"{backend} set feed watched p50", "us", wlat)
        bench.record(f"{backend} set feed watched", "ops/s", wops)

        bench.progress.step(f"{backend} set_many 10k feed")
        rates: dict[str, list[float]] = {name: [] for name in views}
        names = list(views)
        for rep in range(bench.reps):
            for name in names[rep % 3 :] + names[: rep % 3]:
                gc.collect()
                t0 = time.perf_counter()
                await views[name].set_many(items)
                rates[name].append(BATCH / (time.perf_counter() - t0))
                if name == "watched":
                    expected += BATCH
                    await drain(expected)
        await drain(expected)  # the count below is final
        bench.record(
            f"{backend} set_many 10k feed on",
            "keys/s",
            {"fleetmem": rates["fleetmem"], "no feed": rates["no feed"]},
        )
        bench.record(
            f"{backend} set_many 10k feed watched",
            "keys/s",
            {"fleetmem": rates["watched"], "no feed": rates["no feed"]},
        )
    finally:
        seen = await watcher.stop()
    where = "a task of this process" if backend == "memory" else "another process"
    if behind:
        bench.report.notes.append(
            f"changes: {backend}: the watcher fell behind ({behind[0]}): the watched figures "
            "after that include its backlog"
        )
    bench.report.notes.append(
        f"changes: {backend}: the watcher in {where} saw {seen:,} of the {expected:,} changes "
        "written to its namespace"
        + ("" if seen == expected else " (NOT every change, or more than once)")
    )


# ----- 3. watch latency


async def _latency(bench: Bench, backend: str, env: _Env, store: Any, head: Child) -> None:
    sizes = change_sizes(bench)
    label = f"{backend} watch latency"
    bench.progress.step(label)
    view = store.with_namespace(NS_LATENCY)
    if backend != "memory":
        await head.call(
            "open", name="latency", config=env.config(backend, NS_LATENCY, HEAD_SCHEMA, "feed.db")
        )
    n = sizes.writes
    timeout = n * INTERVAL + 60

    async def fleetmem_rep(rep: int) -> tuple[list[float], str]:
        prefix = f"lat{rep}/"

        async def writes() -> None:
            if backend == "memory":
                await paced_writes(view, n, INTERVAL, prefix)
            else:
                await head.call(
                    "paced", store="latency", n=n, interval=INTERVAL, prefix=prefix, timeout=timeout
                )

        return await _fleetmem_latency(view, prefix, n, writes, sizes.settle, timeout)

    subjects: dict[str, Callable[[int], Awaitable[tuple[list[float], str]]]] = {
        "fleetmem": fleetmem_rep
    }
    if backend == "postgres":
        assert env.dsn is not None
        subjects["raw"] = lambda rep: _raw_pg_latency(env.dsn or "", head, rep, n, sizes.settle)
    elif backend == "redis":
        subjects["raw"] = lambda rep: _raw_redis_latency(env.url or "", head, rep, n, sizes.settle)
    p50s: dict[str, list[float]] = {name: [] for name in subjects}
    p99s: dict[str, list[float]] = {name: [] for name in subjects}
    problems: list[str] = []
    names = list(subjects)
    for rep in range(bench.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            gc.collect()
            samples, problem = await subjects[name](rep)
            if problem:
                problems.append(f"{name} repetition {rep + 1}: {problem}")
            if samples:
                p50s[name].append(_percentile(samples, 0.5))
                p99s[name].append(_percentile(samples, 0.99))
    bench.record(label + " p50", "ms", {k: v for k, v in p50s.items() if v})
    bench.record(label + " p99", "ms", {k: v for k, v in p99s.items() if v})
    if problems:
        bench.report.notes.extend(
            f"changes: {label} NOT every write once, in order: {p}" for p in problems
        )
    else:
        bench.report.notes.append(
            f"changes: {label}: every subject received each write once, in order, in every "
            "repetition"
        )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _check(got: list[tuple[int, float]], n: int) -> str:
    """What broke "every write received once, in order" (empty when nothing did)."""
    numbers = [i for i, _ in got]
    if numbers == list(range(n)):
        return ""
    return f"{len(numbers)} received of {n}, {len(set(numbers))} distinct, in order: " + str(
        numbers == sorted(numbers)
    )


async def _fleetmem_latency(
    view: Any,
    prefix: str,
    n: int,
    writes: Callable[[], Awaitable[Any]],
    settle: float,
    timeout: float,
) -> tuple[list[float], str]:
    since = await view.changes.cursor()
    got: list[tuple[int, float]] = []

    async def consume() -> None:
        it = view.changes.watch(prefix + "*", since=since)
        try:
            async for change in it:
                got.append((change.value["i"], (time.time() - change.value["t"]) * 1000))
                if len(got) >= n:
                    return
        finally:
            await it.aclose()

    task = asyncio.create_task(consume())
    try:
        await asyncio.sleep(settle)  # the watcher reads, finds nothing, and waits
        await writes()
        await asyncio.wait_for(asyncio.shield(task), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return [ms for _, ms in got], _check(got, n)


async def _raw_pg_latency(
    dsn: str, head: Child, rep: int, n: int, settle: float
) -> tuple[list[float], str]:
    """An asyncpg ``LISTEN`` receiving the ``pg_notify`` of the writer's upserts."""
    import asyncpg

    table = f'"{HEAD_SCHEMA}".{RAW_TABLE}'
    conn = await asyncpg.connect(dsn)
    got: list[tuple[int, float]] = []
    done = asyncio.Event()

    def received(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        value = orjson.loads(payload)
        got.append((value["i"], (time.time() - value["t"]) * 1000))
        if len(got) >= n:
            done.set()

    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{HEAD_SCHEMA}"')
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, value jsonb NOT NULL)"
        )
        await conn.add_listener(RAW_CHANNEL, received)
        await asyncio.sleep(settle)
        timeout = n * INTERVAL + 60
        await head.call(
            "raw_pg_paced",
            dsn=dsn,
            table=table,
            channel=RAW_CHANNEL,
            n=n,
            interval=INTERVAL,
            prefix=f"lat{rep}/",
            timeout=timeout,
        )
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
        await conn.remove_listener(RAW_CHANNEL, received)
    finally:
        await conn.close()
    return [ms for _, ms in got], _check(got, n)


async def _raw_redis_latency(
    url: str, head: Child, rep: int, n: int, settle: float
) -> tuple[list[float], str]:
    """A loop of ``XREAD BLOCK`` on a connection of its own, reading the writer's ``XADD``."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    got: list[tuple[int, float]] = []

    async def consume() -> None:
        last: Any = "0-0"
        while len(got) < n:
            reply: Any = await client.xread({RAW_STREAM: last}, count=1000, block=1000)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    value = orjson.loads(fields[b"v"])
                    got.append((value["i"], (time.time() - value["t"]) * 1000))

    try:
        await client.delete(RAW_STREAM)
        task = asyncio.create_task(consume())
        try:
            await asyncio.sleep(settle)
            timeout = n * INTERVAL + 60
            await head.call(
                "raw_redis_paced",
                url=url,
                stream=RAW_STREAM,
                n=n,
                interval=INTERVAL,
                prefix=f"lat{rep}/",
                timeout=timeout,
            )
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await client.aclose()
    return [ms for _, ms in got], _check(got, n)


# --------------------------------------------------------------------------- verdicts


def _verdicts(bench: Bench) -> None:
    """A note per change-feed target measured: its figure and whether it was met."""
    report = bench.report

    def median(workload: str, subject: str) -> float | None:
        row = report.get(workload, subject)
        return statistics.median(row.values) if row is not None and row.values else None

    def verdict(text: str, value: float, bound: float, unit: str = "x") -> None:
        figure = f"{value:.1f} ms" if unit == "ms" else f"{value:.3f}x"
        report.notes.append(
            f"changes target {text}: {figure} ({'met' if value <= bound else 'NOT met'})"
        )

    def ratio(workload: str, ref: str, latency: bool) -> float | None:
        mine, theirs = median(workload, "fleetmem"), median(workload, ref)
        if mine is None or theirs is None or not mine or not theirs:
            return None
        return mine / theirs if latency else theirs / mine  # a cost: > 1 is slower

    for backend in BACKENDS:
        for suffix, ref, latency, bound, text in _TARGETS:
            value = ratio(f"{backend} {suffix}", ref, latency)
            if value is not None:
                verdict(f"{backend} {text}", value, bound)
        p99 = median(f"{backend} watch latency p99", "fleetmem")
        if p99 is not None:
            verdict(f"{backend} watch latency p99 ≤ {P99_MS:g} ms", p99, P99_MS, "ms")
