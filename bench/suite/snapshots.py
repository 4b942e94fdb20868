"""``--only snapshots``: what named, incremental snapshots (``store.snapshots``) cost and store,
on every backend.

One namespace per backend (memory, SQLite, PostgreSQL, Redis, hybrid) of 100,000 entries (the
~200-byte :data:`~suite.workloads.VALUE`, one partition, no TTL), and per repetition one
*cycle*, measured step by step:

1. ``snapshots.create("first")``, timed: the first snapshot stores every entry;
2. 1% of the entries (1,000, every 100th key) rewritten with a value of the same size
   (``set_many``, untimed), then ``snapshots.create("second")``, timed: it stores only what
   changed;
3. ``snapshots.restore("first")``, timed: the namespace made to hold the first snapshot's
   entries again (every entry written, the changed ones back to their old value);
4. ``snapshots.backend.usage()`` (what the namespace's snapshots store now), then
   ``delete("first")``, ``usage()`` again, ``delete("second")`` and ``usage()`` once more:
   deleting the first frees only the records the second does not share (the old versions of
   the changed entries), deleting the second frees everything left.

In the same repetition, for reference, the same namespace is exported to a file and imported
back into itself: ``export_to(path)`` then ``import_from(path, mode="replace")``, each timed.
The cycle and the export/import pair take turns going first, repetition by repetition; each
timed call runs after ``gc.collect()``.

Rows (medians over the repetitions; the min and max in the JSON):

* ``<backend> snapshot create 100k`` (ms): subject ``fleetmem`` the first create, subject
  ``export_to`` the export: both read the whole namespace at one instant and write it out.
* ``<backend> snapshot create after 1% changed`` (ms): the second create, alone (its ratio to
  the first is a note).
* ``<backend> snapshot restore 100k`` (ms): subject ``fleetmem`` the restore, subjects
  ``import replace`` and ``export+import`` (the export and the replace together, the way to
  go back to a saved state without snapshots).
* ``<backend> snapshot bytes after 1% changed`` (bytes): subject ``fleetmem`` the second
  snapshot's ``bytes``, subject ``first snapshot`` the first's. Target: ≤ 5% (the contract's
  "a new snapshot adds at most 5% of the first snapshot's bytes").
* ``<backend> snapshot bytes freed deleting the first`` (bytes): ``usage()`` before the delete
  minus after (subject ``fleetmem``) against the first snapshot's ``bytes`` (``first
  snapshot``). Target: exactly the first's unshared part, which the run knows: the changed
  entries' share of the first's bytes (every entry has the same size). After the second
  delete ``usage()`` must be ``(0, 0)``.

The targets are notes with their figure and verdict, never assertions. ``--smoke`` uses 5,000
entries (50 changed); ``--quick`` and the full run 100,000. A backend without snapshots in this
build (``ConfigurationError``) is skipped with a note, as is one whose server is not given.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmem.errors import FleetmemError

from .changes import open_store
from .portability import BACKENDS, PAGE, _key, _label
from .timing import load_average
from .workloads import SMOKE, VALUE, Bench

#: The PostgreSQL schema of the section (its own tables; dropped at the end).
SCHEMA = "bench_snapshots"
#: The namespace of each backend (the backend's name after it).
NAMESPACE = "bench-snap"
FIRST, SECOND = "bench-first", "bench-second"
#: One entry in :data:`CHANGED_EVERY` is rewritten between the two snapshots.
CHANGED_EVERY = 100
#: The rewritten value: :data:`VALUE` with another ``step``, the same encoded size.
CHANGED_VALUE = {**VALUE, "step": 18}  # VALUE's step is 17
#: The contract's bound on the second snapshot's bytes, as a share of the first's.
BYTES_BOUND = 0.05
STEPS_PER_BACKEND = 2


def snapshot_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    return STEPS_PER_BACKEND * (2 + int(pg) + int(rs) + int(pg and rs))


def snapshot_entries(bench: Bench) -> int:
    return 5_000 if bench.sizes == SMOKE else 100_000


@dataclass
class _Figures:
    """One backend's figures, a value per repetition."""

    create_first: list[float] = field(default_factory=list)  # ms
    create_second: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    delete_first: list[float] = field(default_factory=list)
    delete_second: list[float] = field(default_factory=list)
    export: list[float] = field(default_factory=list)
    import_replace: list[float] = field(default_factory=list)
    first_bytes: list[float] = field(default_factory=list)
    second_bytes: list[float] = field(default_factory=list)
    usage_both: list[tuple[int, int]] = field(default_factory=list)  # (records, bytes)
    usage_after_first: list[tuple[int, int]] = field(default_factory=list)
    usage_after_both: list[tuple[int, int]] = field(default_factory=list)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _check(what: str, got: int, expected: int) -> None:
    if got != expected:
        raise RuntimeError(f"{what}: {got:,}, not {expected:,}")


async def _load(store: Any, n: int) -> None:
    for start in range(0, n, PAGE):
        await store.set_many({_key(i): VALUE for i in range(start, min(n, start + PAGE))})


async def _drop_schema(dsn: str | None) -> None:
    if dsn is None:
        return
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    finally:
        await conn.close()


async def _drop_snapshots(store: Any) -> None:
    """Delete every snapshot of the store's namespace (``clear()`` leaves them)."""
    for snapshot in await store.snapshots.list():
        await store.snapshots.delete(snapshot.name)


# --------------------------------------------------------------------------- the two subjects


async def _cycle(store: Any, n: int, changed: dict[str, Any], figures: _Figures) -> None:
    """Create, change 1%, create, restore the first, delete both (see the module)."""
    snaps = store.snapshots
    gc.collect()
    t0 = time.perf_counter()
    first = await snaps.create(FIRST)
    figures.create_first.append(_ms(t0))
    _check("entries in the first snapshot", first.keys, n)
    await store.set_many(changed)
    gc.collect()
    t0 = time.perf_counter()
    second = await snaps.create(SECOND)
    figures.create_second.append(_ms(t0))
    _check("entries in the second snapshot", second.keys, n)
    gc.collect()
    t0 = time.perf_counter()
    restored = await snaps.restore(FIRST)
    figures.restore.append(_ms(t0))
    _check("entries restored", restored, n)
    back = await store.get(next(iter(changed)))
    if back != VALUE:
        raise RuntimeError(f"the restore left {back!r} where the first snapshot holds VALUE")
    figures.first_bytes.append(first.bytes)
    figures.second_bytes.append(second.bytes)
    figures.usage_both.append(await snaps.backend.usage())
    t0 = time.perf_counter()
    if not await snaps.delete(FIRST):
        raise RuntimeError("the first snapshot was gone before its delete")
    figures.delete_first.append(_ms(t0))
    figures.usage_after_first.append(await snaps.backend.usage())
    t0 = time.perf_counter()
    if not await snaps.delete(SECOND):
        raise RuntimeError("the second snapshot was gone before its delete")
    figures.delete_second.append(_ms(t0))
    figures.usage_after_both.append(await snaps.backend.usage())


async def _export_import(store: Any, path: Path, n: int, figures: _Figures) -> None:
    """The same namespace exported to ``path`` and imported back with ``mode="replace"``."""
    gc.collect()
    t0 = time.perf_counter()
    report = await store.export_to(path)
    figures.export.append(_ms(t0))
    _check("entries exported", report.count, n)
    gc.collect()
    t0 = time.perf_counter()
    imported = await store.import_from(path, mode="replace")
    figures.import_replace.append(_ms(t0))
    _check("entries imported", imported.written, n)
    path.unlink()


# --------------------------------------------------------------------------- the section


async def bench_snapshots(bench: Bench, dsn: str | None, url: str | None) -> None:
    """The cycle on memory and SQLite, and on PostgreSQL, Redis and the hybrid when their
    servers are given."""
    notes = bench.report.notes
    n = snapshot_entries(bench)
    load_before = load_average()
    notes.append(
        f"snapshots: {n:,} entries of a ~200-byte JSON value, one partition, no TTL; "
        f"{n // CHANGED_EVERY:,} of them (every {CHANGED_EVERY}th key) rewritten with a value "
        f"of the same size between the two snapshots; reference: export_to a file, then "
        f'import_from(mode="replace") of it into the same namespace'
    )
    await _drop_schema(dsn)  # a run interrupted before it could drop it
    took: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fleetmem-bench-snapshots-") as tmp:
        folder = Path(tmp)
        try:
            for backend in BACKENDS:
                if backend in ("postgres", "hybrid") and dsn is None:
                    continue
                if backend in ("redis", "hybrid") and url is None:
                    continue
                config = {
                    "backend": backend,
                    "namespace": f"{NAMESPACE}-{backend}",
                    "schema": SCHEMA,
                    "path": str(folder / "snapshots.db"),
                    "dsn": dsn,
                    "url": url,
                }
                started = time.monotonic()
                try:
                    await _bench_backend(bench, config, folder)
                except (OSError, RuntimeError, FleetmemError) as exc:
                    notes.append(f"snapshots: {backend} stopped: {type(exc).__name__}: {exc}")
                took.append(f"{backend} {time.monotonic() - started:.0f} s")
        finally:
            await _drop_schema(dsn)
    notes.append("snapshots: time per backend: " + ", ".join(took))
    if load_before:
        notes.append(
            f"snapshots: 1-minute load average {load_before} before the section, "
            f"{load_average()} after"
        )


async def _bench_backend(bench: Bench, config: dict[str, Any], folder: Path) -> None:
    backend = config["backend"]
    n = snapshot_entries(bench)
    label = _label(n)
    store = await open_store(config)
    try:
        await _drop_snapshots(store)  # a run interrupted before it could delete them
        await store.clear()
        bench.progress.step(f"snapshots {backend}: loading {n:,} entries")
        await _load(store, n)
        changed = {_key(i): CHANGED_VALUE for i in range(0, n, CHANGED_EVERY)}
        path = folder / "export.jsonl"
        figures = _Figures()
        subjects: list[Callable[[], Awaitable[None]]] = [
            lambda: _cycle(store, n, changed, figures),
            lambda: _export_import(store, path, n, figures),
        ]
        bench.progress.step(f"snapshots {backend}: {bench.reps} cycles on {label}")
        for rep in range(bench.reps):
            for run in subjects[rep % 2 :] + subjects[: rep % 2]:
                await run()
    finally:
        with contextlib.suppress(FleetmemError):
            await _drop_snapshots(store)
        with contextlib.suppress(FleetmemError):
            await store.clear()
        await store.close()
    _record(bench, backend, label, figures, len(changed), n)


def _record(bench: Bench, backend: str, label: str, f: _Figures, changed: int, n: int) -> None:
    both = [e + i for e, i in zip(f.export, f.import_replace, strict=True)]
    bench.record(
        f"{backend} snapshot create {label}",
        "ms",
        {"fleetmem": f.create_first, "export_to": f.export},
    )
    bench.record(f"{backend} snapshot create after 1% changed", "ms", {"fleetmem": f.create_second})
    bench.record(
        f"{backend} snapshot restore {label}",
        "ms",
        {"fleetmem": f.restore, "import replace": f.import_replace, "export+import": both},
    )
    bench.record(
        f"{backend} snapshot bytes after 1% changed",
        "bytes",
        {"fleetmem": f.second_bytes, "first snapshot": f.first_bytes},
    )
    freed = [float(b[1] - a[1]) for b, a in zip(f.usage_both, f.usage_after_first, strict=True)]
    bench.record(
        f"{backend} snapshot bytes freed deleting the first",
        "bytes",
        {"fleetmem": freed, "first snapshot": f.first_bytes},
    )
    _notes(bench, backend, f, freed, changed, n)


def _notes(
    bench: Bench, backend: str, f: _Figures, freed: list[float], changed: int, n: int
) -> None:
    notes = bench.report.notes
    med = statistics.median
    first_bytes, second_bytes = med(f.first_bytes), med(f.second_bytes)
    notes.append(
        f"snapshots: {backend}: create {med(f.create_first):,.0f} ms, after 1% changed "
        f"{med(f.create_second):,.0f} ms ({med(f.create_second) / med(f.create_first):.2f}x the "
        f"first); restore {med(f.restore):,.0f} ms; delete the first "
        f"{med(f.delete_first):,.0f} ms, the second {med(f.delete_second):,.0f} ms; export "
        f"{med(f.export):,.0f} ms, import replace {med(f.import_replace):,.0f} ms; create / "
        f"export {med(f.create_first) / med(f.export):.2f}x, restore / import replace "
        f"{med(f.restore) / med(f.import_replace):.2f}x, restore / (export + import) "
        f"{med(f.restore) / (med(f.export) + med(f.import_replace)):.2f}x (medians)"
    )
    usage = f.usage_both[-1], f.usage_after_first[-1], f.usage_after_both[-1]
    notes.append(
        f"snapshots: {backend}: first snapshot {first_bytes:,.0f} bytes, second "
        f"{second_bytes:,.0f}; usage() (records, bytes) with both {usage[0]}, after deleting "
        f"the first {usage[1]}, after deleting both {usage[2]} (last repetition)"
    )
    share = second_bytes / first_bytes if first_bytes else float("nan")
    met = "met" if share <= BYTES_BOUND else "NOT met"
    notes.append(
        f"snapshots target {backend} second snapshot ≤ {BYTES_BOUND:.0%} of the first's bytes: "
        f"{share:.2%} ({met})"
    )
    # Every entry has the same size: the first's unshared part is the changed entries' share.
    unshared = [round(b * changed / n) for b in f.first_bytes]
    exact = all(got == want for got, want in zip(freed, unshared, strict=True))
    what = f"snapshots target {backend} deleting the first frees only its unshared part"
    notes.append(
        f"{what}: freed {med(freed):,.0f} of its {first_bytes:,.0f} bytes, exactly the "
        f"unshared part (met in every repetition)"
        if exact
        else f"{what}: freed {[int(x) for x in freed]} bytes, unshared {unshared} (NOT met)"
    )
    empty = all(u == (0, 0) for u in f.usage_after_both)
    notes.append(
        f"snapshots target {backend} nothing stored after deleting both: "
        f"{'met' if empty else 'NOT met: ' + str(f.usage_after_both)}"
    )
