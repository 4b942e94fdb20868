"""``--only portability``: what ``export_to`` and ``import_from`` cost, and the memory they
hold, on every backend.

Three workloads per backend (memory, SQLite, PostgreSQL, Redis, hybrid), every subject in one
run against the same server, the subjects taking turns repetition by repetition (the first one
alternating):

* ``<backend> export 100k`` (entries/s): a namespace of 100,000 entries (the ~200-byte
  :data:`~suite.workloads.VALUE`, one partition, no TTL) written to a file in a temporary
  directory. Subject ``fleetmem``: ``store.export_to(path)`` (the export format: header,
  entry lines with partition, version, timestamps and expiry, trailer with the SHA-256).
  Subject ``by hand``: what a user would write with the public API, pages of 10,000
  ``keys(after=...)`` + ``get_many()`` written as ``{"key", "value"}`` JSON lines (orjson)
  with a SHA-256 of the lines, to a file in the same directory. Target: fleetmem ≥ 0.7x by
  hand. Subject ``fleetmem file object``: ``export_to`` an open file (no temporary file, no
  rename, no ``fsync``), which shows what the path's guarantee (no partial file, the file on
  disk when the call returns) costs.
* ``<backend> import 100k`` (entries/s): the export above written into an empty namespace
  (cleared between repetitions, not timed). Subject ``fleetmem``: ``import_from(path)`` (its
  check pass over the whole file, then the writes). Subject ``by hand``: the same file read line
  by line (orjson) and written with ``set_many`` per 10,000 entries -- the by-hand side's best
  case, since every entry shares one partition and has no expiry (entries with different
  partitions or expiries would need one call per group). Target: fleetmem ≥ 0.7x by hand.
* ``<backend> replace 100k over 100k`` (entries/s), on the backends whose replace is one
  transaction (SQLite, PostgreSQL, hybrid): the export above imported with
  ``mode="replace"`` into a namespace already holding 100,000 entries (untimed, rewritten
  before each repetition): half of them the file's keys (rewritten), half keys of their own
  between the file's (deleted). Subject ``fleetmem``: ``import_from(path, mode="replace")``.
  Subject ``set_many``: the same entries written with ``set_many`` per 10,000 into the same
  namespace (which deletes nothing: a floor, not an equivalent). It shows that a replace's
  deletes cost about what its writes do -- a replace that compared each key of a page with
  each other (a nested loop over the page) took 4x the time of a merge on PostgreSQL.
* ``<backend> export 1M peak RSS growth`` / ``import 1M peak RSS growth`` (MB): a namespace of
  1,000,000 entries exported to a file, then that file imported into an empty namespace, each
  by a child process of its own: it opens the store, warms up (an export and an import of a
  few entries), reads its resident set size (``VmRSS`` of ``/proc/self/status``), resets its
  peak (``echo 5 > /proc/self/clear_refs``, which sets ``VmHWM`` to the current RSS; where that
  is refused, ``ru_maxrss`` stands in, which the warm-up alone could have set), runs the export
  or import, and reports ``VmHWM`` minus the RSS before. Target: ≤ 200 MB (the contract's
  "about 200 MB"). The in-memory store holds its entries in the process, so only its export is
  measured (the child loads the entries first); importing into it grows the process by the
  entries themselves.

``--quick`` keeps 100,000 entries and measures the peak on 200,000; ``--smoke`` 5,000 and
20,000. The workload names say the sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fleetmem.errors import FleetmemError

from .changes import open_store
from .timing import load_average
from .workloads import SMOKE, VALUE, Bench

#: The PostgreSQL schema of the section (its own tables; dropped at the end).
SCHEMA = "bench_portability"
#: Namespaces: the source of the throughput workloads, their import target, the peak-memory
#: source and its import target (each with the backend's name after it).
NS_SOURCE = "bench-port-src"
NS_TARGET = "bench-port-in"
NS_BIG = "bench-port-big"
NS_BIG_TARGET = "bench-port-big-in"
#: A page of the by-hand export, and a set_many of the by-hand import.
PAGE = 10_000
#: fleetmem exporting to an open file object: no temporary file, rename or ``fsync``.
FILE_OBJECT = "fleetmem file object"
#: Targets of the contract (reported as notes, never asserted).
RATIO_BOUND = 0.7
RSS_BOUND_MB = 200.0

BACKENDS = ("memory", "sqlite", "postgres", "redis", "hybrid")
STEPS_PER_BACKEND = 4
#: The backends of the replace workload (a replace that is one transaction).
REPLACE_BACKENDS = ("sqlite", "postgres", "hybrid")
BENCH_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PortabilitySizes:
    entries: int  # the throughput workloads' namespace
    big: int  # the peak-memory workloads' namespace


def portability_sizes(bench: Bench) -> PortabilitySizes:
    if bench.sizes == SMOKE:
        return PortabilitySizes(5_000, 20_000)
    if bench.quick:
        return PortabilitySizes(100_000, 200_000)
    return PortabilitySizes(100_000, 1_000_000)


def portability_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    replaces = 1 + int(pg) + int(pg and rs)  # REPLACE_BACKENDS
    return STEPS_PER_BACKEND * (2 + int(pg) + int(rs) + int(pg and rs)) + replaces


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _key(i: int) -> str:
    return f"e{i:07d}"


async def _load(store: Any, n: int) -> None:
    """``n`` entries ``e0000000``... of :data:`VALUE` (set_many per :data:`PAGE`)."""
    for start in range(0, n, PAGE):
        await store.set_many({_key(i): VALUE for i in range(start, min(n, start + PAGE))})


async def _load_existing(store: Any, n: int) -> None:
    """The namespace a replace lands on: ``n`` entries, half of them keys of the file
    (:func:`_key` ``n/2``..``n-1``), half keys of their own between the file's
    (``_key(i) + "x"`` for even ``i``), set_many per :data:`PAGE`."""
    keys = [_key(i) for i in range(n // 2, n)] + [_key(i) + "x" for i in range(0, n, 2)]
    for start in range(0, len(keys), PAGE):
        await store.set_many(dict.fromkeys(keys[start : start + PAGE], 0))


# --------------------------------------------------------------------------- the subjects


async def export_by_hand(store: Any, path: Path) -> int:
    """Pages of ``keys()`` + ``get_many()`` as ``{"key", "value"}`` JSON lines, with a SHA-256
    of the lines: the work an export does, with the public API. Returns the entries written."""
    digest = hashlib.sha256()
    count = 0
    with path.open("wb") as out:
        after: str | None = None
        while True:
            keys = await store.keys("", limit=PAGE, after=after)
            if not keys:
                break
            values = await store.get_many(keys)
            chunk = bytearray()
            for key in keys:
                if key in values:
                    line = orjson.dumps({"key": key, "value": values[key]}) + b"\n"
                    chunk += line
                    count += 1
            digest.update(chunk)
            out.write(chunk)
            if len(keys) < PAGE:
                break
            after = keys[-1]
    digest.hexdigest()
    return count


async def import_by_hand(store: Any, path: Path) -> int:
    """The entries of an export file written with ``set_many`` per :data:`PAGE` (header and
    trailer skipped). Returns the entries written."""
    count = 0
    batch: dict[str, Any] = {}
    with path.open("rb") as src:
        for line in src:
            item = orjson.loads(line)
            if "key" not in item:
                continue  # the header, the trailer
            batch[item["key"]] = item["value"]
            if len(batch) >= PAGE:
                await store.set_many(batch)
                count += len(batch)
                batch = {}
    if batch:
        await store.set_many(batch)
        count += len(batch)
    return count


# --------------------------------------------------------------------------- the child process


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), ``None`` without it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Set the peak RSS (``VmHWM``) to the current RSS (Linux ≥ 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)


async def _measure(cmd: dict[str, Any]) -> dict[str, Any]:
    """In the child: open the store, warm up, then export or import while the peak RSS is
    watched."""
    store = await open_store(cmd["config"])
    try:
        folder = Path(cmd["folder"])
        if cmd.get("load"):  # the in-memory store: its entries live in this process
            await _load(store, int(cmd["load"]))
        # Warm-up: every module and code path the measured call uses, on a few entries.
        warm = folder / f"warm-{os.getpid()}.jsonl"
        await store.export_to(warm, prefix=_key(0)[:-1])
        if cmd["op"] == "import":
            await store.with_namespace(cmd["warm_namespace"]).import_from(warm)
        warm.unlink()
        gc.collect()
        before = _status_kb("VmRSS") or _peak_kb()
        reset = _reset_peak()
        started = time.perf_counter()
        if cmd["op"] == "export":
            report = await store.export_to(cmd["file"])
            count = report.count
        else:
            imported = await store.import_from(cmd["file"])
            count = imported.written
        seconds = time.perf_counter() - started
        peak = _peak_kb()
        return {
            "before_mb": before / 1024,
            "peak_mb": peak / 1024,
            "growth_mb": (peak - before) / 1024,
            "seconds": seconds,
            "count": count,
            "peak_reset": reset,
        }
    finally:
        await store.close()


def rss_main() -> None:
    """The child's entry point: one JSON command on stdin, one JSON reply on stdout."""
    cmd = json.loads(sys.stdin.read())
    try:
        reply = {"ok": True, **asyncio.run(_measure(cmd))}
    except Exception as exc:  # reported to the parent
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(reply), flush=True)


async def _child_measure(cmd: dict[str, Any], log: Path) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), *filter(None, [env.get("PYTHONPATH")])])
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from suite.portability import rss_main; rss_main()",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            cwd=log.parent,
            env=env,
        )
        out, _ = await proc.communicate(json.dumps(cmd).encode())
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"the child process died (exit {proc.returncode}); see {log}")
    reply: dict[str, Any] = json.loads(lines[-1])
    if not reply.pop("ok"):
        raise RuntimeError(reply["error"])
    return reply


# --------------------------------------------------------------------------- the parent


@dataclass
class _Env:
    folder: Path
    dsn: str | None
    url: str | None

    def config(self, backend: str, namespace: str) -> dict[str, Any]:
        return {
            "backend": backend,
            "namespace": namespace,
            "schema": SCHEMA,
            "path": str(self.folder / "portability.db"),
            "dsn": self.dsn,
            "url": self.url,
        }


async def _drop_schema(dsn: str | None) -> None:
    if dsn is None:
        return
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    finally:
        await conn.close()


async def bench_portability(bench: Bench, dsn: str | None, url: str | None) -> None:
    """The workloads on memory and SQLite, and on PostgreSQL, Redis and the hybrid when their
    servers are given."""
    notes = bench.report.notes
    sizes = portability_sizes(bench)
    load_before = load_average()
    notes.append(
        f"portability: {sizes.entries:,} entries of a ~200-byte JSON value, one partition, no "
        f"TTL; by hand: pages of {PAGE:,} keys()+get_many() as JSON lines / set_many per "
        f"{PAGE:,}; peak RSS: {sizes.big:,} entries, a child process per measure"
    )
    await _drop_schema(dsn)  # a run interrupted before it could drop it
    took: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fleetmem-bench-portability-") as tmp:
        env = _Env(Path(tmp), dsn, url)
        try:
            for backend in BACKENDS:
                if backend in ("postgres", "hybrid") and dsn is None:
                    continue
                if backend in ("redis", "hybrid") and url is None:
                    continue
                started = time.monotonic()
                try:
                    await _bench_backend(bench, backend, env)
                except (OSError, RuntimeError, FleetmemError) as exc:
                    notes.append(f"portability: {backend} stopped: {type(exc).__name__}: {exc}")
                took.append(f"{backend} {time.monotonic() - started:.0f} s")
                for leftover in env.folder.glob("*.jsonl"):
                    leftover.unlink()
        finally:
            await _drop_schema(dsn)
    notes.append("portability: time per backend: " + ", ".join(took))
    if load_before:
        notes.append(
            f"portability: 1-minute load average {load_before} before the section, "
            f"{load_average()} after"
        )
    _verdicts(bench)


async def _bench_backend(bench: Bench, backend: str, env: _Env) -> None:
    sizes = portability_sizes(bench)
    n = _label(sizes.entries)
    store = await open_store(env.config(backend, f"{NS_SOURCE}-{backend}"))
    try:
        target = store.with_namespace(f"{NS_TARGET}-{backend}")
        await store.clear()
        await target.clear()
        bench.progress.step(f"portability {backend}: loading {sizes.entries:,} entries")
        await _load(store, sizes.entries)
        mine, hand = env.folder / "fleetmem.jsonl", env.folder / "by-hand.jsonl"
        plain = env.folder / "file-object.jsonl"

        async def fleetmem_export() -> float:
            t0 = time.perf_counter()
            report = await store.export_to(mine)
            return _rate(report.count, t0, sizes.entries, "fleetmem export")

        async def by_hand_export() -> float:
            t0 = time.perf_counter()
            return _rate(await export_by_hand(store, hand), t0, sizes.entries, "by-hand export")

        async def file_object_export() -> float:
            t0 = time.perf_counter()
            with plain.open("wb") as out:
                report = await store.export_to(out)
            return _rate(report.count, t0, sizes.entries, "fleetmem export to a file object")

        bench.progress.step(f"portability {backend} export {n}")
        bench.record(
            f"{backend} export {n}",
            "entries/s",
            await _alternate(
                bench.reps,
                {
                    "fleetmem": fleetmem_export,
                    "by hand": by_hand_export,
                    FILE_OBJECT: file_object_export,
                },
            ),
        )

        async def fleetmem_import() -> float:
            await target.clear()
            t0 = time.perf_counter()
            report = await target.import_from(mine)
            return _rate(report.written, t0, sizes.entries, "fleetmem import")

        async def by_hand_import() -> float:
            await target.clear()
            t0 = time.perf_counter()
            return _rate(await import_by_hand(target, mine), t0, sizes.entries, "by-hand import")

        bench.progress.step(f"portability {backend} import {n}")
        bench.record(
            f"{backend} import {n}",
            "entries/s",
            await _alternate(bench.reps, {"fleetmem": fleetmem_import, "by hand": by_hand_import}),
        )
        if backend in REPLACE_BACKENDS:
            await _bench_replace(bench, backend, target, mine, sizes.entries)
        await target.clear()
        await store.clear()
    finally:
        await store.close()
    bench.progress.step(f"portability {backend} peak RSS, {sizes.big:,} entries")
    await _peak_memory(bench, backend, env)


async def _bench_replace(bench: Bench, backend: str, target: Any, path: Path, n: int) -> None:
    """``<backend> replace <n> over <n>``: see the module's docstring."""

    async def fleetmem_replace() -> float:
        await target.clear()
        await _load_existing(target, n)
        gc.collect()
        t0 = time.perf_counter()
        report = await target.import_from(path, mode="replace")
        rate = _rate(report.written, t0, n, "fleetmem replace")
        left = len(await target.keys())
        if left != n:
            raise RuntimeError(f"the replace left {left:,} keys, not {n:,}")
        return rate

    async def set_many_over() -> float:
        await target.clear()
        await _load_existing(target, n)
        gc.collect()
        t0 = time.perf_counter()
        return _rate(await import_by_hand(target, path), t0, n, "set_many over a namespace")

    label = _label(n)
    bench.progress.step(f"portability {backend} replace {label} over {label}")
    bench.record(
        f"{backend} replace {label} over {label}",
        "entries/s",
        await _alternate(bench.reps, {"fleetmem": fleetmem_replace, "set_many": set_many_over}),
    )


async def _alternate(
    reps: int, subjects: dict[str, Callable[[], Awaitable[float]]]
) -> dict[str, list[float]]:
    """Each subject once per repetition, the first one alternating; a timed call runs after
    ``gc.collect()`` (untimed preparations, such as clearing the target, come before)."""
    names = list(subjects)
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            gc.collect()
            out[name].append(await subjects[name]())
    return out


def _rate(count: int, t0: float, expected: int, what: str) -> float:
    took = time.perf_counter() - t0
    if count != expected:
        raise RuntimeError(f"{what} handled {count:,} entries, not {expected:,}")
    return count / took


async def _peak_memory(bench: Bench, backend: str, env: _Env) -> None:
    sizes = portability_sizes(bench)
    n = _label(sizes.big)
    notes = bench.report.notes
    big = env.folder / "big.jsonl"
    source = env.config(backend, f"{NS_BIG}-{backend}")
    target = env.config(backend, f"{NS_BIG_TARGET}-{backend}")
    log = env.folder / f"{backend}-rss.log"
    loader: Any = None
    if backend != "memory":
        loader = await open_store(source)
    try:
        if loader is not None:
            await loader.clear()
            await loader.with_namespace(target["namespace"]).clear()
            await _load(loader, sizes.big)
        cmd: dict[str, Any] = {
            "config": source,
            "folder": str(env.folder),
            "op": "export",
            "file": str(big),
            "load": sizes.big if backend == "memory" else 0,
        }
        exported = await _child_measure(cmd, log)
        bench.record(
            f"{backend} export {n} peak RSS growth", "MB", {"fleetmem": [exported["growth_mb"]]}
        )
        results = [("export", exported)]
        if loader is not None:
            imported = await _child_measure(
                {
                    "config": target,
                    "folder": str(env.folder),
                    "op": "import",
                    "file": str(big),
                    "warm_namespace": f"{NS_BIG_TARGET}-{backend}-warm",
                },
                log,
            )
            bench.record(
                f"{backend} import {n} peak RSS growth", "MB", {"fleetmem": [imported["growth_mb"]]}
            )
            results.append(("import", imported))
        for op, got in results:
            notes.append(
                f"portability: {backend} {op} of {got['count']:,} entries in a child process: "
                f"RSS {got['before_mb']:.0f} MB before, peak {got['peak_mb']:.0f} MB "
                f"(+{got['growth_mb']:.0f} MB), {got['seconds']:.1f} s"
                + ("" if got["peak_reset"] else " (peak not resettable: ru_maxrss)")
            )
    finally:
        big.unlink(missing_ok=True)
        if loader is not None:
            with contextlib.suppress(FleetmemError):
                await loader.clear()
                for ns in (target["namespace"], f"{NS_BIG_TARGET}-{backend}-warm"):
                    await loader.with_namespace(ns).clear()
            await loader.close()


# --------------------------------------------------------------------------- verdicts


def _verdicts(bench: Bench) -> None:
    """A note per portability target measured: its figure and whether it was met."""
    report = bench.report

    def median(workload: str, subject: str) -> float | None:
        row = report.get(workload, subject)
        return statistics.median(row.values) if row is not None and row.values else None

    for row in list(report.rows):
        backend, _, rest = row.workload.partition(" ")
        if backend not in BACKENDS or row.subject != "fleetmem":
            continue
        if rest.startswith(("export ", "import ")) and row.unit == "entries/s":
            mine, theirs = median(row.workload, "fleetmem"), median(row.workload, "by hand")
            if mine is None or not theirs:
                continue
            value = mine / theirs
            met = "met" if value >= RATIO_BOUND else "NOT met"
            report.notes.append(
                f"portability target {row.workload} ≥ {RATIO_BOUND}x by hand: {value:.2f}x ({met})"
            )
        elif rest.endswith("peak RSS growth"):
            growth = median(row.workload, "fleetmem")
            if growth is None:
                continue
            met = "met" if growth <= RSS_BOUND_MB else "NOT met"
            report.notes.append(
                f"portability target {row.workload} ≤ {RSS_BOUND_MB:.0f} MB: {growth:.0f} MB "
                f"({met})"
            )
