"""Prometheus metrics and OpenTelemetry traces for a store (the ``metrics`` extra).

::

    store = await open_store(url, metrics=True)  # or: inst = instrument(store)
    inst = instrumentation_of(store)
    await inst.collect()  # before a scrape: refreshes the gauges that need I/O

:func:`instrument` covers every public operation of a store, of its ``with_namespace`` views
(made before or after it) and of their leases, agents, queues, change feeds and snapshots;
``docs/observability.md`` lists every metric, label and span attribute.

Decisions where the service contract was silent:

* **How it hooks in.** An instrumented store's class is swapped for a subclass made once per
  :class:`Instrumentation`, whose public methods time the base class's methods (and its
  ``leases``/``agents``/``changes``/``snapshots``/``queue()`` hand out front ends swapped the
  same way). An uninstrumented store runs exactly the code it ran before: no check, no call.
  :meth:`Instrumentation.uninstrument` swaps the classes back. A ``Queue`` handle obtained
  before :func:`instrument` stays uninstrumented (ask ``store.queue(name)`` again); one obtained
  while instrumented stops recording at :meth:`~Instrumentation.uninstrument`.
* **Operation names** are the method names: ``get``, ``set_many``, ``compare_and_set`` on the
  store; ``lease.acquire``, ``agent.heartbeat``, ``queue.claim``, ``changes.read``,
  ``snapshot.create`` on the others. Each public call is measured once, including what it
  waits for (``queue.claim(wait=...)``, ``lease.acquire(wait=...)``); ``changes.watch`` is a
  stream, measured by its lag instead.
* **Outcome** (``fleetmem_operations_total``): ``ok``, the fleetmem error's name in kebab case
  without ``Error`` (``version-conflict``, ``key-not-found``, ``backend-unavailable``: the
  ``type`` of the service's problem documents), ``cancelled``, ``timeout``, or ``other``. A
  missing key on ``get`` is ``ok`` (it returns the default).
* **Prometheus**: by default on ``prometheus_client.REGISTRY`` (so ``start_http_server()``
  shows them). The samples come from one collector per registry that sums every store
  instrumented on it, so instrumenting several stores (or one twice) never registers a metric
  twice; operations are counted in plain integers and rendered at scrape time, which is what
  keeps the cost of a measured call near a microsecond. A store uninstrumented or garbage
  collected leaves its counts in the totals (counters never go down).
* **Gauges collected on scrape**: ``fleetmem_pool_connections`` is read from the pools by the
  collector itself; ``fleetmem_queue_jobs`` and ``fleetmem_agents_live`` need queries, so
  :meth:`Instrumentation.collect` (awaited) refreshes them for the store's namespace and
  every namespace of a view made from it. Without ``namespace_label`` they are summed over
  those namespaces.
* **OpenTelemetry**: one ``CLIENT`` span per operation named ``"{operation} {namespace}"``
  with ``db.system.name`` (``postgresql``, ``redis``, ``sqlite``; ``fleetmem`` for the memory
  store; ``postgresql``, the store of record, for the hybrid), ``db.operation.name``,
  ``db.namespace`` (the fleetmem namespace: what scopes the keys, as a database does),
  ``server.address``/``server.port`` where there is a server, ``fleetmem.backend``, and on
  failure ``error.type`` (the exception's qualified class name) with an error status whose
  description is the outcome (never the message, which may name a key). The
  ``db.client.operation.duration`` histogram carries the same attributes. Providers are
  resolved when :func:`instrument` runs: the ones given, else the global ones; when neither
  is configured, no span or measurement is made at all.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fleetmem.agents import AgentRegistry
from fleetmem.changes import Changes
from fleetmem.errors import ConfigurationError, FleetmemError, MissingDependencyError
from fleetmem.leases import Leases
from fleetmem.protocol import Change
from fleetmem.queues import Queue
from fleetmem.snapshots import Snapshots
from fleetmem.store import Store

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "DURATION_BUCKETS",
    "OTEL_DURATION_BUCKETS",
    "Instrumentation",
    "instrument",
    "instrumentation_of",
    "operation_names",
]

#: Upper bounds (seconds) of ``fleetmem_operation_duration_seconds``: from a cached read on
#: loopback (~100 µs) to a long poll.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: The boundaries the semantic conventions recommend for ``db.client.operation.duration``.
#: How many namespaces :meth:`Instrumentation.collect` reads (the store's own and the most
#: recently made views'); a queue or agent gauge of an older one is no longer refreshed.
COLLECTED_NAMESPACES = 256

OTEL_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

_STORE_OPERATIONS = (
    "get",
    "get_entry",
    "get_many",
    "exists",
    "ttl",
    "keys",
    "search",
    "partitions",
    "namespaces",
    "stats",
    "health",
    "set",
    "set_many",
    "set_if_absent",
    "compare_and_set",
    "incr",
    "delete",
    "delete_many",
    "expire",
    "persist",
    "clear_partition",
    "clear",
    "cleanup_expired",
    "export_to",
    "import_from",
    "list_queues",
)
#: front-end class -> (operation prefix, its measured methods).
_FRONT_ENDS: dict[type, tuple[str, tuple[str, ...]]] = {
    Leases: ("lease", ("acquire", "renew", "release", "holder")),
    AgentRegistry: ("agent", ("register", "heartbeat", "deregister", "get", "list", "count")),
    Queue: (
        "queue",
        (
            "put",
            "put_many",
            "claim",
            "claim_many",
            "extend",
            "ack",
            "nack",
            "cancel",
            "result",
            "stats",
            "dead",
            "retry_dead",
            "purge_dead",
        ),
    ),
    Changes: ("changes", ("enable", "disable", "enabled", "cursor", "read")),
    Snapshots: ("snapshot", ("create", "list", "get", "delete", "diff", "restore")),
}
#: The store attributes caching a front end (``Store.leases`` ... ``Store.snapshots``).
_CACHED_FRONT_ENDS = ("_leases", "_agents", "_changes", "_snapshots")
_QUEUE_STATES = ("ready", "delayed", "claimed", "dead", "done")
_DB_SYSTEM = {
    "memory": "fleetmem",
    "sqlite": "sqlite",
    "postgres": "postgresql",
    "redis": "redis",
    "hybrid": "postgresql",
}


def operation_names() -> list[str]:
    """Every operation name the metrics and spans use."""
    names = list(_STORE_OPERATIONS)
    for prefix, methods in _FRONT_ENDS.values():
        names.extend(f"{prefix}.{m}" for m in methods)
    return names


# ---------------------------------------------------------------- outcomes

_OUTCOMES: dict[type, str] = {}


def outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of an operation that raised ``exc`` (see the module docstring)."""
    cls = type(exc)
    name = _OUTCOMES.get(cls)
    if name is None:
        if isinstance(exc, FleetmemError):
            base = cls.__name__.removesuffix("Error") or cls.__name__
            name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", base).lower()
        elif isinstance(exc, asyncio.CancelledError):
            name = "cancelled"
        elif isinstance(exc, TimeoutError):
            name = "timeout"
        else:
            name = "other"
        _OUTCOMES[cls] = name
    return name


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------- counts


class _OpStats:
    """One operation's counts: by outcome, and a duration histogram of every outcome."""

    __slots__ = ("buckets", "errors", "ok", "total")

    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    def failed(self, exc: BaseException, seconds: float) -> None:
        outcome = outcome_of(exc)
        self.errors[outcome] = self.errors.get(outcome, 0) + 1
        self.total += seconds
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1

    def add(self, other: _OpStats) -> None:
        self.ok += other.ok
        for outcome, n in list(other.errors.items()):
            self.errors[outcome] = self.errors.get(outcome, 0) + n
        self.total += other.total
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n


@dataclass
class _Counts:
    """What one instrumentation has counted, read by its registry's collector (possibly from
    another thread: every field is replaced or updated in a single step)."""

    backend: str
    #: (namespace or "", operation) -> counts
    ops: dict[tuple[str, str], _OpStats] = field(default_factory=dict)
    #: (namespace or "", queue, state) -> jobs
    queue_jobs: dict[tuple[str, str, str], int] = field(default_factory=dict)
    #: namespace or "" -> live agents
    agents: dict[str, int] = field(default_factory=dict)
    #: namespace or "" -> seconds between the newest change delivered and its delivery
    lag: dict[str, float] = field(default_factory=dict)
    #: the hybrid's cache counters (``HybridMetrics``), when the store is a hybrid
    cache: Any = None
    #: () -> [(backend, idle, busy)], the pools of the store's technologies
    pools: list[Callable[[], tuple[str, int, int] | None]] = field(default_factory=list)

    def op(self, namespace: str, operation: str) -> _OpStats:
        stats = self.ops.get((namespace, operation))
        if stats is None:
            stats = self.ops[(namespace, operation)] = _OpStats()
        return stats


def _cache_counts(cache: Any) -> tuple[int, int]:
    """(hits, misses) of a hybrid's ``HybridMetrics``; a cached absence is a hit."""
    return cache.hits + cache.negative_hits, cache.misses


class _RegistryCollector:
    """The fleetmem samples of one Prometheus registry: every store instrumented on it."""

    def __init__(self, namespace_label: bool) -> None:
        self.namespace_label = namespace_label
        self.live: weakref.WeakSet[Instrumentation] = weakref.WeakSet()
        self.retired: dict[tuple[str, str, str], _OpStats] = {}
        self.retired_cache = [0, 0]
        self._lock = threading.Lock()

    def retire(self, counts: _Counts) -> None:
        """Keep the counters of an instrumentation that ended (uninstrumented or collected)."""
        with self._lock:
            for (ns, op), stats in list(counts.ops.items()):
                key = (counts.backend, ns, op)
                kept = self.retired.get(key)
                if kept is None:
                    kept = self.retired[key] = _OpStats()
                kept.add(stats)
            if counts.cache is not None:
                hits, misses = _cache_counts(counts.cache)
                self.retired_cache[0] += hits
                self.retired_cache[1] += misses
            counts.ops = {}
            counts.cache = None

    def _families(self) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ns = ["namespace"] if self.namespace_label else []
        return [
            CounterMetricFamily(
                "fleetmem_operations",
                "fleetmem operations by backend, operation and outcome",
                labels=["backend", "operation", "outcome", *ns],
            ),
            HistogramMetricFamily(
                "fleetmem_operation_duration_seconds",
                "Duration of fleetmem operations, every outcome",
                labels=["backend", "operation", *ns],
                unit="seconds",
            ),
            CounterMetricFamily(
                "fleetmem_cache_requests",
                "Reads of the hybrid store's Redis cache by result (hit or miss)",
                labels=["result"],
            ),
            GaugeMetricFamily(
                "fleetmem_pool_connections",
                "Connections of the stores' pools by state (idle or busy)",
                labels=["backend", "state"],
            ),
            GaugeMetricFamily(
                "fleetmem_queue_jobs",
                "Jobs per queue and state, as of the last Instrumentation.collect()",
                labels=["queue", "state", *ns],
            ),
            GaugeMetricFamily(
                "fleetmem_agents_live",
                "Live agents, as of the last Instrumentation.collect()",
                labels=ns,
            ),
            GaugeMetricFamily(
                "fleetmem_changes_lag_seconds",
                "Age of the newest change a changes.watch() iterator delivered, when delivered",
                labels=ns,
                unit="seconds",
            ),
        ]

    def describe(self) -> Iterator[Any]:
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        ops_f, dur_f, cache_f, pool_f, queue_f, agents_f, lag_f = self._families()
        with self._lock:
            ops: dict[tuple[str, str, str], _OpStats] = {}
            for key, stats in list(self.retired.items()):
                ops.setdefault(key, _OpStats()).add(stats)
            hits, misses = self.retired_cache
        live = list(self.live)
        pools: dict[tuple[str, str], int] = {}
        queues: dict[tuple[str, str, str], int] = {}
        agents: dict[str, int] = {}
        lag: dict[str, float] = {}
        any_cache = hits + misses > 0
        for inst in live:
            counts = inst._counts
            for (ns, op), stats in list(counts.ops.items()):
                ops.setdefault((counts.backend, ns, op), _OpStats()).add(stats)
            if counts.cache is not None:
                h, m = _cache_counts(counts.cache)
                hits, misses, any_cache = hits + h, misses + m, True
            for source in counts.pools:
                got = source()
                if got is not None:
                    tech, idle, busy = got
                    pools[(tech, "idle")] = pools.get((tech, "idle"), 0) + idle
                    pools[(tech, "busy")] = pools.get((tech, "busy"), 0) + busy
            for qkey, n in list(counts.queue_jobs.items()):
                queues[qkey] = queues.get(qkey, 0) + n
            for akey, n in list(counts.agents.items()):
                agents[akey] = agents.get(akey, 0) + n
            for lkey, seconds in list(counts.lag.items()):
                lag[lkey] = max(seconds, lag.get(lkey, seconds))
        labelled = self.namespace_label
        for (backend, ns, op), stats in sorted(ops.items()):
            if not stats.ok and not stats.errors:
                continue  # made up front, never called
            tail = [ns] if labelled else []
            if stats.ok:
                ops_f.add_metric([backend, op, "ok", *tail], stats.ok)
            for outcome, n in sorted(stats.errors.items()):
                ops_f.add_metric([backend, op, outcome, *tail], n)
            cumulative, buckets = 0, []
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), stats.buckets, strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            dur_f.add_metric([backend, op, *tail], buckets, stats.total)
        if any_cache:
            cache_f.add_metric(["hit"], hits)
            cache_f.add_metric(["miss"], misses)
        for (tech, state), n in sorted(pools.items()):
            pool_f.add_metric([tech, state], n)
        for (ns, queue, state), n in sorted(queues.items()):
            queue_f.add_metric([queue, state, *([ns] if labelled else [])], n)
        for ns, n in sorted(agents.items()):
            agents_f.add_metric([ns] if labelled else [], n)
        for ns, seconds in sorted(lag.items()):
            lag_f.add_metric([ns] if labelled else [], seconds)
        yield from (ops_f, dur_f, cache_f, pool_f, queue_f, agents_f, lag_f)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


_COLLECTORS: weakref.WeakKeyDictionary[Any, _RegistryCollector] = weakref.WeakKeyDictionary()
_COLLECTORS_LOCK = threading.Lock()


def _collector_for(registry: Any, namespace_label: bool) -> _RegistryCollector:
    with _COLLECTORS_LOCK:
        collector = _COLLECTORS.get(registry)
        if collector is None:
            collector = _RegistryCollector(namespace_label)
            registry.register(collector)
            _COLLECTORS[registry] = collector
        elif collector.namespace_label != namespace_label:
            have = "with" if collector.namespace_label else "without"
            raise ConfigurationError(
                f"this registry already has fleetmem metrics {have} a namespace label: "
                "every store instrumented on one registry must use the same namespace_label"
            )
        return collector


# ---------------------------------------------------------------- where the store runs


def _server_of(url: str | None, default_port: int) -> dict[str, Any]:
    """``server.address``/``server.port`` of a backend URL (no user or password)."""
    if not url:
        return {}
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return {"server.address": parts.path} if parts.path else {}
        host = urlsplit("//" + parts.netloc.rpartition("@")[2].split(",")[0])
        if not host.hostname:
            return {}
        return {"server.address": host.hostname, "server.port": host.port or default_port}
    except ValueError:
        return {}


def _postgres_server(kv: Any) -> dict[str, Any]:
    return _server_of(getattr(kv.connector, "dsn", None), 5432)


def _redis_server(kv: Any) -> dict[str, Any]:
    return _server_of(kv.connector.where, 6379)


def _postgres_pool(kv: Any) -> Callable[[], tuple[str, int, int] | None]:
    connector = kv.connector

    def usage() -> tuple[str, int, int] | None:
        if not connector.ready:
            return None
        size, idle = connector.pool_usage()
        return "postgres", idle, max(size - idle, 0)

    return usage


def _redis_pool(kv: Any, store: Store[Any]) -> Callable[[], tuple[str, int, int] | None]:
    from fleetmem.backends.redis.connector import UNDECIDED

    connector = kv.connector

    def usage() -> tuple[str, int, int] | None:
        # Until connect() has decided the kind of server, reading ``client`` would make one.
        if store.closed or connector.form == UNDECIDED:
            return None
        pool = getattr(connector.client, "connection_pool", None)  # None on a Cluster
        if pool is None:
            return None
        # redis-py has no public count of its pool's connections in every supported version.
        idle = len(getattr(pool, "_available_connections", ()))
        busy = len(getattr(pool, "_in_use_connections", ()))
        return "redis", idle, busy

    return usage


def _where(store: Store[Any]) -> tuple[dict[str, Any], list[Callable[[], Any]], Any]:
    """The store's server attributes, pool readers and hybrid cache counters."""
    kv: Any = store.kv
    backend = store.backend
    if backend == "postgres":
        return _postgres_server(kv), [_postgres_pool(kv)], None
    if backend == "redis":
        return _redis_server(kv), [_redis_pool(kv, store)], None
    if backend == "hybrid":
        durable, cache = kv.durable, kv.cache
        pools: list[Callable[[], Any]] = [_redis_pool(cache, store)]
        server: dict[str, Any] = {}
        if getattr(durable, "backend_name", None) == "postgres":
            server = _postgres_server(durable)
            pools.insert(0, _postgres_pool(durable))
        return server, pools, kv.metrics
    return {}, [], None


# ---------------------------------------------------------------- OpenTelemetry


class _Otel:
    """The tracer and duration histogram, when a provider is configured."""

    def __init__(self, tracer_provider: Any, meter_provider: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        self.tracer: Any = None
        self.histogram: Any = None
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            if tracer_provider is not None or meter_provider is not None:
                raise MissingDependencyError("opentelemetry-api", "metrics") from None
            return
        try:
            ours = version("fleetmem")
        except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
            ours = None
        self.span_kind = trace.SpanKind.CLIENT
        self.status_error = trace.StatusCode.ERROR
        self.status = trace.Status
        tp = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        if not isinstance(tp, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            self.tracer = tp.get_tracer("fleetmem", ours)
        mp = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        # The global provider before one is set is the API's private _ProxyMeterProvider.
        unset = isinstance(mp, metrics.NoOpMeterProvider) or type(mp).__name__.startswith("_Proxy")
        if not unset:
            self.histogram = mp.get_meter("fleetmem", ours).create_histogram(
                "db.client.operation.duration",
                unit="s",
                description="Duration of database client operations.",
                explicit_bucket_boundaries_advisory=list(OTEL_DURATION_BUCKETS),
            )

    @property
    def on(self) -> bool:
        return self.tracer is not None or self.histogram is not None


# ---------------------------------------------------------------- the instrumentation


# The wrapper of the Prometheus-only path, written with the wrapped method's own parameters
# (as dataclasses writes __init__): forwarding ``*args, **kwargs`` costs as much again as the
# counting itself. The names it closes over start with ``_fm_`` so no parameter can shadow them.
_COUNTED = """
def _fm_make(_fm_fn, _fm_inst, _fm_stats, _fm_defaults):
    _fm_bounds = DURATION_BUCKETS
    async def {name}({params}):
        if not _fm_inst.active:
            return await _fm_fn({call})
        _fm_started = perf_counter()
        try:
            _fm_result = await _fm_fn({call})
        except BaseException as _fm_exc:
            _fm_stats.failed(_fm_exc, perf_counter() - _fm_started)
            raise
        _fm_seconds = perf_counter() - _fm_started
        _fm_stats.ok += 1
        _fm_stats.total += _fm_seconds
        _fm_stats.buckets[bisect_left(_fm_bounds, _fm_seconds)] += 1
        return _fm_result
    return {name}
"""


def _counted(fn: Any, inst: Instrumentation, stats: _OpStats) -> Any:
    """``fn`` (an async method) counted into ``stats`` while ``inst`` is active. Positional-only
    parameters are forwarded by position (the wrapper also takes them by name: harmless)."""
    params: list[str] = []
    call: list[str] = []
    defaults: list[Any] = []
    starred = False
    kinds = inspect.Parameter
    for param in inspect.signature(fn).parameters.values():
        name = param.name
        decl = name
        if param.default is not kinds.empty:
            decl = f"{name}=_fm_defaults[{len(defaults)}]"
            defaults.append(param.default)
        if param.kind is kinds.VAR_POSITIONAL:
            params.append(f"*{name}")
            call.append(f"*{name}")
            starred = True
        elif param.kind is kinds.VAR_KEYWORD:
            params.append(f"**{name}")
            call.append(f"**{name}")
        elif param.kind is kinds.KEYWORD_ONLY:
            if not starred:
                params.append("*")
                starred = True
            params.append(decl)
            call.append(f"{name}={name}")
        else:
            params.append(decl)
            call.append(name)
    source = _COUNTED.format(name=fn.__name__, params=", ".join(params), call=", ".join(call))
    scope: dict[str, Any] = {
        "DURATION_BUCKETS": DURATION_BUCKETS,
        "perf_counter": perf_counter,
        "bisect_left": bisect_left,
    }
    exec(source, scope)  # noqa: S102 - the source is the template above and parameter names
    counted = scope["_fm_make"](fn, inst, stats, tuple(defaults))
    return functools.wraps(fn)(counted)


class _WatchLag:
    """Told of each change a watch delivers (``Changes._watch_observer``)."""

    __slots__ = ("_counts", "_labelled")

    def __init__(self, counts: _Counts, labelled: bool) -> None:
        self._counts = counts
        self._labelled = labelled

    def delivered(self, feed: Changes, change: Change) -> None:
        ns = feed.namespace if self._labelled else ""
        self._counts.lag[ns] = max(time.time() - change.at.timestamp(), 0.0)


class Instrumentation:
    """The metrics and spans of one store (see :func:`instrument`)."""

    def __init__(
        self,
        store: Store[Any],
        registry: CollectorRegistry | None,
        namespace_label: bool,
        otel: _Otel | None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._namespace_label = bool(namespace_label)
        self._otel = otel if otel is not None and otel.on else None
        server, pools, cache = _where(store)
        self._counts = _Counts(store.backend, cache=cache, pools=pools)
        self._collector: _RegistryCollector | None = None
        self._server = server
        self._attrs: dict[tuple[str, str], dict[str, Any]] = {}
        self._classes: dict[type, type] = {}
        self._plain: dict[type, type] = {}
        # The namespaces collect() reads, most recently used last, at most COLLECTED_NAMESPACES
        # (a service answering any number of namespaces must not make every scrape slower).
        self._namespaces: dict[str, None] = {store.namespace: None}
        self._seams: dict[str, tuple[Any, Any]] = {}
        self._watch_lag = _WatchLag(self._counts, self._namespace_label)
        self.active = False

    # -------------------------------------------------------------- public

    @property
    def store(self) -> Store[Any]:
        return self._store

    @property
    def registry(self) -> CollectorRegistry | None:
        """The Prometheus registry the metrics are on (None: Prometheus was not asked for)."""
        return self._registry

    @property
    def namespace_label(self) -> bool:
        return self._namespace_label

    @property
    def tracing(self) -> bool:
        """Whether spans are made (a tracer provider was configured)."""
        return self._otel is not None and self._otel.tracer is not None

    @property
    def namespaces(self) -> list[str]:
        """The namespaces :meth:`collect` reads: the store's and its views' (the most recently
        made :data:`COLLECTED_NAMESPACES` of them)."""
        return sorted(self._namespaces)

    async def collect(self) -> None:
        """Refresh ``fleetmem_queue_jobs`` and ``fleetmem_agents_live``: for each namespace of
        :attr:`namespaces`, its queues' ``stats()`` and its live agent count (one query each;
        these calls are not counted as operations). Await it before rendering the registry
        (``generate_latest``), or every few seconds in a task next to
        ``prometheus_client.start_http_server``. A namespace whose backend fails is left out
        of this round; nothing is raised but ``CancelledError``."""
        if not self.active:
            return
        if self._store.closed:
            self._counts.queue_jobs = {}
            self._counts.agents = {}
            return
        labelled = self._namespace_label
        jobs: dict[tuple[str, str, str], int] = {}
        agents: dict[str, int] = {}
        for ns in sorted(self._namespaces):
            queues, registry = self._seams_of(ns)
            key = ns if labelled else ""
            try:
                found: list[tuple[str, Any]] = []
                for name in await queues.list_queues():
                    found.append((name, await queues.stats(name)))
                live = await registry.count()
            except (FleetmemError, OSError):
                continue
            for name, stats in found:
                for state in _QUEUE_STATES:
                    jkey = (key, name, state)
                    jobs[jkey] = jobs.get(jkey, 0) + getattr(stats, state)
            agents[key] = agents.get(key, 0) + live
        self._counts.queue_jobs = jobs
        self._counts.agents = agents

    def uninstrument(self) -> None:
        """Give the store, its views and their front ends their own classes back. The counts
        so far stay in the registry's totals. Idempotent."""
        if not self.active:
            return
        self.active = False
        plain = self._plain
        for obj in self._reachable():
            for attr in _CACHED_FRONT_ENDS:
                front = obj.__dict__.get(attr)
                if front is not None and type(front) in plain:
                    front.__class__ = plain[type(front)]
            if type(obj) in plain:
                obj.__class__ = plain[type(obj)]
        if self._collector is not None:
            self._collector.live.discard(self)
            self._collector.retire(self._counts)

    def __repr__(self) -> str:
        state = "active" if self.active else "ended"
        return f"<Instrumentation {state} store={self._store!r}>"

    # -------------------------------------------------------------- setup

    def _note(self, namespace: str) -> None:
        """Remember ``namespace`` for :meth:`collect`, forgetting the least recently used one
        beyond :data:`COLLECTED_NAMESPACES` (never the store's own)."""
        known = self._namespaces
        known.pop(namespace, None)
        known[namespace] = None
        if len(known) > COLLECTED_NAMESPACES:
            own = self._store.namespace
            for old in known:
                if old != own:
                    del known[old]
                    self._seams.pop(old, None)
                    break

    def _start(self) -> None:
        if self._registry is not None:
            self._collector = _collector_for(self._registry, self._namespace_label)
        if self._collector is None and self._otel is None:
            return  # nothing configured: nothing to do, and the store is left as it was
        self.active = True
        for obj in self._reachable():
            self._note(obj.namespace)
            self._swap(obj)
            for attr in _CACHED_FRONT_ENDS:
                front = obj.__dict__.get(attr)
                if front is not None:
                    self._swap(front)
        if self._collector is not None:
            self._collector.live.add(self)
            weakref.finalize(self, self._collector.retire, self._counts)

    def _reachable(self) -> list[Store[Any]]:
        store = self._store
        return [store, *(v for v in list(store._shared.views) if v is not store)]

    def _swap(self, obj: Any) -> None:
        cls = type(obj)
        if cls in self._plain:
            return
        obj.__class__ = self._class_for(cls)

    def _class_for(self, base: type) -> type:
        made = self._classes.get(base)
        if made is not None:
            return made
        if issubclass(base, Store):
            attrs = self._store_members(base)
            attrs["_fleetmem_instrumentation"] = self
        else:
            prefix, methods = next(v for k, v in _FRONT_ENDS.items() if issubclass(base, k))
            attrs = {
                name: self._timed(getattr(base, name), f"{prefix}.{name}")
                for name in methods
                if hasattr(base, name)
            }
            attrs["__slots__"] = ()
            if issubclass(base, Changes) and self._collector is not None:
                attrs["_watch_observer"] = self._watch_lag
        # The same names: reprs and error messages read as before.
        attrs["__module__"] = base.__module__
        attrs["__qualname__"] = base.__qualname__
        made = type(base.__name__, (base,), attrs)
        self._classes[base] = made
        self._plain[made] = base
        return made

    def _store_members(self, base: type[Store[Any]]) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            name: self._timed(getattr(base, name), name)
            for name in _STORE_OPERATIONS
            if hasattr(base, name)
        }
        inst = self
        plain_with_namespace = base.with_namespace

        @functools.wraps(plain_with_namespace)
        def with_namespace(self: Any, namespace: str) -> Any:
            view = plain_with_namespace(self, namespace)
            if inst.active:
                inst._note(view.namespace)
            return view

        attrs["with_namespace"] = with_namespace
        for attr in ("leases", "agents", "changes", "snapshots"):
            attrs[attr] = self._front_end_property(getattr(base, attr))
        plain_queue = base.queue

        @functools.wraps(plain_queue)
        def queue(self: Any, name: str) -> Any:
            handle = plain_queue(self, name)
            if inst.active:
                inst._swap(handle)
            return handle

        attrs["queue"] = queue
        return attrs

    def _front_end_property(self, prop: property) -> property:
        inst = self
        fget = prop.fget
        assert fget is not None

        @functools.wraps(fget)
        def get(self: Any) -> Any:
            front = fget(self)
            if inst.active:
                inst._swap(front)
            return front

        return property(get, doc=prop.__doc__)

    def _timed(self, fn: Any, op: str) -> Any:
        """``fn`` (an async method) measured as operation ``op``."""
        inst = self
        otel = self._otel
        if otel is None and not self._namespace_label:
            return _counted(fn, self, self._counts.op("", op))

        @functools.wraps(fn)
        async def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not inst.active:
                return await fn(self, *args, **kwargs)
            ns = self.namespace
            tracer = otel.tracer if otel is not None else None
            if tracer is None:
                started = perf_counter()
                try:
                    result = await fn(self, *args, **kwargs)
                except BaseException as exc:
                    inst._record(op, ns, perf_counter() - started, exc)
                    raise
                inst._record(op, ns, perf_counter() - started, None)
                return result
            assert otel is not None
            with tracer.start_as_current_span(
                f"{op} {ns}",
                kind=otel.span_kind,
                attributes=inst._span_attributes(op, ns),
                record_exception=False,  # an exception's message may name a key
                set_status_on_exception=False,
            ) as span:
                started = perf_counter()
                try:
                    result = await fn(self, *args, **kwargs)
                except BaseException as exc:
                    seconds = perf_counter() - started
                    span.set_attribute("error.type", _error_type(exc))
                    span.set_status(otel.status(otel.status_error, outcome_of(exc)))
                    inst._record(op, ns, seconds, exc)
                    raise
                inst._record(op, ns, perf_counter() - started, None)
                return result

        return traced

    def _span_attributes(self, op: str, ns: str) -> dict[str, Any]:
        attrs = self._attrs.get((op, ns))
        if attrs is None:
            attrs = {
                "db.system.name": _DB_SYSTEM.get(self._counts.backend, "fleetmem"),
                "db.operation.name": op,
                "db.namespace": ns,
                **self._server,
                "fleetmem.backend": self._counts.backend,
            }
            self._attrs[(op, ns)] = attrs
        return attrs

    def _record(self, op: str, ns: str, seconds: float, exc: BaseException | None) -> None:
        if self._collector is not None:
            stats = self._counts.op(ns if self._namespace_label else "", op)
            if exc is None:
                stats.ok += 1
                stats.total += seconds
                stats.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
            else:
                stats.failed(exc, seconds)
        otel = self._otel
        if otel is not None and otel.histogram is not None:
            attrs = self._span_attributes(op, ns)
            if exc is not None:
                attrs = {**attrs, "error.type": _error_type(exc)}
            otel.histogram.record(seconds, attrs)

    def _seams_of(self, ns: str) -> tuple[Any, Any]:
        seams = self._seams.get(ns)
        if seams is None:
            kv: Any = self._store.kv
            if kv.namespace != ns:
                kv = kv.view(ns)
            seams = self._seams[ns] = (kv.queues(), kv.agents())
        return seams


def instrumentation_of(store: Store[Any]) -> Instrumentation | None:
    """The active :class:`Instrumentation` of ``store`` (or of the store it is a view of)."""
    inst = getattr(type(store), "_fleetmem_instrumentation", None)
    return inst if isinstance(inst, Instrumentation) and inst.active else None


def instrument(
    store: Store[Any],
    *,
    registry: CollectorRegistry | None = None,
    namespace_label: bool = False,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    prometheus: bool = True,
) -> Instrumentation:
    """Measure every operation of ``store``, its views and their front ends.

    * ``registry``: the Prometheus registry (default ``prometheus_client.REGISTRY``);
      ``prometheus=False`` leaves Prometheus out (OpenTelemetry only).
    * ``namespace_label``: add a ``namespace`` label to the per-namespace metrics.
    * ``tracer_provider`` / ``meter_provider``: OpenTelemetry providers; by default the global
      ones, used only when they have been set (``trace.set_tracer_provider``) before this call.

    With neither Prometheus nor a provider, nothing is changed. Instrumenting a store again
    with the same arguments returns its :class:`Instrumentation`; with others it raises
    :class:`~fleetmem.errors.ConfigurationError` (call ``uninstrument()`` first). Without
    ``prometheus-client`` (asked for) raises ``MissingDependencyError(..., "metrics")``.
    """
    if not isinstance(store, Store):
        raise ConfigurationError(f"instrument() takes a fleetmem store, not {type(store).__name__}")
    if prometheus:
        try:
            import prometheus_client
        except ImportError:
            raise MissingDependencyError("prometheus-client", "metrics") from None
        if registry is None:
            registry = prometheus_client.REGISTRY
    elif registry is not None:
        raise ConfigurationError("a registry was given with prometheus=False")
    current = instrumentation_of(store)
    if current is not None:
        if (
            current._registry is registry
            and current._namespace_label == bool(namespace_label)
            and tracer_provider is None
            and meter_provider is None
        ):
            return current
        raise ConfigurationError(
            "this store is already instrumented differently: call uninstrument() first"
        )
    otel = _Otel(tracer_provider, meter_provider)
    inst = Instrumentation(store, registry, namespace_label, otel)
    inst._start()
    return inst
