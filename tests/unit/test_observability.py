"""``fleetmem.observability`` on the embedded backends: Prometheus counters and histograms,
OpenTelemetry spans and the duration histogram, views, uninstrumenting, and the promise that
nothing is imported or changed when nothing is asked for."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry, generate_latest

from fleetmem import InMemoryStore, open_store
from fleetmem.backends.memory import InMemoryStore as PlainMemory
from fleetmem.errors import (
    ConfigurationError,
    MissingDependencyError,
    NotANumberError,
    VersionConflictError,
)
from fleetmem.leases import Leases
from fleetmem.observability import instrument, instrumentation_of, operation_names, outcome_of

# Distinctive strings: neither may ever appear in a label, a span name or an attribute.
SECRET_KEY = "k-zebra-7731"
SECRET_VALUE = "v-okapi-5521"


@pytest_asyncio.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'obs.db'}"
    s = await open_store(url, namespace="obs")
    try:
        yield s
    finally:
        inst = instrumentation_of(s)
        if inst is not None:
            inst.uninstrument()
        await s.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def ops(registry: CollectorRegistry, backend: str, op: str, outcome: str = "ok") -> float:
    value = registry.get_sample_value(
        "fleetmem_operations_total", {"backend": backend, "operation": op, "outcome": outcome}
    )
    return value or 0.0


def durations(registry: CollectorRegistry, backend: str, op: str) -> float:
    value = registry.get_sample_value(
        "fleetmem_operation_duration_seconds_count", {"backend": backend, "operation": op}
    )
    return value or 0.0


async def _exercise(s: Any) -> None:
    """Operations of every kind, with the secret key and value, some of them failing."""
    await s.set(SECRET_KEY, {"v": SECRET_VALUE})
    await s.get(SECRET_KEY)
    await s.get("missing-" + SECRET_KEY)
    await s.keys(SECRET_KEY[:3])
    await s.search(SECRET_KEY[:4] + "*")
    with pytest.raises(VersionConflictError):
        await s.compare_and_set(SECRET_KEY, SECRET_VALUE, version=999)
    with pytest.raises(NotANumberError):
        await s.incr(SECRET_KEY)
    lease = await s.leases.acquire(SECRET_KEY, owner=SECRET_VALUE, ttl=10)
    await s.leases.release(lease)
    await s.queue("q-" + SECRET_KEY[:1]).put({"v": SECRET_VALUE})
    await s.agents.register(SECRET_KEY, info={"v": SECRET_VALUE}, ttl=30)
    await s.delete(SECRET_KEY)


async def test_operations_are_counted_and_timed(store: Any, registry: CollectorRegistry) -> None:
    backend = store.backend
    inst = instrument(store, registry=registry)
    assert inst.registry is registry
    await store.set("a", 1)
    await store.get("a")
    await store.get("nothing-here")  # a missing key is "ok"
    await store.set_many({"b": 2, "c": 3})
    assert ops(registry, backend, "get") == 2
    assert ops(registry, backend, "set") == 1
    assert ops(registry, backend, "set_many") == 1
    assert durations(registry, backend, "get") == 2
    total = registry.get_sample_value(
        "fleetmem_operation_duration_seconds_sum", {"backend": backend, "operation": "get"}
    )
    assert total is not None and total > 0
    inf = registry.get_sample_value(
        "fleetmem_operation_duration_seconds_bucket",
        {"backend": backend, "operation": "get", "le": "+Inf"},
    )
    assert inf == 2
    # Operations never called are not in the output.
    assert "cleanup_expired" not in generate_latest(registry).decode()


async def test_errors_are_counted_by_outcome(store: Any, registry: CollectorRegistry) -> None:
    backend = store.backend
    instrument(store, registry=registry)
    await store.set("n", "text")
    with pytest.raises(VersionConflictError):
        await store.compare_and_set("n", 1, version=7)
    with pytest.raises(NotANumberError):
        await store.incr("n")
    assert ops(registry, backend, "compare_and_set", "version-conflict") == 1
    assert ops(registry, backend, "compare_and_set") == 0
    assert ops(registry, backend, "incr", "not-a-number") == 1
    assert durations(registry, backend, "incr") == 1  # every outcome is timed


def test_outcome_names() -> None:
    import asyncio

    from fleetmem.errors import BackendUnavailableError, KeyNotFoundError

    assert outcome_of(KeyNotFoundError("x")) == "key-not-found"
    assert outcome_of(NotANumberError("x")) == "not-a-number"
    assert outcome_of(BackendUnavailableError("x")) == "backend-unavailable"
    assert outcome_of(asyncio.CancelledError()) == "cancelled"
    assert outcome_of(TimeoutError()) == "timeout"
    assert outcome_of(RuntimeError("k-zebra")) == "other"
    assert "queue.claim" in operation_names()
    assert "lease.acquire" in operation_names()


async def test_no_key_or_value_in_any_label(store: Any, registry: CollectorRegistry) -> None:
    instrument(store, registry=registry, namespace_label=True)
    await _exercise(store)
    await instrumentation_of(store).collect()  # type: ignore[union-attr]
    text = generate_latest(registry).decode()
    assert "lease.acquire" in text and "agent.register" in text and "queue.put" in text
    assert SECRET_KEY not in text
    assert SECRET_VALUE not in text
    assert "k-zebra" not in text


async def test_views_before_and_after_are_covered(store: Any, registry: CollectorRegistry) -> None:
    before = store.with_namespace("before")
    before_leases = before.leases
    instrument(store, registry=registry, namespace_label=True)
    after = store.with_namespace("after")
    await before.set("x", 1)
    await after.get("x")
    await store.get("x")
    await before_leases.holder("some-lease")
    backend = store.backend

    def by_ns(op: str, ns: str) -> float:
        value = registry.get_sample_value(
            "fleetmem_operations_total",
            {"backend": backend, "operation": op, "outcome": "ok", "namespace": ns},
        )
        return value or 0.0

    assert by_ns("set", "before") == 1
    assert by_ns("get", "after") == 1
    assert by_ns("get", "obs") == 1
    assert by_ns("lease.holder", "before") == 1
    assert instrumentation_of(store).namespaces == ["after", "before", "obs"]  # type: ignore[union-attr]


async def test_instrumenting_twice_and_two_stores_share_the_metrics(
    registry: CollectorRegistry,
) -> None:
    a = InMemoryStore(namespace="a")
    b = InMemoryStore(namespace="b")
    inst = instrument(a, registry=registry)
    assert instrument(a, registry=registry) is inst
    instrument(b, registry=registry)  # no "Duplicated timeseries"
    await a.get("x")
    await b.get("x")
    assert ops(registry, "memory", "get") == 2
    with pytest.raises(ConfigurationError):
        instrument(a, registry=CollectorRegistry())  # instrumented differently
    with pytest.raises(ConfigurationError):
        instrument(InMemoryStore(namespace="c"), registry=registry, namespace_label=True)


async def test_uninstrument_restores_the_store(store: Any, registry: CollectorRegistry) -> None:
    plain_class = type(store)
    view = store.with_namespace("v")
    inst = instrument(store, registry=registry)
    leases = store.leases
    assert type(store) is not plain_class and isinstance(store, plain_class)
    assert type(leases) is not Leases
    assert repr(store).startswith(f"<{plain_class.__name__} ")
    handle = store.queue("jobs")
    await store.get("k")
    inst.uninstrument()
    inst.uninstrument()  # idempotent
    assert type(store) is plain_class
    assert type(view) is plain_class
    assert type(leases) is Leases
    assert instrumentation_of(store) is None
    await store.get("k")
    await handle.put({"job": 1})  # handed out while instrumented: no longer counted
    backend = store.backend
    assert ops(registry, backend, "get") == 1  # kept after uninstrument, not moved since
    assert ops(registry, backend, "queue.put") == 0
    # A new instrumentation on the same registry continues the totals.
    instrument(store, registry=registry)
    await store.get("k")
    assert ops(registry, backend, "get") == 2


async def test_collect_reads_queues_and_agents(store: Any, registry: CollectorRegistry) -> None:
    inst = instrument(store, registry=registry)
    other = store.with_namespace("other")
    await store.queue("jobs").put_many([{"n": 1}, {"n": 2}])
    await other.queue("jobs").put({"n": 3})
    await store.agents.register("a1", info={}, ttl=60)
    await other.agents.register("a2", info={}, ttl=60)
    await other.agents.register("a3", info={}, ttl=60)
    before = registry.get_sample_value("fleetmem_queue_jobs", {"queue": "jobs", "state": "ready"})
    assert before is None  # collected on demand only
    await inst.collect()
    ready = registry.get_sample_value("fleetmem_queue_jobs", {"queue": "jobs", "state": "ready"})
    assert ready == 3  # summed over the namespaces without a namespace label
    assert registry.get_sample_value("fleetmem_agents_live") == 3
    assert ops(registry, store.backend, "queue.stats") == 0  # collect() is not counted


async def test_collect_with_namespace_label(registry: CollectorRegistry) -> None:
    s = InMemoryStore(namespace="main")
    inst = instrument(s, registry=registry, namespace_label=True)
    await s.with_namespace("side").agents.register("a", info={}, ttl=60)
    await inst.collect()
    assert registry.get_sample_value("fleetmem_agents_live", {"namespace": "side"}) == 1
    assert registry.get_sample_value("fleetmem_agents_live", {"namespace": "main"}) == 0


async def test_watch_lag_is_measured(store: Any, registry: CollectorRegistry) -> None:
    instrument(store, registry=registry)
    await store.changes.enable()
    watch = store.changes.watch()
    first = watch.__anext__()
    import asyncio

    task = asyncio.ensure_future(first)
    await asyncio.sleep(0.05)
    await store.set("w", 1)
    change = await asyncio.wait_for(task, 10)
    assert change.key == "w"
    await watch.aclose()
    lag = registry.get_sample_value("fleetmem_changes_lag_seconds")
    assert lag is not None and 0 <= lag < 10


async def test_spans_follow_the_conventions(
    store: Any, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    inst = instrument(store, prometheus=False, tracer_provider=provider)
    assert inst.tracing and inst.registry is None
    await _exercise(store)
    finished: list[ReadableSpan] = list(exporter.get_finished_spans())
    names = [s.name for s in finished]
    assert "set obs" in names and "get obs" in names and "lease.acquire obs" in names
    system = "fleetmem" if store.backend == "memory" else "sqlite"
    for span in finished:
        assert span.kind is SpanKind.CLIENT
        attrs = dict(span.attributes or {})
        assert attrs["db.system.name"] == system
        assert attrs["db.namespace"] == "obs"
        assert attrs["db.operation.name"] == span.name.split(" ")[0]
        assert "server.address" not in attrs  # embedded: no server
        blob = repr(attrs) + span.name + repr([e.attributes for e in span.events])
        assert SECRET_KEY not in blob and SECRET_VALUE not in blob
    failed = [s for s in finished if s.name == "compare_and_set obs"]
    assert len(failed) == 1
    assert failed[0].status.status_code is StatusCode.ERROR
    assert failed[0].status.description == "version-conflict"
    assert (failed[0].attributes or {})["error.type"] == "fleetmem.errors.VersionConflictError"
    ok = next(s for s in finished if s.name == "get obs")
    assert "error.type" not in (ok.attributes or {})


async def test_spans_join_the_callers_trace(
    store: Any, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    instrument(store, prometheus=False, tracer_provider=provider)
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as parent:
        await store.set("p", 1)
    child = next(s for s in exporter.get_finished_spans() if s.name == "set obs")
    assert child.parent is not None
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.context is not None
    assert child.context.trace_id == parent.get_span_context().trace_id


async def test_duration_histogram_of_the_meter_provider(store: Any) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        instrument(store, prometheus=False, meter_provider=provider)
        await store.get("h")
        await store.get("h")
        data = reader.get_metrics_data()
        assert data is not None
        points: list[HistogramDataPoint] = []
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "db.client.operation.duration":
                        assert metric.unit == "s"
                        points.extend(metric.data.data_points)  # type: ignore[arg-type]
        get = [p for p in points if (p.attributes or {}).get("db.operation.name") == "get"]
        assert len(get) == 1 and get[0].count == 2
        assert list(get[0].explicit_bounds) == [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10]
    finally:
        provider.shutdown()


async def test_nothing_configured_changes_nothing(store: Any) -> None:
    plain_class = type(store)
    inst = instrument(store, prometheus=False)  # and no global OpenTelemetry provider
    assert not inst.active and not inst.tracing
    assert type(store) is plain_class
    assert instrumentation_of(store) is None
    await inst.collect()
    inst.uninstrument()


def test_a_missing_prometheus_client_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MissingDependencyError) as caught:
        instrument(PlainMemory(namespace="x"))
    assert caught.value.package == "prometheus-client"
    assert caught.value.extra == "metrics"


async def test_open_store_with_metrics_uses_the_default_registry() -> None:
    from prometheus_client import REGISTRY

    s = await open_store("memory://", namespace="default-registry", metrics=True)
    try:
        inst = instrumentation_of(s)
        assert inst is not None and inst.registry is REGISTRY
        before = ops(REGISTRY, "memory", "exists")
        await s.exists("x")
        assert ops(REGISTRY, "memory", "exists") == before + 1
    finally:
        inst = instrumentation_of(s)
        if inst is not None:
            inst.uninstrument()
        await s.close()


def test_import_fleetmem_imports_neither_prometheus_nor_opentelemetry() -> None:
    code = (
        "import asyncio, sys\n"
        "import fleetmem\n"
        "async def main():\n"
        "    async with fleetmem.open_store('memory://', namespace='n') as s:\n"
        "        await s.set('k', 1)\n"
        "        assert await s.get('k') == 1\n"
        "        await s.with_namespace('m').queue('q').put(1)\n"
        "asyncio.run(main())\n"
        "assert 'prometheus_client' not in sys.modules, 'prometheus_client'\n"
        "assert 'opentelemetry' not in sys.modules, 'opentelemetry'\n"
        "assert 'fleetmem.observability' not in sys.modules, 'fleetmem.observability'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
