"""The child process of the change-feed tests (``test_change_processes.py``), and the plan its
writers follow.

Run as ``python change_worker.py '<json spec>'``; it opens the store the spec names
(:func:`open_store`: the specs of ``lease_worker.store_spec``, plus ``options`` passed to the
store) and talks to the test through one JSON object per line on stdout, and lines on stdin.
Every line is flushed at once, so a line the test read was printed before the process was
killed: an ``op`` line printed after a write returned is an acknowledged write. The same
coroutines run as tasks of the test's own process on the in-memory store (:func:`run`, with
``emit`` and ``command`` of the test's). Three modes:

``write``
    Prints ``ready``, waits for ``go``, then makes ``ops`` writes: write number ``i`` is
    :func:`plan` ``(index, i, ...)`` -- a ``set``, ``set_many``, ``set_if_absent``,
    ``compare_and_set``, ``incr``, ``delete``, ``expire`` or ``persist`` over keys that every
    writer shares -- and prints ``op`` (``i``, whether it wrote, the version or number it
    returned) once it returned. The plan depends on nothing but its arguments, so the test
    knows what each write was, including the one a killed writer had in flight. Every value
    written carries a token no other write uses (:func:`value_of`), so each change names its
    write. With ``seconds``, write ``i`` does not start before ``i * seconds / ops`` (the run
    lasts that long however fast the backend is: the faults the test injects meet it running).
    A ``VersionConflictError`` of ``compare_and_set`` is an outcome (``ok`` false); any other
    error ends the process. With ``kill_at``, the writer starts that write, waits
    ``kill_delay`` seconds, prints ``killing`` (and whether the write had returned) and kills
    itself with SIGKILL, closing nothing.

``read``
    Pages through the feed with ``store.changes.read(since=..., limit=...)`` from ``since``,
    limits varying, printing each page (``page``: since, limit, changes, cursor) until
    ``finish <cursor>`` arrived and a read at or past that cursor came back empty; then
    ``end``.

``watch``
    One ``store.changes.watch(pattern, partition, since)`` task per entry of ``watches``,
    printing every change as ``change`` (with the watch's number). After ``finish <cursor>``
    it waits until the first watch (which must watch everything) yielded that cursor, and
    each other watch the last change of the first one's up to there that its filter passes;
    then it closes the store, which must end every watch normally (``closed`` with how each
    ended), and prints ``end``. A watch that raises prints ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fleetmem import Change, VersionConflictError

#: The keys every writer writes (``set`` and friends, ``delete``, ``expire``) ...
KEYS = tuple(f"k{n:02d}" for n in range(24))
#: ... and the counters (only ever ``incr`` by 1: a counter's value is its version).
COUNTERS = ("c0", "c1", "c2")
#: The TTL of the writes that set one: far longer than a run, so nothing expires during it
#: (an expiry is not a change, and would restart a key's versions unseen).
LONG_TTL = 600.0
#: The partitions a write may move a key to (``None``: keep the key's, or ``"default"``).
PARTITIONS: tuple[str | None, ...] = (None, None, None, None, "p1", "p2")

Emit = Callable[[dict[str, Any]], None]
Command = Callable[[], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Step:
    """One planned write: ``op`` on ``keys`` (one key, but for ``set_many``), with ``ttl`` and
    ``partition``; ``stale`` makes a ``compare_and_set`` expect a version one past the one it
    read (it fails unless another write raced it there)."""

    op: str
    keys: tuple[str, ...]
    ttl: float | None = None
    partition: str | None = None
    stale: bool = False


#: (op, weight) of the main test's writers, and of the writers that are killed, which write
#: large ``set_many`` batches often, so that a kill is likely to land in the middle of one.
MIX = {
    "main": (
        ("set", 26),
        ("set_many", 14),
        ("set_if_absent", 10),
        ("compare_and_set", 16),
        ("incr", 12),
        ("delete", 11),
        ("expire", 7),
        ("persist", 4),
    ),
    "kill": (
        ("set", 20),
        ("set_many", 40),
        ("compare_and_set", 10),
        ("incr", 10),
        ("delete", 14),
        ("expire", 6),
    ),
}


def plan(writer: int, i: int, *, seed: int, mix: str) -> Step:
    """Write number ``i`` of writer ``writer``: a function of its arguments only."""
    rng = random.Random(f"{seed}/{writer}/{i}")
    ops, weights = zip(*MIX[mix], strict=True)
    op = rng.choices(ops, weights)[0]
    ttl = LONG_TTL if rng.random() < 0.2 else None
    partition = rng.choice(PARTITIONS)
    if op == "incr":
        return Step(op, (rng.choice(COUNTERS),))
    if op == "set_many":
        size = rng.randint(8, 20) if mix == "kill" else rng.randint(2, 6)
        return Step(op, tuple(rng.sample(KEYS, size)), ttl, partition)
    key = rng.choice(KEYS)
    if op in ("delete", "persist"):
        return Step(op, (key,))
    if op == "expire":
        return Step(op, (key,), LONG_TTL)
    return Step(op, (key,), ttl, partition, stale=op == "compare_and_set" and rng.random() < 0.15)


def token_of(writer: int, i: int, j: int) -> str:
    return f"{writer}.{i}.{j}"


def value_of(writer: int, i: int, j: int) -> Any:
    """The value item ``j`` of write ``i`` of ``writer`` writes: its token, and payloads of
    several shapes (text beyond ASCII, nesting, floats, a few KiB) that must come back in the
    change exactly as ``get`` returns them."""
    tok = token_of(writer, i, j)
    kind = (i + j) % 5
    if kind == 0:
        return {"tok": tok}
    if kind == 1:
        return {"tok": tok, "text": 'naïve ☃ 𝄞 \u2028 "q" \\', "n": i}
    if kind == 2:
        return {"tok": tok, "list": [1, 2.5, None, True, "x"], "nested": {"a": {"b": [j, -i]}}}
    if kind == 3:
        return {"tok": tok, "big": "x" * 3000}
    return {"tok": tok, "f": -0.1, "e": 1.5e300, "empty": {}}


def change_to_json(change: Change) -> dict[str, Any]:
    return {
        "cursor": change.cursor,
        "op": change.op,
        "key": change.key,
        "partition": change.partition,
        "version": change.version,
        "value": change.value,
        "expires_at": None if change.expires_at is None else change.expires_at.isoformat(),
        "at": change.at.isoformat(),
    }


def open_store(spec: dict[str, Any]) -> Any:
    """The (not yet connected) store that ``spec`` names: ``backend`` is one of ``sqlite``
    (``path``), ``postgres`` (``dsn``), ``redis`` / ``cluster`` (``url``), ``hybrid`` (``dsn``
    and ``url``), in namespace ``namespace``, with the store's keyword ``options``."""
    backend = spec["backend"]
    namespace = spec["namespace"]
    options: dict[str, Any] = spec.get("options") or {}
    if backend == "sqlite":
        from fleetmem.backends.sqlite import SQLiteStore

        return SQLiteStore(spec["path"], namespace=namespace, **options)
    if backend == "postgres":
        from fleetmem.backends.postgres import PostgresStore

        return PostgresStore.from_url(spec["dsn"], namespace=namespace, **options)
    if backend in ("redis", "cluster"):
        from fleetmem.backends.redis import RedisStore

        return RedisStore.from_url(spec["url"], namespace=namespace, **options)
    if backend == "hybrid":
        from fleetmem.backends.hybrid import HybridStore

        return HybridStore.from_urls(spec["dsn"], spec["url"], namespace=namespace, **options)
    raise ValueError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------- write


async def _write_one(store: Any, writer: int, i: int, step: Step) -> dict[str, Any]:
    """Make write ``step``; what it returned."""
    op, key = step.op, step.keys[0]
    ttl, partition = step.ttl, step.partition
    out: dict[str, Any] = {"op": op, "ok": True}
    if op == "set":
        entry = await store.set(key, value_of(writer, i, 0), ttl=ttl, partition=partition)
        out["version"] = entry.version
    elif op == "set_many":
        items = {k: value_of(writer, i, j) for j, k in enumerate(step.keys)}
        out["n"] = await store.set_many(items, ttl=ttl, partition=partition)
    elif op == "set_if_absent":
        value = value_of(writer, i, 0)
        out["ok"] = await store.set_if_absent(key, value, ttl=ttl, partition=partition)
    elif op == "compare_and_set":
        current = await store.get_entry(key)
        expected = 0 if current is None else current.version
        if step.stale:
            expected += 1
        out["expected"] = expected
        try:
            entry = await store.compare_and_set(
                key, value_of(writer, i, 0), version=expected, ttl=ttl, partition=partition
            )
        except VersionConflictError as exc:
            out["ok"] = False
            out["current"] = exc.current_version
        else:
            out["version"] = entry.version
    elif op == "incr":
        out["value"] = await store.incr(key)
    elif op == "delete":
        out["ok"] = await store.delete(key)
    elif op == "expire":
        out["ok"] = await store.expire(key, LONG_TTL)
    elif op == "persist":
        out["ok"] = await store.persist(key)
    else:
        raise ValueError(f"unknown op {op!r}")
    return out


async def _write(store: Any, spec: dict[str, Any], emit: Emit, command: Command) -> None:
    writer: int = spec["index"]
    ops: int = spec["ops"]
    seconds: float = spec.get("seconds") or 0.0
    seed: int = spec["seed"]
    mix: str = spec["mix"]
    await store.get_entry(KEYS[0])  # connections open before the start
    emit({"event": "ready", "pid": os.getpid()})
    line = await command()
    if line != "go":
        raise SystemExit(f"expected 'go', got {line!r}")
    kill_at: int | None = spec.get("kill_at")
    started = time.monotonic()
    written = 0
    for i in range(ops):
        if seconds:
            ahead = started + i * seconds / ops - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        if i == kill_at:
            # Start the write, let it run for kill_delay seconds (0: until it first waits,
            # its request sent), then die in the middle of it.
            task = asyncio.ensure_future(
                _write_one(store, writer, i, plan(writer, i, seed=seed, mix=mix))
            )
            await asyncio.sleep(spec["kill_delay"])
            emit({"event": "killing", "i": i, "returned": task.done()})
            os.kill(os.getpid(), signal.SIGKILL)
        out = await _write_one(store, writer, i, plan(writer, i, seed=seed, mix=mix))
        written += out["ok"]
        emit({"event": "op", "w": writer, "i": i, **out})
    emit({"event": "done", "ops": ops, "wrote": written, "seconds": time.monotonic() - started})


# ---------------------------------------------------------------- read


async def _finish_target(command: Command) -> str:
    line = await command()
    verb, _, cursor = line.partition(" ")
    if verb != "finish" or not cursor:
        raise SystemExit(f"expected 'finish <cursor>', got {line!r}")
    return cursor


async def _read(store: Any, spec: dict[str, Any], emit: Emit, command: Command) -> None:
    rng = random.Random(spec.get("seed", 0))
    cursor: str = spec["since"]
    target_task = asyncio.ensure_future(_finish_target(command))
    await store.changes.read(since=cursor, limit=1)  # connections open before the start
    emit({"event": "ready", "pid": os.getpid()})
    pages = 0
    while True:
        limit = rng.choice((1, 3, 50, 500, 1000, rng.randint(1, 300)))
        batch = await store.changes.read(since=cursor, limit=limit)
        pages += 1
        emit(
            {
                "event": "page",
                "since": cursor,
                "limit": limit,
                "changes": [change_to_json(change) for change in batch.changes],
                "cursor": batch.cursor,
            }
        )
        cursor = batch.cursor
        if batch.changes:
            continue
        if target_task.done() and cursor >= target_task.result():
            break
        await asyncio.sleep(0.02)
    emit({"event": "end", "pages": pages, "cursor": cursor})


# ---------------------------------------------------------------- watch


def _passes(change: dict[str, Any], pattern: str, partition: str | None) -> bool:
    """What the test's watches filter by: ``*`` or a prefix then ``*``; ``clear`` passes."""
    if change["op"] == "clear":
        return True
    if partition is not None and change["partition"] != partition:
        return False
    assert pattern.endswith("*") and "*" not in pattern[:-1], pattern
    return change["key"] is not None and change["key"].startswith(pattern[:-1])


async def _watch(store: Any, spec: dict[str, Any], emit: Emit, command: Command) -> None:
    watches: list[dict[str, Any]] = spec["watches"]
    assert watches[0]["pattern"] == "*" and watches[0]["partition"] is None, watches[0]
    reconnect_timeout: float = spec.get("reconnect_timeout", 30.0)
    close_store: bool = spec.get("close_store", True)
    seen: list[list[dict[str, Any]]] = [[] for _ in watches]
    progress = asyncio.Event()

    async def follow(number: int, watch: dict[str, Any]) -> None:
        changes = store.changes.watch(
            watch["pattern"],
            watch["partition"],
            since=watch["since"],
            reconnect_timeout=reconnect_timeout,
        )
        async for change in changes:
            record = change_to_json(change)
            seen[number].append(record)
            emit({"event": "change", "watch": number, "change": record})
            progress.set()

    await store.changes.read(since=watches[0]["since"], limit=1)  # connected before the start
    tasks = [asyncio.create_task(follow(n, w)) for n, w in enumerate(watches)]
    emit({"event": "ready", "pid": os.getpid()})
    target = await _finish_target(command)

    def last(number: int) -> str | None:
        return seen[number][-1]["cursor"] if seen[number] else None

    def arrived() -> bool:
        everything = seen[0]
        if not everything or everything[-1]["cursor"] < target:
            return False
        for number, watch in enumerate(watches[1:], start=1):
            wanted = [
                c["cursor"]
                for c in everything
                if c["cursor"] <= target and _passes(c, watch["pattern"], watch["partition"])
            ]
            have = last(number)
            if wanted and (have is None or have < wanted[-1]):
                return False
        return True

    while not arrived():
        for task in tasks:
            if task.done():
                exc = task.exception()
                emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
                raise SystemExit(1)
        progress.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(progress.wait(), 1.0)
    ended: dict[str, str] = {}
    if close_store:
        closed_at = time.monotonic()
        await store.close()
        _, pending = await asyncio.wait(tasks, timeout=30.0)
        for number, task in enumerate(tasks):
            if task in pending:
                ended[str(number)] = "still running 30 s after the store closed"
                task.cancel()
            elif task.exception() is not None:
                exc = task.exception()
                ended[str(number)] = f"raised {type(exc).__name__}: {exc}"
            else:
                ended[str(number)] = f"ended {time.monotonic() - closed_at:.3f} s after close"
    else:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    emit({"event": "closed", "ended": ended})
    emit(
        {
            "event": "end",
            "counts": [len(s) for s in seen],
            "last": [last(n) for n in range(len(seen))],
        }
    )


# ---------------------------------------------------------------- process


MODES = {"write": _write, "read": _read, "watch": _watch}


async def run(store: Any, spec: dict[str, Any], emit: Emit, command: Command) -> None:
    """Run ``spec["mode"]`` on an open ``store``."""
    await MODES[spec["mode"]](store, spec, emit, command)


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _read_line() -> str:
    """One line of stdin, stripped (``""`` at its end: the test is gone), off the loop."""
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def main(spec: dict[str, Any]) -> None:
    async with open_store(spec) as store:
        await run(store, spec, _emit, _read_line)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
