"""``HybridStore``: Redis as a coherent cache in front of PostgreSQL (see ``kv.py``)."""

from __future__ import annotations

from typing import Any

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES
from fleetmem._urls import split_hybrid_url
from fleetmem._validate import check_positive_int
from fleetmem.backends.hybrid.kv import HybridKV, HybridMetrics, cache_client_options
from fleetmem.errors import ConfigurationError, MissingDependencyError
from fleetmem.store import Store, user_namespace

__all__ = ["HybridStore"]


class HybridStore(Store[HybridKV]):
    """A ``MemoryStore`` whose reads are served by Redis and whose truth is PostgreSQL.

    ``durable`` is the store of record (a ``PostgresStore``; any fleetmem store works) and
    ``cache`` a ``RedisStore`` whose client serves the cache; the options are those of
    :class:`~fleetmem.backends.hybrid.kv.HybridKV`. The hybrid store closes the tiers only when
    it made them (:meth:`from_urls`, or ``owns_tiers=True``).
    """

    backend_name = "hybrid"

    def __init__(
        self,
        durable: Store[Any],
        cache: Store[Any],
        *,
        namespace: str | None = None,
        cache_ttl: float = 300.0,
        cache_deadline: float = 0.25,
        allow_stale_reads: bool = False,
        breaker_threshold: int = 2,
        breaker_cooldown: float = 1.0,
        lease_ttl: float = 5.0,
        trust_window: float = 0.5,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        owns_tiers: bool = False,
    ) -> None:
        check_positive_int("max_value_bytes", max_value_bytes)  # before the cache is touched
        if not isinstance(durable, Store):
            raise ConfigurationError("durable must be a fleetmem store (a PostgresStore)")
        if not isinstance(cache, Store):
            raise ConfigurationError("cache must be a RedisStore")
        kv = HybridKV(
            durable.kv,
            cache.kv,
            namespace=user_namespace(namespace if namespace is not None else durable.namespace),
            cache_ttl=cache_ttl,
            cache_deadline=cache_deadline,
            allow_stale_reads=allow_stale_reads,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            lease_ttl=lease_ttl,
            trust_window=trust_window,
        )
        super().__init__(kv, max_value_bytes=max_value_bytes)
        self._durable_store = durable
        self._cache_store = cache
        self._owns_tiers = bool(owns_tiers)
        self._durable_view: Store[Any] | None = None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} namespace={self.namespace!r} "
            f"durable={self._durable_store!r} cache={self._cache_store!r}>"
        )

    def with_namespace(self, namespace: str) -> HybridStore:
        view = super().with_namespace(namespace)
        view._durable_view = None
        return view

    async def close(self) -> None:
        """Close this store; and the tiers when it made them (:meth:`from_urls`) or was given
        ``owns_tiers=True``: then ``durable`` and ``cache`` report closed as well."""
        closes_tiers = self._owns_tiers and not self._is_view and not self._shared.closed
        await super().close()
        if closes_tiers:
            try:
                await self._cache_store.close()
            finally:
                await self._durable_store.close()

    @classmethod
    def from_url(cls, url: str, *, namespace: str = "default", **options: Any) -> HybridStore:
        """A hybrid store from one URL, the form ``open_store`` and ``FLEETMEM_URL`` take::

            hybrid+postgresql://user:pw@pg:5432/db?sslmode=require&cache=redis://cache:6379/0

        ``hybrid+postgresql://`` (or ``hybrid+postgres://``) and the PostgreSQL URL; ``cache=``
        is the Redis cache's URL, written as it is and last (its own ``?``/``&`` parameters are
        its own), or percent-encoded anywhere. ``cache_ttl``, ``cache_deadline`` and
        ``allow_stale_reads`` may be given as parameters too; ``options`` win over them. See
        :func:`fleetmem._urls.split_hybrid_url`. A URL without ``cache=``, or with a cache that
        is not Redis, raises :class:`~fleetmem.errors.ConfigurationError` (before any I/O).
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"url must be a str, not {type(url).__name__}")
        parts = split_hybrid_url(url)
        return cls.from_urls(
            parts.postgres_url,
            parts.cache_url,
            namespace=namespace,
            **{**parts.options, **options},
        )

    @classmethod
    def from_urls(
        cls,
        postgres_url: str,
        redis_url: str,
        *,
        namespace: str = "default",
        cache_deadline: float = 0.25,
        postgres_options: dict[str, Any] | None = None,
        redis_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> HybridStore:
        """Build both tiers from URLs; the hybrid store owns and closes them.

        Needs both drivers: a missing one raises :class:`~fleetmem.errors.MissingDependencyError`
        naming ``fleetmem[postgres,redis]``.
        """
        try:
            from fleetmem.backends.postgres import PostgresStore
            from fleetmem.backends.redis import RedisStore
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if not missing or missing == "fleetmem":
                raise
            raise MissingDependencyError(missing, "postgres,redis") from exc

        durable = PostgresStore.from_url(
            postgres_url, namespace=namespace, **(postgres_options or {})
        )
        cache = RedisStore.from_url(
            redis_url, namespace=namespace, **cache_client_options(cache_deadline, redis_options)
        )
        return cls(
            durable,
            cache,
            namespace=namespace,
            cache_deadline=cache_deadline,
            owns_tiers=True,
            **options,
        )

    @property
    def metrics(self) -> HybridMetrics:
        """Hits, misses, fills, fallbacks, breaker state (shared by namespace views)."""
        return self._kv.metrics

    @property
    def durable(self) -> Store[Any]:
        """The durable store on this store's namespace: reads and writes that skip the cache."""
        view = self._durable_view
        if view is None:
            durable = self._durable_store
            view = durable if durable.namespace == self.namespace else None
            if view is None:
                view = durable.with_namespace(self.namespace)
            self._durable_view = view
        return view
