"""``open_store()``: a thin layer that maps a URL scheme to a backend's constructor.

Every backend class offers ``from_url(url, *, namespace=..., **options)`` (no I/O) and
``connect()`` (opens connections, checks the schema); ``open_store`` calls the one and awaits the
other. It is awaitable and an async context manager::

    store = await open_store("redis://localhost:6379/0", namespace="agents")
    async with open_store() as store:  # FLEETMEM_* settings, else sqlite:///./fleetmem.db
        ...

The hybrid has a URL of its own: the PostgreSQL URL with ``hybrid+`` in front and the Redis
cache's URL as its ``cache=`` parameter (see :func:`fleetmem._urls.split_hybrid_url`)::

    hybrid+postgresql://user:pw@pg:5432/db?cache=redis://cache:6379/0&cache_ttl=60
"""

from __future__ import annotations

import importlib
from collections.abc import Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fleetmem._urls import is_hybrid_url, redact_url, split_hybrid_url, url_scheme
from fleetmem.errors import ConfigurationError, MissingDependencyError

if TYPE_CHECKING:
    # Imported where they are used: ``import fleetmem`` (and so every CLI call) must not pay
    # for pydantic or a backend it does not open.
    from fleetmem.settings import FleetmemSettings
    from fleetmem.store import Store

__all__ = ["SCHEMES", "open_store", "store_class"]

#: The hybrid needs both drivers, whichever one is missing: its hint names both extras.
_HYBRID_EXTRA = "postgres,redis"
_HYBRID = ("fleetmem.backends.hybrid", "HybridStore", "redis", _HYBRID_EXTRA)
_HYBRID_DURABLE = ("fleetmem.backends.postgres", "PostgresStore", "asyncpg", _HYBRID_EXTRA)

#: URL scheme -> (module, class, the driver module it needs, the extra that installs it).
SCHEMES: dict[str, tuple[str, str, str | None, str | None]] = {
    "memory": ("fleetmem.backends.memory", "InMemoryStore", None, None),
    "sqlite": ("fleetmem.backends.sqlite", "SQLiteStore", None, None),
    "postgresql": ("fleetmem.backends.postgres", "PostgresStore", "asyncpg", "postgres"),
    "postgres": ("fleetmem.backends.postgres", "PostgresStore", "asyncpg", "postgres"),
    "redis": ("fleetmem.backends.redis", "RedisStore", "redis", "redis"),
    "rediss": ("fleetmem.backends.redis", "RedisStore", "redis", "redis"),
    "unix": ("fleetmem.backends.redis", "RedisStore", "redis", "redis"),
    # hybrid+postgresql://user:pw@host:5432/db?cache=redis://host:6379/0 (see HybridStore.from_url)
    "hybrid+postgresql": _HYBRID,
    "hybrid+postgres": _HYBRID,
}


def _load(entry: tuple[str, str, str | None, str | None]) -> Any:
    """``entry``'s class, imported now; a missing driver raises MissingDependencyError naming
    the extra that installs it."""
    module_name, class_name, driver, extra = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if driver is not None and missing == driver:
            raise MissingDependencyError(driver, extra or driver) from exc
        if missing and missing != "fleetmem":
            raise MissingDependencyError(missing, extra or "all") from exc
        raise ConfigurationError(f"backend {class_name} is not available in this build") from exc
    return getattr(module, class_name)


def store_class(url: str) -> type[Store[Any]]:
    """The backend class that serves ``url`` (imports its driver)."""
    scheme = url_scheme(url)
    entry = SCHEMES.get(scheme)
    if entry is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigurationError(
            f"unknown store URL scheme in {redact_url(url)!r}: expected one of {known}"
        )
    if entry is _HYBRID:
        _load(_HYBRID_DURABLE)  # the hybrid builds a PostgresStore: its driver too, named here
    cls: type[Store[Any]] = _load(entry)
    return cls


async def _open(
    url: str | None,
    namespace: str | None,
    hybrid: tuple[str, str] | None,
    settings: FleetmemSettings | None,
    options: dict[str, Any],
) -> Store[Any]:
    if url is not None and hybrid is not None:
        raise ConfigurationError("give either url or hybrid=(postgres_url, redis_url), not both")
    if url is not None and not isinstance(url, str):
        raise ConfigurationError(f"url must be a str, not {type(url).__name__}")
    if url is None and hybrid is None:
        from fleetmem.settings import DEFAULT_URL, FleetmemSettings

        cfg = settings if settings is not None else FleetmemSettings()
        if namespace is None:
            namespace = cfg.namespace
        options.setdefault("max_value_bytes", cfg.max_value_bytes)
        if cfg.backend == "hybrid":
            if cfg.postgres_url is None or cfg.redis_url is None:
                raise ConfigurationError(
                    "FLEETMEM_BACKEND=hybrid needs FLEETMEM_POSTGRES_URL and FLEETMEM_REDIS_URL"
                )
            hybrid = (cfg.postgres_url.get_secret_value(), cfg.redis_url.get_secret_value())
            options.setdefault("cache_ttl", cfg.cache_ttl)
        else:
            url = cfg.url.get_secret_value() if cfg.url is not None else DEFAULT_URL
            if (
                is_hybrid_url(url)
                and "cache_ttl" in cfg.model_fields_set
                and "cache_ttl" not in split_hybrid_url(url).options
            ):
                # FLEETMEM_CACHE_TTL applies to a hybrid FLEETMEM_URL too; the URL's own wins.
                options.setdefault("cache_ttl", cfg.cache_ttl)
    ns = namespace if namespace is not None else "default"
    metrics = options.pop("metrics", False)
    if hybrid is not None:
        if not (isinstance(hybrid, tuple) and len(hybrid) == 2):
            raise ConfigurationError("hybrid must be a (postgres_url, redis_url) tuple")
        _load(_HYBRID_DURABLE)  # from_urls builds a PostgresStore: its driver too, named here
        hybrid_cls: Any = _load(_HYBRID)
        store: Store[Any] = hybrid_cls.from_urls(hybrid[0], hybrid[1], namespace=ns, **options)
    else:
        assert url is not None
        cls: Any = store_class(url)
        try:
            store = cls.from_url(url, namespace=ns, **options)
        except TypeError as exc:
            raise ConfigurationError(f"invalid option for {cls.__name__}: {exc}") from None
    try:
        if metrics:
            # Imported here: the metrics extra is optional, and ``import fleetmem`` loads
            # neither prometheus_client nor opentelemetry.
            from fleetmem.observability import instrument

            instrument(store)
        await store.connect()
    except BaseException:
        await store.close()
        raise
    return store


class _OpenStore:
    """The result of :func:`open_store`: await it, or use it as an async context manager."""

    def __init__(self, coro_args: tuple[Any, ...]) -> None:
        self._args = coro_args
        self._store: Store[Any] | None = None

    def __await__(self) -> Generator[Any, None, Store[Any]]:
        return _open(*self._args).__await__()

    async def __aenter__(self) -> Store[Any]:
        self._store = await _open(*self._args)
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._store is not None:
            await self._store.close()


def open_store(
    url: str | None = None,
    *,
    namespace: str | None = None,
    hybrid: tuple[str, str] | None = None,
    settings: FleetmemSettings | None = None,
    **options: Any,
) -> _OpenStore:
    """Open a store for ``url`` (or the ``FLEETMEM_*`` settings when ``url`` is None).

    ``url`` is one of ``memory://``, ``sqlite:///path/to/file.db``, ``postgresql://...``,
    ``redis://...`` (``rediss://``, ``unix://``) or a hybrid's
    ``hybrid+postgresql://user:pw@host:5432/db?cache=redis://host:6379/0`` (PostgreSQL as the
    store of record, Redis as its cache; ``cache_ttl``, ``cache_deadline`` and
    ``allow_stale_reads`` may be given as further parameters). With nothing configured this
    opens the embedded default, ``sqlite:///./fleetmem.db``: a file in the current working
    directory. ``hybrid=(postgres_url, redis_url)`` is the other way to open a
    :class:`~fleetmem.HybridStore`. ``options`` go to the backend's constructor (and win over
    the URL's parameters); every backend takes ``max_value_bytes``. ``metrics=True``
    instruments the store (:func:`fleetmem.observability.instrument` with its defaults:
    Prometheus's default registry, the global OpenTelemetry providers; see
    ``docs/observability.md``). An unknown scheme or option, or a hybrid URL without a Redis
    ``cache=``, raises :class:`ConfigurationError`; a missing driver raises
    :class:`MissingDependencyError` naming the extra to install.
    """
    return _OpenStore((url, namespace, hybrid, settings, dict(options)))
