"""``--only metrics``: what instrumentation costs a single ``get``, on every backend.

One workload per backend (memory, SQLite, PostgreSQL, Redis, hybrid): ``<backend> get
instrumented``, one awaited ``store.get(key)`` of a present key at a time, three subjects
interleaved call by call (``interleaved_latency``), each its own store opened with
``open_store`` on the same namespace and key:

* ``uninstrumented``: ``open_store(url)``;
* ``prometheus``: ``open_store(url, metrics=True)`` (Prometheus's default registry; no
  OpenTelemetry provider is configured in the run, so no spans);
* ``nothing-configured``: ``instrument(store, prometheus=False)`` with no OpenTelemetry
  provider: what a user gets who instruments without any sink.

Targets (the service contract): ``prometheus`` ≤ 1.05x and ``nothing-configured`` ≤ 1.02x the
uninstrumented p50. The section adds a note per backend with both ratios and the absolute
extra nanoseconds: on memory and SQLite a ``get`` takes microseconds, so a fixed cost of a
microsecond is a large ratio there; the targets are meant for the network backends.
"""

from __future__ import annotations

import contextlib
import gc
import tempfile
from pathlib import Path
from typing import Any

from .timing import interleaved_latency, sequential_latency
from .workloads import VALUE, Bench

NAMESPACE = "bench-metrics"
KEY = "bench-metrics-key"
SUBJECTS = ("uninstrumented", "prometheus", "nothing-configured")
#: The embedded backends' calls take microseconds: more calls per repetition steady the p50.
_EMBEDDED_FACTOR = 10


def metrics_steps(pg: bool, rs: bool) -> int:
    """Progress steps of the section with these servers."""
    return 2 + int(pg) + int(rs) + int(pg and rs)


async def _open(target: str, pg: str | None, rs: str | None, folder: str, **kw: Any) -> Any:
    from fleetmem import open_store

    if target == "memory":
        return await open_store("memory://", namespace=NAMESPACE, **kw)
    if target == "sqlite":
        path = Path(folder) / "metrics.db"
        return await open_store(f"sqlite:///{path}", namespace=NAMESPACE, **kw)
    if target == "postgres":
        return await open_store(pg, namespace=NAMESPACE, **kw)
    if target == "redis":
        return await open_store(rs, namespace=NAMESPACE, **kw)
    assert pg is not None and rs is not None
    return await open_store(hybrid=(pg, rs), namespace=NAMESPACE, **kw)


async def bench_metrics(bench: Bench, pg: str | None, rs: str | None) -> None:
    """Run the workload on every backend this run has servers for."""
    try:
        import prometheus_client  # noqa: F401

        from fleetmem.observability import instrument
    except ImportError as exc:
        bench.report.notes.append(f"metrics skipped: {exc} (pip install 'fleetmem[metrics]')")
        return
    targets = ["memory", "sqlite"]
    targets += ["postgres"] if pg else []
    targets += ["redis"] if rs else []
    targets += ["hybrid"] if pg and rs else []
    with tempfile.TemporaryDirectory(prefix="fleetmem-bench-") as folder:
        for target in targets:
            workload = f"{target} get instrumented"
            bench.progress.step(workload)
            stores: dict[str, Any] = {}
            try:
                stores["uninstrumented"] = await _open(target, pg, rs, folder)
                stores["prometheus"] = await _open(target, pg, rs, folder, metrics=True)
                quiet = await _open(target, pg, rs, folder)
                instrument(quiet, prometheus=False)
                stores["nothing-configured"] = quiet
                for store in stores.values():  # memory:// stores are separate memories
                    await store.set(KEY, VALUE)
                await _measure(bench, workload, stores, target)
            finally:
                for store in stores.values():
                    with contextlib.suppress(Exception):
                        await store.delete(KEY)
                    await store.close()


async def _measure(bench: Bench, workload: str, stores: dict[str, Any], target: str) -> None:
    n = bench.n_single * (_EMBEDDED_FACTOR if target in ("memory", "sqlite") else 1)

    def getter(store: Any) -> Any:
        get = store.get

        def op(i: int) -> Any:
            return get(KEY)

        return op

    subjects = {name: getter(stores[name]) for name in SUBJECTS}
    for op in subjects.values():  # warm up: connections, prepared statements, the cache
        await sequential_latency(op, min(n, bench.sizes.warm_single))
    lat: dict[str, list[float]] = {s: [] for s in subjects}
    rate: dict[str, list[float]] = {s: [] for s in subjects}
    for rep in range(bench.reps):
        gc.collect()
        for name, (p50, ops) in (await interleaved_latency(subjects, n, seed=rep)).items():
            lat[name].append(p50)
            rate[name].append(ops)
    bench.record(workload + " p50", "us", lat)
    bench.record(workload, "ops/s", rate)
    base = bench.report.get(workload + " p50", "uninstrumented")
    assert base is not None
    parts = []
    for name, bound in (("prometheus", 1.05), ("nothing-configured", 1.02)):
        row = bench.report.get(workload + " p50", name)
        assert row is not None
        ratio = row.median / base.median
        extra_ns = (row.median - base.median) * 1000.0
        verdict = "met" if ratio <= bound else "not met"
        parts.append(f"{name} {ratio:.3f}x ({extra_ns:+.0f} ns; ≤ {bound}x {verdict})")
    bench.report.notes.append(
        f"metrics, {target} get (uninstrumented p50 {base.median:.1f} µs): " + ", ".join(parts)
    )
