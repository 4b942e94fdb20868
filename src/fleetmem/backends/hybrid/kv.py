"""``HybridKV``: Redis as a coherent cache in front of PostgreSQL, the system of record.

How it stays coherent (see docs/backends/hybrid.md for the guarantees):

* **Writes** go to the durable store first; the cache is touched only after COMMIT, and only to
  *delete* the written keys. A write that fails in PostgreSQL leaves the cache untouched.
* **Reads** run ``read.lua`` (a lone read: the same in two plain commands, see
  ``_hit_or_lease``): a hit returns the cached body; a miss leaves a *lease* (a random token)
  in the key. The reader then reads PostgreSQL and fills with ``fill.lua``, which writes only
  while the key still holds its lease. Any write between the lease and the fill deleted the
  lease, so a value read before a write can never be cached after it: no read/invalidate race,
  whatever the delays, and no reliance on versions (which restart at 1 after a delete).
* **Epochs** guard against lost invalidations. Every cached value carries its namespace's epoch;
  a value of any other epoch is dead. The epoch's authoritative counter lives in the durable
  store, in a namespace no user can open (``_fleetmem.hybrid``), and is published to Redis by
  ``epoch.lua`` as the string ``<epoch>.<nonce>|``, the prefix of every value cached under it.
  The nonce is random and new at every publication, so no epoch string is ever published
  twice for a namespace (not even when the number starts again after a clear): a copy made
  under one publication never matches another. The published number never goes backwards:
  when it is from before a Redis restart, or ahead of the durable one (a durable store
  restored from a backup), the durable epoch is raised past it and then published.
* **Trust**: a process uses a namespace's cache only while it has confirmed the durable epoch in
  PostgreSQL within ``trust_window`` (0.5 s; refreshed in the background), and only when Redis
  publishes exactly that epoch. A write that could not delete its keys from Redis (Redis down,
  slow, the breaker open, or only this process cut off from it) marks the namespace bypassed
  in PostgreSQL, bumps the durable epoch and waits one window before it is acknowledged: by
  then every process either reads PostgreSQL alone (it saw the mark) or confirmed the bump (and
  resyncs). No stale read from any process, at the cost of one PostgreSQL read per 3/4 window per
  namespace per process, and ``trust_window`` of latency for the first write of an outage.
  A restart of Redis is seen by its ``run_id`` (stored with the epoch, learned by every new
  connection) and by ``NOSCRIPT`` (the scripts are salted per namespace).
* **Clear** leaves nothing of the namespace in Redis: it deletes the published epoch and its
  run_id, then every cached copy and lease (``_remove_cleared``). Past the first step no copy
  from before the clear can ever be read or filled (the next publication must raise the
  durable epoch first and has a new nonce); the second only frees the memory. Redis failing
  at the first step takes the bypass of a missed invalidation. The durable epoch row stays: it
  is the namespace's coherence high-water mark, and an epoch that went back to 1 could be
  taken for one already published by the next bump.
* **Redis failures** never fail an operation: each cache call has a deadline (default 250 ms), a
  circuit breaker stops paying it on every call, and reads fall back to PostgreSQL.
* **Single flight**: concurrent reads of one key in one process share one cache read and at
  most one PostgreSQL read.
* **Export and import** go through PostgreSQL: an export is its snapshot (the cache is neither
  read nor filled), an import batch is retired from the cache as any write is, and a replace
  is PostgreSQL's one transaction followed by the retiring ``clear()`` does (``import_replace``).
* **Leases, fences, agents** live in PostgreSQL alone (``leases()``, ``agents()`` are the
  durable tier's). A fenced write carries its fence to the durable write, which checks it
  atomically; around it the protocol is the unfenced one. A refused write changed nothing in
  PostgreSQL, so the cache is not touched either (no invalidation, no bypass, no epoch bump).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, NoReturn, TypeVar

import orjson

from fleetmem._codec import decode_value, encode_value_ex
from fleetmem._validate import GlobPattern, check_positive_number, validate_ttl
from fleetmem.backends._files import read_text
from fleetmem.backends.redis import RedisKV, pack_command
from fleetmem.backends.seam import (
    MISSING,
    AgentBackend,
    ChangeBackend,
    EntryMeta,
    Fence,
    ImportOp,
    ImportTally,
    KVBackend,
    LeaseBackend,
    QueueBackend,
    SetOp,
    SnapshotBackend,
    health_report,
)
from fleetmem.errors import (
    BackendUnavailableError,
    ConfigurationError,
    LeaseLostError,
    OutcomeUnknownError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["HybridKV", "HybridMetrics", "cache_client_options"]

log = logging.getLogger("fleetmem.hybrid")

EPOCH_NAMESPACE = "_fleetmem.hybrid"
_READ_CHUNK = 500
# Lease tokens: unique per process (random prefix) and per call (a counter); cheaper than
# secrets.token_hex on the read path, and as unguessable as a lease needs to be.
_TOKEN_PREFIX = secrets.token_hex(6)
_token_counter = itertools.count()


_T = TypeVar("_T")


def _always(_result: Any) -> bool:
    return True


def _token() -> str:
    return f"{_TOKEN_PREFIX}{next(_token_counter):x}"


_NEGATIVE = b"N"
_ABSENT: tuple[None, None] = (None, None)
_ORJSON = b"O"
_ORJSON_BYTE = _ORJSON[0]


_PACKAGE = __package__ or "fleetmem.backends.hybrid"
_READ_LUA = read_text(_PACKAGE, "lua", "read.lua")
_FILL_LUA = read_text(_PACKAGE, "lua", "fill.lua")
_EPOCH_LUA = read_text(_PACKAGE, "lua", "epoch.lua")


from redis.exceptions import (  # noqa: E402 - after the script files
    NoScriptError,
    RedisClusterException,
    RedisError,
)

_REDIS_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError, TimeoutError)


class _NoScript(Exception):
    pass


class _LeaderGone(Exception):
    """The caller leading a single-flight load was cancelled; the others load again."""


#: Orders the reads of a process: a reader takes a number when it starts, a read in flight one
#: each time it sends the request whose answer it will return.
_sequence = itertools.count()


class _Flight:
    """A read in flight; its future is made only when a second reader joins.

    ``source`` numbers the request whose answer the read returns (from ``_sequence``). A reader
    that joined takes that answer only if the request went out after the reader began: an
    answer to an earlier request may predate a write another process acknowledged since.
    """

    __slots__ = ("future", "source")

    def __init__(self) -> None:
        self.future: asyncio.Future[bytes] | None = None
        self.source = -1

    def join(self) -> asyncio.Future[bytes]:
        """The future a joining reader waits on. Take it before any await: the reader in
        flight sets it only if it exists when that read ends."""
        if self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        return self.future

    def succeed(self, body: bytes) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(body)

    def end(self, exc: BaseException) -> None:
        """Pass the read's failure on; a cancelled reader's joiners load again."""
        if isinstance(exc, asyncio.CancelledError):
            exc = _LeaderGone()
        if self.future is not None and not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # waiters get it; do not warn when nobody waits


class _CacheFailed(Exception):
    """The cache could not answer in time; the caller falls back to PostgreSQL."""


@dataclass
class HybridMetrics:
    """Counters of one ``HybridStore`` (shared by its ``with_namespace`` views)."""

    hits: int = 0
    negative_hits: int = 0
    misses: int = 0
    fills: int = 0
    fills_voided: int = 0
    durable_reads: int = 0
    single_flight_joins: int = 0
    fallbacks: int = 0
    cache_errors: int = 0
    invalidations: int = 0
    invalidations_missed: int = 0
    epoch_bumps: int = 0
    #: Cache bypasses this process started (a write could not reach Redis), and the reads that
    #: went to PostgreSQL alone because some writer held one.
    bypasses: int = 0
    bypassed_reads: int = 0
    #: PostgreSQL reads of a namespace's epoch (one per trust window while it is read).
    epoch_confirmations: int = 0
    breaker_opened: int = 0
    stale_reads: int = 0
    breaker_state: str = "closed"

    def snapshot(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Breaker:
    """Closed -> open after ``threshold`` consecutive failures -> half-open after ``cooldown``."""

    def __init__(self, threshold: int, cooldown: float, metrics: HybridMetrics) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.metrics = metrics
        self.failures = 0
        self.state = "closed"
        self.opened_at = 0.0
        self.probing = False
        #: Bumped every time the breaker opens: namespaces resync when they see a new one.
        self.outages = 0

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and time.monotonic() - self.opened_at >= self.cooldown:
            self.state = "half-open"
            self.metrics.breaker_state = self.state
            self.probing = False
        if self.state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def blocked(self) -> bool:
        """Open and still cooling down (does not take the half-open probe)."""
        return self.state == "open" and time.monotonic() - self.opened_at < self.cooldown

    def success(self) -> None:
        if self.state != "closed":
            self.state = "closed"
            self.metrics.breaker_state = "closed"
        self.failures = 0
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.state == "half-open" or self.failures >= self.threshold:
            if self.state != "open":
                self.metrics.breaker_opened += 1
                self.outages += 1
            self.state = "open"
            self.opened_at = time.monotonic()
            self.metrics.breaker_state = "open"


@dataclass
class _Trust:
    """What this process last confirmed, in PostgreSQL, of one namespace's cache epoch."""

    #: The durable epoch, and the string a cached value of it starts with: its publication
    #: ``b"<epoch>.<nonce>|"`` as this process last saw it published (``b"<epoch>|"``, which
    #: is never published, while it has not seen one: the first read then resyncs).
    epoch: int
    epoch_b: bytes
    #: A writer could not reach Redis: nobody reads, fills or publishes this namespace's cache.
    bypass: bool
    #: Monotonic times: trusted until ``until`` (the confirmation was *sent* ``trust_window``
    #: before); confirmed again in the background from ``refresh_at``.
    until: float
    refresh_at: float
    #: PostgreSQL could not be reached; kept only to serve ``allow_stale_reads``.
    stale: bool = False


class _Bypass:
    """This process's hold on a namespace's cache bypass (``HybridKV._missed_invalidation``)."""

    __slots__ = ("lock", "ready_at", "valid_until")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        #: Monotonic: writes may be acknowledged from here (every reader has seen the bypass).
        self.ready_at = 0.0
        #: Monotonic: the bypass key surely still lives in PostgreSQL until here.
        self.valid_until = 0.0


@dataclass
class _Shared:
    """State shared by a HybridStore and its namespace views."""

    metrics: HybridMetrics
    breaker: _Breaker
    inflight: dict[tuple[str, str], _Flight] = field(default_factory=dict)
    #: namespace -> the breaker outage count it last synced after (absent: never synced here).
    synced: dict[str, int] = field(default_factory=dict)
    #: namespaces whose published epoch must be checked before their cache is used again.
    dirty: set[str] = field(default_factory=set)
    #: namespace -> its durable epoch as last confirmed (see ``_Trust``).
    trust: dict[str, _Trust] = field(default_factory=dict)
    #: namespace -> the epoch this process last saw published, as a number and as the string.
    published: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    #: namespace -> the confirmation in flight (single flight), and when it was started.
    confirming: dict[str, asyncio.Future[_Trust]] = field(default_factory=dict)
    confirm_sent: dict[str, float] = field(default_factory=dict)
    #: Retiring of cached copies still running after the write that started it ended.
    retiring: set[asyncio.Future[None]] = field(default_factory=set)
    #: namespace -> this process's cache bypass, once it needed one.
    bypasses: dict[str, _Bypass] = field(default_factory=dict)
    durable_down: bool = False
    client: Any = None
    #: The standalone cache client's connection pool when its connections know their server's
    #: run_id: lone reads then take the one-round-trip path of ``_hit_or_lease``.
    pool: Any = None


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _sent(flights: dict[str, _Flight] | None, keys: list[str]) -> None:
    """The reads of ``keys`` send their request now."""
    if flights:
        number = next(_sequence)
        for key in keys:
            flight = flights.get(key)
            if flight is not None:
                flight.source = number


def _us(dt: datetime | None) -> int | None:
    """Exact microseconds since the epoch (the cache keeps the durable timestamps exactly)."""
    return None if dt is None else (dt - _EPOCH) // _MICROSECOND


def _dt(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=us)


# The cache's own format, not RedisStore's entry string (fleetmem.backends.redis.entries): a
# cached copy is ``<epoch>.<nonce>|<marker><json header>\n<json>`` holding the durable store's
# microsecond timestamps and expiry exactly, where an entry string has a binary header of
# millisecond times and keeps its expiry in the key's TTL. So these readers stay here.
def _body(entry: Entry | None) -> bytes:
    """The cached form of an entry: a marker, ``<json header>\\n<json value>``; ``N`` for absent.

    The marker is ``O`` when orjson wrote the whole value (orjson reads it back exactly, with no
    scan for long digit runs on every hit) and ``V`` otherwise (integers beyond 64 bits...)."""
    if entry is None:
        return _NEGATIVE
    header = orjson.dumps(
        [
            entry.version,
            entry.partition,
            _us(entry.created_at),
            _us(entry.updated_at),
            _us(entry.expires_at),
        ]
    )
    data, exact = encode_value_ex(entry.value, sys.maxsize)
    return (_ORJSON if exact else b"V") + header + b"\n" + data


def _value_of(body: bytes, cut: int) -> Any:
    # A slice, not a memoryview: orjson reads bytes faster, and the copy is of a cache-sized value.
    data = body[cut + 1 :]
    return orjson.loads(data) if body[0] == _ORJSON_BYTE else decode_value(data)


def _cached_body(value: bytes) -> bytes:
    """The body of a cached value ``<epoch>.<nonce>|<body>``."""
    return value[value.index(b"|") + 1 :]


def _body_value(body: bytes) -> Any:
    if body == _NEGATIVE:
        return MISSING
    return _value_of(body, body.index(b"\n"))


def _body_entry(key: str, body: bytes) -> Entry | None:
    if body == _NEGATIVE:
        return None
    cut = body.index(b"\n")
    version, partition, created, updated, expires = orjson.loads(body[1:cut])
    return Entry(
        key,
        _value_of(body, cut),
        partition,
        version,
        _dt(created),  # type: ignore[arg-type]
        _dt(updated),  # type: ignore[arg-type]
        _dt(expires),
    )


class HybridKV(KVBackend):
    """Entries whose reads are served by Redis and whose truth is PostgreSQL.

    ``durable`` is the system of record (a ``PostgresStore``; any fleetmem store works, but the
    cache TTLs follow the server's clock only where the backend computes ``get_entries_ttl``
    on it: PostgresStore and the embedded stores do, a RedisStore used as the durable tier uses
    the application's clock for them) and
    ``cache`` a ``RedisStore`` whose client is used for the cache (its own entries are not
    touched). Options: ``cache_ttl`` (seconds a cached value lives at most), ``cache_deadline``
    (seconds a cache call may take before the read falls back to the durable store),
    ``allow_stale_reads`` (serve cache hits while the durable store is known to be down),
    ``breaker_threshold`` / ``breaker_cooldown`` (consecutive cache failures that open the
    circuit breaker, and how long it stays open before one probe), ``lease_ttl``,
    ``trust_window`` (seconds a process trusts the cache after it last confirmed the
    namespace's epoch in PostgreSQL; also what the first write that cannot reach Redis waits
    before it is acknowledged; see ``_missed_invalidation`` and docs/backends/hybrid.md).
    """

    backend_name = "hybrid"
    #: Concurrent get/get_entry/exists/set/delete beyond this many in flight are merged: one
    #: read.lua over the batch, one PostgreSQL statement, one fill, one DEL.
    coalesce_max_inflight = 4

    def __init__(
        self,
        durable: KVBackend,
        cache: RedisKV,
        *,
        namespace: str | None = None,
        cache_ttl: float = 300.0,
        cache_deadline: float = 0.25,
        allow_stale_reads: bool = False,
        breaker_threshold: int = 2,
        breaker_cooldown: float = 1.0,
        lease_ttl: float = 5.0,
        trust_window: float = 0.5,
    ) -> None:
        super().__init__(namespace=namespace if namespace is not None else durable.namespace)
        for name, value in (
            ("cache_ttl", cache_ttl),
            ("cache_deadline", cache_deadline),
            ("breaker_cooldown", breaker_cooldown),
            ("lease_ttl", lease_ttl),
            ("trust_window", trust_window),
        ):
            check_positive_number(name, value)
        if not isinstance(durable, KVBackend):
            raise ConfigurationError("durable must be a fleetmem store's backend (store.kv)")
        if not isinstance(cache, RedisKV):
            raise ConfigurationError("cache must be a RedisStore")
        self._durable_root = durable
        self._cache = cache
        # Used as a cache, Redis may evict: a lost copy is a miss, a lost epoch key is
        # published again, an evicted lease voids its fill (see cache_client_options).
        cache.connector.allow_eviction = True
        self._run_ids = cache.connector.track_run_ids()
        self._cache_ttl_ms = int(cache_ttl * 1000)
        self._deadline = float(cache_deadline)
        self._allow_stale = bool(allow_stale_reads)
        self._lease_ms = str(int(lease_ttl * 1000))
        self._trust_window = float(trust_window)
        # The bypass mark's life in PostgreSQL: long enough that a writer cut off from Redis
        # renews it rarely, short enough that readers use the cache again soon after.
        self._bypass_ttl = 10 * self._trust_window
        self._bypass_ttl_ms = validate_ttl(self._bypass_ttl)
        metrics = HybridMetrics()
        self._state = _Shared(
            metrics, _Breaker(max(1, breaker_threshold), breaker_cooldown, metrics)
        )
        self._bind_namespace()

    def _bind_namespace(self) -> None:
        ns = self._namespace
        self._durable = (
            self._durable_root
            if ns == self._durable_root.namespace
            else self._durable_root.view(ns)
        )
        self._epochs = self._durable_root.reserved_view(EPOCH_NAMESPACE)
        self._epoch_name = f"epoch/{ns}"
        self._bypass_name = f"bypass/{ns}"
        self._prefix = f"fmh:{{{ns}}}:k:"
        self._epoch_key = f"fmh:{{{ns}}}:E"
        self._run_id_key = f"fmh:{{{ns}}}:R"
        salt = f"-- fleetmem hybrid cache, namespace {ns}\n"
        self._read_src = salt + _READ_LUA
        self._fill_src = salt + _FILL_LUA
        self._read_sha = hashlib.sha1(self._read_src.encode(), usedforsecurity=False).hexdigest()
        # The hot path's constant arguments, encoded once.
        self._read_sha_b = self._read_sha.encode()
        self._epoch_key_b = self._epoch_key.encode()
        self._run_id_key_b = self._run_id_key.encode()
        self._prefix_b = self._prefix.encode()
        self._fill_sha = hashlib.sha1(self._fill_src.encode(), usedforsecurity=False).hexdigest()
        # _hit_or_lease's first command, packed once.
        self._hit_mget = pack_command((b"MGET", self._epoch_key_b, self._run_id_key_b))
        self._lease_ms_b = self._lease_ms.encode()

    def describe(self) -> str:
        return (
            f" durable=<{type(self._durable_root).__name__}{self._durable_root.describe()}>"
            f" cache=<{type(self._cache).__name__}{self._cache.describe()}>"
        )

    @property
    def metrics(self) -> HybridMetrics:
        """Hits, misses, fills, fallbacks, breaker state (shared by namespace views)."""
        return self._state.metrics

    @property
    def cache(self) -> RedisKV:
        """The cache tier's backend."""
        return self._cache

    @property
    def durable(self) -> KVBackend:
        """The durable backend, bound to this namespace."""
        return self._durable

    async def connect(self) -> None:
        await self._durable_root.connect()
        # Connecting is on no call's path: a busy host may answer one of the client's first
        # commands (a Cluster client sends several to each primary) later than the cache
        # deadline. A timeout is tried again within 3 s; a refusal degrades at once.
        give_up = time.monotonic() + max(self._deadline * 4, 3.0)
        while True:
            try:
                await asyncio.wait_for(self._cache.connect(), give_up - time.monotonic())
                break
            except ConfigurationError:
                # A cache URL that can never work (a database index the server does not have,
                # a bad option) is a mistake to report, not an outage to ride out.
                raise
            except Exception as exc:  # the cache is optional: degrade, never fail
                if _timed_out(exc) and time.monotonic() < give_up - self._deadline:
                    continue
                log.warning("hybrid cache unavailable at connect: %s: %s", type(exc).__name__, exc)
                self._state.breaker.failure()
                self._state.breaker.failure()
                break

    async def aclose(self) -> None:
        for future in list(self._state.confirming.values()):
            future.cancel()  # a background confirmation must not outlive the store
        if self._state.retiring:  # retiring copies of committed writes: let it finish
            await asyncio.wait(list(self._state.retiring), timeout=self._trust_window + 5)
        # The tiers are not this backend's to close: HybridStore closes the stores it made.

    # ------------------------------------------------------------------ cache plumbing

    async def _cache_call(self, *args: Any) -> Any:
        """One cache command under the breaker; raise _CacheFailed (or _NoScript) on trouble.

        The deadline is the cache client's socket timeouts (``from_urls`` sets them to
        ``cache_deadline``): no timer of our own on the hot path.
        """
        state = self._state
        breaker = state.breaker
        if breaker.state != "closed" and not breaker.allow():
            state.metrics.fallbacks += 1
            raise _CacheFailed
        try:
            result = await self._client().execute_command(*args)
        except _REDIS_ERRORS as exc:
            self._cache_failure(exc)
        if breaker.failures or breaker.state != "closed":
            breaker.success()
        return result

    def _cache_failure(self, exc: BaseException) -> NoReturn:
        """A cache command failed: raise _NoScript, or count the failure and raise _CacheFailed."""
        if _is_noscript(exc):
            raise _NoScript from exc
        state = self._state
        state.breaker.failure()
        state.metrics.cache_errors += 1
        state.metrics.fallbacks += 1
        raise _CacheFailed from exc

    def _client(self) -> Any:
        client = self._state.client
        if client is None:
            client = self._state.client = self._cache.connector.client
            if self._run_ids and not self._cache.connector.cluster:
                self._state.pool = client.connection_pool
        return client

    # ------------------------------------------------------------------ the trusted epoch

    async def _trust(self) -> _Trust:
        """This namespace's durable epoch as confirmed within ``trust_window``.

        Confirmed again in the background once 3/4 of the window have passed, inline once it has
        all passed. PostgreSQL unreachable: ``BackendUnavailableError``, or with
        ``allow_stale_reads`` the last epoch known (marked stale) so that cache hits are served.
        """
        trust = self._state.trust.get(self._namespace)
        now = time.monotonic()
        if trust is not None and now < trust.until:
            if now >= trust.refresh_at and self._namespace not in self._state.confirming:
                self._confirm(now)  # ahead of time, without waiting for it
            return trust
        try:
            # Only a confirmation still valid at ``now`` will do: one sent long ago (a
            # background refresh whose answer is late) may predate a write acknowledged since.
            while True:
                confirmed = await asyncio.shield(self._confirm(now))
                if confirmed.until > now:
                    return confirmed
        except BackendUnavailableError:
            if not self._allow_stale or trust is None:
                raise
            # Serve the cache as it is, and ask PostgreSQL again only a window later.
            trust.stale = True
            trust.until = trust.refresh_at = time.monotonic() + self._trust_window
            return trust

    def _confirm(self, now: float) -> asyncio.Future[_Trust]:
        """Read the durable epoch and bypass mark (single flight per namespace: a read sent
        within the last window is joined, an older one is not)."""
        state = self._state
        ns = self._namespace
        future = state.confirming.get(ns)
        if future is None or state.confirm_sent[ns] + self._trust_window <= now:
            state.confirm_sent[ns] = time.monotonic()
            future = state.confirming[ns] = asyncio.ensure_future(self._read_trust())

            def done(f: asyncio.Future[_Trust]) -> None:
                if state.confirming.get(ns) is f:
                    del state.confirming[ns]
                if not f.cancelled():
                    f.exception()  # a refresh nobody waited for must not warn

            future.add_done_callback(done)
        return future

    async def _read_trust(self) -> _Trust:
        """One PostgreSQL read of the namespace's epoch and bypass mark (one statement: one
        snapshot, so a reader that sees a writer's bumped epoch also sees its bypass mark)."""
        sent = time.monotonic()
        found = await self._durable_call(
            self._epochs.get_many([self._epoch_name, self._bypass_name])
        )
        self._state.metrics.epoch_confirmations += 1
        epoch = found.get(self._epoch_name, 0)
        window = self._trust_window
        seen = self._state.published.get(self._namespace)
        trust = _Trust(
            epoch,
            seen[1] if seen is not None and seen[0] == epoch else f"{epoch}|".encode(),
            self._bypass_name in found,
            sent + window,
            sent + window * 0.75,
        )
        known = self._state.trust.get(self._namespace)
        if known is None or known.stale or known.until <= trust.until:
            self._state.trust[self._namespace] = trust
        return trust

    async def _sync(self) -> bool:
        """Make Redis publish this namespace's durable epoch, then (re)load its scripts; True if
        the cache can be used.

        ``epoch.lua`` publishes the durable epoch when it is ahead of the published one (or
        that is missing), and asks for a higher one when the published epoch is from before a
        restart of Redis or ahead of the durable one (a durable store restored or cleared): the
        durable epoch is then raised past it first. So the published epoch never goes
        backwards, never stays where it cannot be trusted, and PostgreSQL is written only when
        Redis restarted or outran the durable epoch. The epoch goes out before the scripts:
        until they are loaded every reader of this namespace gets NOSCRIPT and comes here too.
        Nothing is published while a writer holds the namespace's cache bypass, nor while the
        breaker is open.
        """
        state = self._state
        if state.breaker.blocked():
            return False
        try:
            trust = await self._read_trust()
            fresh = False
            for _attempt in range(5):
                if trust.bypass:
                    return False
                code, epoch, *published = await self._cache_call(
                    "EVAL",
                    _EPOCH_LUA,
                    2,
                    self._epoch_key,
                    self._run_id_key,
                    trust.epoch,
                    "1" if fresh else "0",
                    secrets.token_hex(8),
                )
                if int(code) != 2:
                    string = published[0]
                    self._published(
                        int(epoch), string.encode() if isinstance(string, str) else string
                    )
                    break
                # Raise the durable epoch past the published one, then confirm it again: a
                # writer may have marked a bypass meanwhile.
                bumped = await self._durable_call(
                    self._epochs.incr(
                        self._epoch_name, max(1, int(epoch) - trust.epoch), None, None
                    )
                )
                state.metrics.epoch_bumps += 1
                trust = await self._read_trust()
                fresh = trust.epoch >= bumped
            else:
                return False
            # "SCRIPT LOAD" as one name: a cluster client sends it to every primary.
            await self._cache_call("SCRIPT LOAD", self._read_src)
            await self._cache_call("SCRIPT LOAD", self._fill_src)
        except (_CacheFailed, _NoScript, BackendUnavailableError):
            return False
        state.dirty.discard(self._namespace)
        state.synced[self._namespace] = state.breaker.outages
        return True

    def _published(self, epoch: int, published: bytes) -> None:
        """Trust ``published`` (``b"<epoch>.<nonce>|"``, just seen published for the durable
        ``epoch`` confirmed by the caller) as the prefix of this namespace's live copies."""
        state = self._state
        state.published[self._namespace] = (epoch, published)
        trust = state.trust.get(self._namespace)
        if trust is not None and trust.epoch == epoch:
            trust.epoch_b = published

    def _needs_sync(self) -> bool:
        state = self._state
        seen = state.synced.get(self._namespace)
        if self._namespace in state.dirty:
            return True
        return seen is not None and seen != state.breaker.outages

    # ------------------------------------------------------------------ cache calls

    async def _cache_read(self, keys: list[str], token: str, trust: _Trust) -> list[Any]:
        """``read.lua`` over ``keys``; resync and retry once on NOSCRIPT or an epoch that is not
        the trusted one."""
        for attempt in range(2):
            if self._needs_sync():
                if not await self._sync():
                    raise _CacheFailed
                trust = await self._trust()
                if trust.bypass:
                    raise _CacheFailed
            try:
                result = await self._cache_call(
                    "EVALSHA",
                    self._read_sha,
                    len(keys) + 1,
                    self._epoch_key,
                    *[self._prefix + k for k in keys],
                    token,
                    self._lease_ms,
                    trust.epoch_b,
                )
            except _NoScript:
                self._state.dirty.add(self._namespace)
                continue
            if result == -1:
                self._state.dirty.add(self._namespace)
                if attempt == 0:
                    continue
                raise _CacheFailed
            self._state.synced.setdefault(self._namespace, self._state.breaker.outages)
            return [result] if len(keys) == 1 else list(result)
        raise _CacheFailed

    async def _cache_fill(
        self, token: str, epoch_b: bytes, bodies: list[tuple[str, bytes, int]]
    ) -> None:
        args: list[Any] = [token, epoch_b]
        for _key, body, px in bodies:
            args.extend((body, px))
        try:
            filled = await self._cache_call(
                "EVALSHA",
                self._fill_sha,
                len(bodies) + 1,
                self._epoch_key,
                *[self._prefix + k for k, _, _ in bodies],
                *args,
            )
        except (_CacheFailed, _NoScript):
            return  # the lease expires by itself
        metrics = self._state.metrics
        if isinstance(filled, int) and filled >= 0:
            metrics.fills += filled
            metrics.fills_voided += len(bodies) - filled
        else:
            metrics.fills_voided += len(bodies)

    def _cache_px(self, left_ms: int | None, started: float) -> int:
        """The cache TTL: the durable entry's remaining life as PostgreSQL measured it (on its
        own clock) less the time the read took, capped by cache_ttl."""
        px = self._cache_ttl_ms
        if left_ms is not None:
            elapsed_ms = (time.monotonic() - started) * 1000
            px = min(px, int(left_ms - elapsed_ms) - 1)
        return max(px, 0)

    async def _invalidate(self, keys: list[str]) -> None:
        """After a COMMIT: delete ``keys`` from the cache, or retire every cached value of the
        namespace before the write is acknowledged (``_missed_invalidation``)."""
        state = self._state
        try:
            for start in range(0, len(keys), _READ_CHUNK):
                chunk = keys[start : start + _READ_CHUNK]
                await self._cache_call("DEL", *[self._prefix + k for k in chunk])
            state.metrics.invalidations += len(keys)
        except (_CacheFailed, _NoScript):
            await self._missed_invalidation()
        finally:
            # Reads that started before the cache was cleaned must not be joined from now on.
            for key in keys:
                state.inflight.pop((self._namespace, key), None)

    async def _missed_invalidation(self) -> None:
        """A committed write could not delete its keys from Redis: make sure no process can
        read what they replaced before the write is acknowledged.

        The writer marks the namespace *bypassed* in PostgreSQL (a key with a time to live on
        PostgreSQL's clock, ten trust windows) and then bumps its durable epoch. A reader trusts
        its cache only while it has confirmed the durable epoch within ``trust_window``, and a
        confirmation that sees the bump also sees the mark (one statement), so after waiting
        out one window the writer knows every reader either reads PostgreSQL or has confirmed
        the bump. While the mark lives nobody reads, fills or publishes the namespace's cache;
        once it expires the first reader publishes the bumped epoch, which retires everything
        cached before. The writer renews the mark while it keeps missing invalidations, so only
        the first write of an outage waits (``trust_window``); the rest cost one PostgreSQL
        write per half mark lifetime. PostgreSQL unreachable too: ``OutcomeUnknownError`` (the
        write committed, but it cannot be acknowledged as coherent).
        """
        state = self._state
        ns = self._namespace
        state.metrics.invalidations_missed += 1
        state.dirty.add(ns)
        bypass = state.bypasses.get(ns)
        if bypass is None:
            bypass = state.bypasses[ns] = _Bypass()
        try:
            async with bypass.lock:
                held_until = bypass.valid_until
                if time.monotonic() >= held_until - self._bypass_ttl / 2:
                    sent = time.monotonic()
                    await self._epochs.set(
                        self._bypass_name, b"true", self._bypass_ttl_ms, None, False
                    )
                    # None held, or the renewal may have landed after the mark lapsed (a reader
                    # may have published and filled in between): retire the cache, then wait.
                    if time.monotonic() >= held_until:
                        await self._epochs.incr(self._epoch_name, 1, None, None)
                        state.metrics.epoch_bumps += 1
                        state.metrics.bypasses += 1
                        # 2% and 2 ms for the difference in clock rates between hosts.
                        bypass.ready_at = time.monotonic() + self._trust_window * 1.02 + 0.002
                    bypass.valid_until = sent + self._bypass_ttl * 0.9
        except BackendUnavailableError as exc:
            self._state.durable_down = True
            raise OutcomeUnknownError(
                "the write committed in PostgreSQL, but neither Redis nor PostgreSQL could be "
                "reached to retire the cached copy it replaced"
            ) from exc
        wait = bypass.ready_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _durable_call(self, coro: Awaitable[Any]) -> Any:
        """Await a durable call; note PostgreSQL failing (reads then go to it directly)."""
        try:
            result = await coro
        except BackendUnavailableError:
            self._state.durable_down = True
            raise
        self._state.durable_down = False
        return result

    # ------------------------------------------------------------------ reads

    async def _fetch_body(self, key: str) -> bytes:
        """The cached body of ``key``: from Redis, else from the durable store (single flight)."""
        state = self._state
        slot = (self._namespace, key)
        inflight = state.inflight
        start = next(_sequence)
        while True:
            flight = inflight.get(slot)
            if flight is None:
                break
            state.metrics.single_flight_joins += 1
            try:
                body = await asyncio.shield(flight.join())
            except _LeaderGone:
                continue  # the leading caller was cancelled: load again
            if flight.source > start:
                return body
            # Its request went out before this read began: load again (with the others).
        flight = inflight[slot] = _Flight()
        try:
            body = await self._load(key, flight)
        except BaseException as exc:
            flight.end(exc)
            raise
        else:
            flight.succeed(body)
            return body
        finally:
            if inflight.get(slot) is flight:
                del inflight[slot]

    async def _load(self, key: str, flight: _Flight) -> bytes:
        """One key: the cache read inline (the hot path), the shared paths for the rest."""
        state = self._state
        if state.durable_down and not self._allow_stale:
            # PostgreSQL failed lately: reads raise until it answers again (or succeed then).
            flight.source = next(_sequence)
            entry = await self._durable_call(self._durable.get_entry(key))
            return _body(entry)
        trust = state.trust.get(self._namespace)
        if trust is None or time.monotonic() >= trust.refresh_at:
            trust = await self._trust()
        if trust.bypass:
            flight.source = next(_sequence)
            body: bytes = await self._bypassed([key], key)
            return body
        token = _token()
        if state.breaker.state == "closed" and not self._needs_sync() and not trust.stale:
            client = self._client()
            flight.source = next(_sequence)
            try:
                if state.pool is not None:
                    item = await self._hit_or_lease(state.pool, key, token, trust.epoch_b)
                else:
                    item = await client.execute_command(
                        "EVALSHA",  # a str: a cluster client looks the name up
                        self._read_sha_b,
                        b"2",
                        self._epoch_key_b,
                        self._prefix_b + key.encode(),
                        token,
                        self._lease_ms,
                        trust.epoch_b,
                    )
            except _REDIS_ERRORS as exc:
                try:
                    self._cache_failure(exc)
                except _CacheFailed:
                    bodies = await self._read_bodies([key], {key: flight}, cache_failed=True)
                    return bodies[key]
                except _NoScript:
                    state.dirty.add(self._namespace)
            else:
                if state.breaker.failures:
                    state.breaker.success()
                if item == -1:
                    state.dirty.add(self._namespace)
                elif item is not None:  # an answer: the cached value, or a miss
                    if self._namespace not in state.synced:
                        state.synced[self._namespace] = state.breaker.outages
                    if isinstance(item, bytes):  # a hit
                        return self._hit(item, stale=False)
                    leased = {key} if item == 1 else set()  # 1: with the fill lease, 0: without
                    missing = await self._load_missing(
                        [key], leased, token, trust.epoch_b, {key: flight}
                    )
                    return missing[key]
        # The breaker is not closed, the namespace must resync, Redis lost the scripts or the
        # epoch, or the key holds a value of an older epoch: the general path handles each
        # (with this token, so that a lease the read above left is still this reader's).
        return (await self._read_bodies([key], {key: flight}, token=token))[key]

    async def _bypassed(self, keys: list[str], one: str | None = None) -> Any:
        """A read while a writer holds the namespace's cache bypass: PostgreSQL alone."""
        self._state.metrics.bypassed_reads += len(keys)
        entries = await self._durable_call(self._durable_entries(keys))
        if one is not None:
            return _body(entries.get(one))
        return {key: _body(entries.get(key)) for key in keys}

    async def _hit_or_lease(self, pool: Any, key: str, token: str, epoch_b: bytes) -> Any:
        """``read.lua``'s answer for one key in one round trip without a script.

        Two commands, sent in one write: ``MGET`` of the epoch and of the run_id of the server
        it was published on, and ``SET <key> L:<token> NX GET``, which returns the cached value
        or, when the key holds nothing, leaves this reader's lease (as ``read.lua`` would).
        A restart breaks every connection and this connection learned its server's run_id when
        it was made, so a run_id that differs means the epoch is from before a restart (-1:
        resync, as for a missing epoch or one that is not the trusted ``epoch_b``). None: let
        ``read.lua`` answer (a value of an older epoch is to be replaced by a lease; a run_id
        that cannot be compared).
        """
        conn = await pool.get_connection()
        try:
            run_id = getattr(conn, "fleetmem_run_id", None)
            if run_id is None:
                return None
            lease = (
                b"SET",
                self._prefix_b + key.encode(),
                b"L:" + token.encode(),
                b"NX",
                b"GET",
                b"PX",
                self._lease_ms_b,
            )
            await conn.send_packed_command(self._hit_mget + pack_command(lease), check_health=False)
            head = await conn.read_response()
            item = await conn.read_response()
        except BaseException:
            # A reply left unread would answer the connection's next command. redis-py drops
            # the connection when a read times out or is cancelled, but not after an error
            # reply to the first command, which leaves the second unread: drop it always.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)
        epoch, published_on = head
        if epoch != epoch_b:
            return -1
        if published_on != run_id:
            return -1 if published_on is not None else None
        if item is None:
            return 1
        if item.startswith(epoch):
            return item
        if item.startswith(b"L:"):
            return 0
        return None

    async def _fetch_bodies(self, keys: list[str]) -> dict[str, bytes]:
        """The bodies of ``keys`` (distinct), in single flight with every other read of this
        process: a key another read is loading is waited for, not read again, and the keys read
        here are waited for by the reads that come meanwhile."""
        state = self._state
        ns = self._namespace
        inflight = state.inflight
        start = next(_sequence)
        joined: dict[str, tuple[_Flight, asyncio.Future[bytes]]] = {}
        own: dict[str, _Flight] = {}
        for key in keys:
            flight = inflight.get((ns, key))
            if flight is None:
                own[key] = inflight[(ns, key)] = _Flight()
            else:
                joined[key] = (flight, flight.join())
        try:
            out = await self._read_bodies(list(own), own) if own else {}
        except BaseException as exc:
            for flight in own.values():
                flight.end(exc)
            raise
        else:
            for key, flight in own.items():
                flight.succeed(out[key])
        finally:
            for key, flight in own.items():
                if inflight.get((ns, key)) is flight:
                    del inflight[(ns, key)]
        again: list[str] = []
        for key, (flight, future) in joined.items():
            state.metrics.single_flight_joins += 1
            try:
                body = await asyncio.shield(future)
            except _LeaderGone:
                again.append(key)  # its reader was cancelled
                continue
            if flight.source > start:
                out[key] = body
            else:
                again.append(key)  # its request went out before this read began
        if again:
            out.update(await self._fetch_bodies(again))
        return out

    async def _read_bodies(
        self,
        keys: list[str],
        flights: dict[str, _Flight] | None = None,
        *,
        cache_failed: bool = False,
        token: str | None = None,
    ) -> dict[str, bytes]:
        """The cached bodies of ``keys`` (distinct): Redis first, misses from the durable store,
        filled back under the leases the read took. One cache round trip per 500 keys.
        ``flights``: the single-flight entries of these reads (their requests are numbered)."""
        state = self._state
        if state.durable_down and not self._allow_stale:
            _sent(flights, keys)
            entries = await self._durable_call(self._durable_entries(keys))
            return {key: _body(entries.get(key)) for key in keys}
        trust = await self._trust()
        if trust.stale:
            return await self._stale_bodies(keys, flights)
        if trust.bypass:
            _sent(flights, keys)
            bodies: dict[str, bytes] = await self._bypassed(keys)
            return bodies
        out: dict[str, bytes] = {}
        token = token if token is not None else _token()  # one per call: the keys are distinct
        for start in range(0, len(keys), _READ_CHUNK):
            chunk = keys[start : start + _READ_CHUNK]
            items: list[Any] = [None] * len(chunk)
            if not cache_failed:
                _sent(flights, chunk)
                with contextlib.suppress(_CacheFailed):
                    items = await self._cache_read(chunk, token, trust)
                    trust = state.trust.get(self._namespace, trust)  # a resync confirmed anew
            missing: list[str] = []
            leased: set[str] = set()
            for key, item in zip(chunk, items, strict=True):
                if isinstance(item, bytes):
                    out[key] = self._hit(item, trust.stale)
                else:
                    missing.append(key)
                    if item == 1:
                        leased.add(key)
            if missing:
                out.update(await self._load_missing(missing, leased, token, trust.epoch_b, flights))
        return out

    def _hit(self, item: bytes, stale: bool) -> bytes:
        """The body of a cached value ``item``, counted as a hit."""
        metrics = self._state.metrics
        body = _cached_body(item)
        if body == _NEGATIVE:
            metrics.negative_hits += 1
        else:
            metrics.hits += 1
        if stale:
            metrics.stale_reads += 1
        return body

    async def _stale_bodies(
        self, keys: list[str], flights: dict[str, _Flight] | None
    ) -> dict[str, bytes]:
        """PostgreSQL unreachable and ``allow_stale_reads``: what the cache holds under the
        epoch Redis publishes now, whatever this process last confirmed or owes (a missed
        invalidation, a bypass); misses read PostgreSQL, and raise while it is down."""
        out: dict[str, bytes] = {}
        try:
            published = await self._cache_call("GET", self._epoch_key)
        except (_CacheFailed, _NoScript):
            published = None
        token = _token()
        for start in range(0, len(keys), _READ_CHUNK):
            chunk = keys[start : start + _READ_CHUNK]
            items: list[Any] = [None] * len(chunk)
            if published is not None:
                _sent(flights, chunk)
                with contextlib.suppress(_CacheFailed, _NoScript):
                    result = await self._cache_call(
                        "EVAL",  # the source: its cached copy may be gone with a restart
                        self._read_src,
                        len(chunk) + 1,
                        self._epoch_key,
                        *[self._prefix + k for k in chunk],
                        token,
                        self._lease_ms,
                        published,
                    )
                    if result != -1:
                        items = [result] if len(chunk) == 1 else list(result)
            missing: list[str] = []
            for key, item in zip(chunk, items, strict=True):
                if isinstance(item, bytes):
                    out[key] = self._hit(item, stale=True)
                else:
                    missing.append(key)
            if missing:
                out.update(await self._load_missing(missing, set(), token, b"", flights))
        return out

    async def _load_missing(
        self,
        missing: list[str],
        leased: set[str],
        token: str,
        epoch_b: bytes,
        flights: dict[str, _Flight] | None,
    ) -> dict[str, bytes]:
        """Read ``missing`` from the durable store; fill the ``leased`` ones back (only under
        the epoch ``epoch_b`` the leases were taken under)."""
        metrics = self._state.metrics
        metrics.misses += len(missing)
        started = time.monotonic()
        _sent(flights, missing)
        found = await self._durable_call(self._durable.get_entries_ttl(missing))
        metrics.durable_reads += 1
        out: dict[str, bytes] = {}
        fills = []
        for key in missing:
            entry, left_ms = found.get(key, _ABSENT)
            body = out[key] = _body(entry)
            if key in leased:
                fills.append((key, body, self._cache_px(left_ms, started)))
        if fills:
            await self._cache_fill(token, epoch_b, fills)
        return out

    async def get(self, key: str) -> Any:
        return _body_value(await self._fetch_body(key))

    async def get_entry(self, key: str) -> Entry | None:
        return _body_entry(key, await self._fetch_body(key))

    async def exists(self, key: str) -> bool:
        return await self._fetch_body(key) != _NEGATIVE

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, body in (await self._fetch_bodies(keys)).items():
            if body != _NEGATIVE:
                out[key] = _body_value(body)
        return out

    async def get_entries(self, keys: list[str]) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for key, body in (await self._fetch_bodies(keys)).items():
            entry = _body_entry(key, body)
            if entry is not None:
                out[key] = entry
        return out

    async def _durable_entries(self, keys: list[str]) -> dict[str, Entry]:
        if len(keys) == 1:
            entry = await self._durable.get_entry(keys[0])
            return {} if entry is None else {keys[0]: entry}
        return await self._durable.get_entries(keys)

    async def ttl(self, key: str) -> float | None:
        return await self._durable_call(self._durable.ttl(key))  # type: ignore[no-any-return]

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        return await self._durable_call(  # type: ignore[no-any-return]
            self._durable.keys(prefix, partition, limit, after)
        )

    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        return await self._durable_call(  # type: ignore[no-any-return]
            self._durable.search(pattern, partition, limit)
        )

    async def partitions(self) -> list[str]:
        return await self._durable_call(self._durable.partitions())  # type: ignore[no-any-return]

    async def namespaces(self, prefix: str, limit: int | None, after: str | None) -> list[str]:
        # The durable tier is the truth (the cache holds copies and epochs, not namespaces).
        return await self._durable_call(  # type: ignore[no-any-return]
            self._durable.namespaces(prefix, limit, after)
        )

    async def stats(self) -> StoreStats:
        durable: StoreStats = await self._durable_call(self._durable.stats())
        return StoreStats(
            namespace=durable.namespace,
            keys=durable.keys,
            partitions=durable.partitions,
            expired_pending=durable.expired_pending,
            bytes=durable.bytes,
            backend=self.backend_name,
        )

    async def health(self) -> dict[str, Any]:
        durable = await health_report(self._durable)
        details: dict[str, Any] = {
            "ok": durable.ok,
            "durable": {"ok": durable.ok, "latency_ms": durable.latency_ms, **durable.details},
            "metrics": self._state.metrics.snapshot(),
        }
        start = time.perf_counter()
        try:
            async with _timeout(self._deadline):
                await self._cache.connector.client.ping()
            details["cache"] = {
                "ok": True,
                "latency_ms": (time.perf_counter() - start) * 1000,
                "breaker": self._state.breaker.state,
            }
        except Exception as exc:
            details["cache"] = {
                "ok": False,
                "error": type(exc).__name__,
                "breaker": self._state.breaker.state,
            }
            details["degraded"] = "cache unavailable: reads are served by PostgreSQL"
        return details

    # ------------------------------------------------------------------ writes

    async def _write(
        self, call: Awaitable[_T], keys: list[str] | None, retire: Callable[[_T], bool] = _always
    ) -> _T:
        """Run a durable write, then retire the cached copies it replaced: of ``keys``, or every
        copy of the namespace (``None``). ``retire(result)`` says whether the write changed
        anything. A write whose outcome is unknown (it may have committed), or whose caller is
        cancelled once it was sent, retires them too: the retiring runs in a task of its own
        that no cancellation interrupts, so a write that committed is always retired."""
        try:
            result: _T = await self._durable_call(call)
        except (OutcomeUnknownError, asyncio.CancelledError):
            self._retiring(keys)
            raise
        if retire(result):
            await asyncio.shield(self._retiring(keys))
        return result

    def _retiring(self, keys: list[str] | None) -> asyncio.Future[None]:
        """The retiring of ``keys`` (None: the whole namespace) as a task held by the store."""
        if keys is not None and not keys:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future
        return self._retiring_task(self._invalidate(keys) if keys else self._retire_all())

    def _retiring_task(self, retire: Awaitable[None]) -> asyncio.Future[None]:
        """``retire`` as a task held by the store (``aclose`` waits for it), its failure
        logged if nobody awaits it."""
        task = asyncio.ensure_future(retire)
        tasks = self._state.retiring
        tasks.add(task)

        def done(t: asyncio.Future[None]) -> None:
            tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("could not retire cached copies: %r", t.exception())

        task.add_done_callback(done)
        return task

    async def _retire_all(self) -> None:
        """Too many keys to name: a new epoch retires every cached value of the namespace. The
        bump first, then the publish: a reader that confirms the new durable epoch sees the
        published one behind it and resyncs before it reads the cache."""
        try:
            await self._durable_call(self._epochs.incr(self._epoch_name, 1, None, None))
            self._state.metrics.epoch_bumps += 1
            if not await self._sync():
                await self._missed_invalidation()
        finally:
            for slot in [slot for slot in self._state.inflight if slot[0] == self._namespace]:
                self._state.inflight.pop(slot, None)

    # Fenced writes: the durable tier checks the fence atomically with the write (PostgreSQL:
    # one statement or transaction), and the protocol around it is the unfenced one. A refused
    # write (LeaseLostError) changed nothing in the durable store, so ``_write`` lets it pass
    # without retiring anything: no DEL, no bypass, no epoch bump, nothing counted. Copies and
    # fills in flight stay right, since the durable entry they hold is still the truth. The
    # fence goes down only when given, as Store does: an unfenced write makes the same call as
    # before fences existed (on a durable backend that predates them too).

    async def set(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence | None = None,
    ) -> EntryMeta:
        durable = self._durable
        if fence is None:
            return await self._write(durable.set(key, payload, ttl_ms, partition, keep_ttl), [key])
        return await self._write(
            durable.set(key, payload, ttl_ms, partition, keep_ttl, fence), [key]
        )

    async def set_batch(self, ops: list[SetOp]) -> list[EntryMeta | BaseException]:
        try:
            results: list[EntryMeta | BaseException] = await self._durable_call(
                self._durable.set_batch(ops)
            )
        except (OutcomeUnknownError, asyncio.CancelledError):
            self._retiring([op.key for op in ops])
            raise
        written = [
            op.key for op, r in zip(ops, results, strict=True) if not isinstance(r, BaseException)
        ]
        await asyncio.shield(self._retiring(written))
        return results

    async def delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        return await self._write(self._durable.delete_batch(keys), keys)

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int:
        """Retire every key the durable store took, also after a failure (the chunks sent
        may have committed), except after a refused fence: the chunk refused is the last one
        the durable store took (a check is of a chunk it holds), and nothing of it changed;
        the chunks before it may have been written and are retired. (A durable store that
        writes all chunks in one transaction changed nothing at all: the keys of the chunks
        before the last are retired all the same, which costs a DEL and can never be stale.)"""
        written: list[str] = []
        last = 0  # where the keys of the last chunk taken start in ``written``

        def recorded() -> Iterator[list[tuple[str, bytes]]]:
            nonlocal last
            for chunk in chunks:
                last = len(written)
                written.extend(k for k, _ in chunk)
                yield chunk

        durable = self._durable
        try:
            count: int = await self._durable_call(
                durable.set_many(recorded(), ttl_ms, partition)
                if fence is None
                else durable.set_many(recorded(), ttl_ms, partition, fence)
            )
        except LeaseLostError:
            del written[last:]  # refused: that chunk changed nothing
            raise
        finally:
            # Also after a failure: the chunks sent may have committed.
            await asyncio.shield(self._retiring(written))
        return count

    async def set_if_absent(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> bool:
        durable = self._durable
        return await self._write(
            durable.set_if_absent(key, payload, ttl_ms, partition)
            if fence is None
            else durable.set_if_absent(key, payload, ttl_ms, partition, fence),
            [key],
            bool,
        )

    async def compare_and_set(
        self,
        key: str,
        payload: bytes,
        version: int,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> EntryMeta:
        durable = self._durable
        return await self._write(
            durable.compare_and_set(key, payload, version, ttl_ms, partition)
            if fence is None
            else durable.compare_and_set(key, payload, version, ttl_ms, partition, fence),
            [key],
        )

    async def incr(
        self,
        key: str,
        amount: int | float,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int | float:
        durable = self._durable
        return await self._write(
            durable.incr(key, amount, ttl_ms, partition)
            if fence is None
            else durable.incr(key, amount, ttl_ms, partition, fence),
            [key],
        )

    async def delete(self, key: str, fence: Fence | None = None) -> bool:
        durable = self._durable
        return await self._write(
            durable.delete(key) if fence is None else durable.delete(key, fence), [key]
        )

    async def delete_many(self, keys: list[str], fence: Fence | None = None) -> int:
        durable = self._durable
        return await self._write(
            durable.delete_many(keys) if fence is None else durable.delete_many(keys, fence),
            keys,
        )

    async def expire(self, key: str, ttl_ms: int | None, version: int | None = None) -> bool:
        return await self._write(self._durable.expire(key, ttl_ms, version), [key], bool)

    async def clear(self, partition: str | None) -> int:
        if partition is not None:
            return await self._write(self._durable.clear(partition), None)
        try:
            count: int = await self._durable_call(self._durable.clear(None))
        except (OutcomeUnknownError, asyncio.CancelledError):
            self._retiring(None)  # it may have committed: retire every copy, as for a write
            raise
        # In a task of its own, like any retiring: a cancelled caller does not stop it.
        await asyncio.shield(self._retiring_task(self._remove_cleared()))
        return count

    async def _remove_cleared(self) -> None:
        """After ``clear()`` committed: retire every cached copy of the namespace and remove
        everything of it from Redis -- its published epoch, its run_id, every ``fmh:{<ns>}:*``
        copy and lease -- without letting any process read a copy from before the clear.

        1. Delete the published epoch and its run_id (``E``, ``R``). From here no copy or lease
           from before the clear can be read or filled, ever: both need the published string to
           equal theirs, and the next publication must first raise the durable epoch (a missing
           ``E`` with no run_id is never re-published at the same number: ``epoch.lua`` answers
           "raise it first") and carries a new nonce. A reader still trusting the old string
           misses, resyncs and reads PostgreSQL.
        2. Delete every ``fmh:{<ns>}:k:*`` key with ``SCAN``: only to free the memory.

        The durable epoch row (``_fleetmem.hybrid/epoch/<ns>``, one row, in
        a reserved namespace that no listing, ``stats()`` or ``namespaces()`` shows) is kept: it
        is the namespace's coherence high-water mark and must outlive the data. Deleting it
        let the number start again at 1, and a later bump (``clear_partition``, a write that
        missed its invalidation) could then land on a number another process had just
        published, be taken as already published, and retire nothing: the writes of those
        paths were acknowledged while copies they replaced stayed readable.

        Failures: Redis failing at step 1 takes the bypass of a missed invalidation, as any
        write that cannot reach Redis does, so ``clear()`` returns only once no process can
        read a copy from before it. Redis failing at step 2 leaves dead copies, which can never
        be read; they stay until they expire or the next ``clear()`` removes them.
        """
        state = self._state
        ns = self._namespace
        state.dirty.add(ns)  # this process resyncs before it reads the cache again
        try:
            try:
                await self._cache_call("DEL", self._epoch_key, self._run_id_key)
            except (_CacheFailed, _NoScript):
                await self._missed_invalidation()
                return
            with contextlib.suppress(_CacheFailed, _NoScript):
                await self._delete_copies()
        finally:
            for slot in [slot for slot in state.inflight if slot[0] == ns]:
                state.inflight.pop(slot, None)

    async def _delete_copies(self) -> None:
        """Delete every ``fmh:{<ns>}:k:*`` key: ``SCAN`` (on a Cluster, of the one node that
        holds the namespace's slot), ``DEL`` a page at a time."""
        state = self._state
        breaker = state.breaker
        if breaker.state != "closed" and not breaker.allow():
            raise _CacheFailed
        client = self._client()
        options: dict[str, Any] = {}
        if self._cache.connector.cluster:
            options["target_nodes"] = client.get_node_from_key(self._epoch_key)
        pattern = self._prefix + "*"
        cursor: Any = 0
        try:
            while True:
                reply = await client.execute_command(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", 1000, **options
                )
                cursor, found = reply
                if isinstance(cursor, dict):  # a Cluster client: {node name: cursor}
                    (cursor,) = cursor.values()
                if found:
                    await client.execute_command("DEL", *found)
                if int(cursor) == 0:
                    return
        except _REDIS_ERRORS as exc:
            self._cache_failure(exc)

    async def cleanup_expired(self) -> int:
        return await self._durable_call(  # type: ignore[no-any-return]
            self._durable.cleanup_expired()
        )

    # ------------------------------------------------------------------ portability
    # Export reads the durable tier; imports write through it and retire the cache as every
    # other write does. With PostgreSQL as the durable tier (what HybridStore is built for)
    # an export is one snapshot and a replace one transaction; the two flags below say so.

    #: The export is the durable tier's (PostgreSQL: one ``REPEATABLE READ`` snapshot); the
    #: cache is neither read nor filled by it.
    export_consistency: ClassVar[str] = "snapshot"
    #: ``import_replace`` is the durable tier's one transaction (PostgreSQL), followed by the
    #: retiring of the namespace's cache as ``clear()`` retires it.
    replace_is_atomic: ClassVar[bool] = True

    async def server_time(self) -> datetime:
        """The durable tier's clock (PostgreSQL's ``now()``): it judges every expiry here --
        an import's, a read's -- the cache only holds copies of what it decided."""
        return await self._durable_call(self._durable.server_time())  # type: ignore[no-any-return]

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """The durable tier's export pages (its consistency: PostgreSQL's snapshot), read from
        PostgreSQL alone: the cache holds copies of the truth, not the truth."""
        pages = self._durable.export_pages(prefix, partition, page_size)
        try:
            async with contextlib.aclosing(pages):
                async for page in pages:
                    yield page
        except BackendUnavailableError:
            self._state.durable_down = True
            raise

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        """The durable tier's ``import_batch`` (PostgreSQL: one statement, which records the
        changes in its feed), then the cached copies of the batch's keys are retired as
        ``set_batch`` retires them: deleted from Redis after the COMMIT, or, when Redis cannot
        be reached, the namespace bypassed and its epoch bumped before this returns (see
        ``_missed_invalidation``). So once it returns no process reads a value the import
        replaced, and it works while Redis is down.

        Every key of the batch is retired, the skipped ones too: the tally does not name the
        keys written, and retiring a key the import left alone costs a miss, never a stale
        read. Nothing is retired when nothing was written. A failure retires them all the
        same, in a task no cancellation stops: part of the batch may have been written (an
        outcome unknown, a cancelled caller, a durable tier that writes key by key)."""
        keys = [op.key for op in ops]
        try:
            tally: ImportTally = await self._durable_call(
                self._durable.import_batch(ops, missing_only)
            )
        except BaseException:
            self._retiring(keys)
            raise
        if tally.written:
            await asyncio.shield(self._retiring(keys))
        return tally

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        """The durable tier's ``import_replace`` -- on PostgreSQL one transaction: no reader of
        PostgreSQL sees the namespace half replaced, and a failure changes nothing -- then the
        namespace's cache is retired as ``clear()`` retires it (``_remove_cleared``): the
        published epoch is deleted first, then every copy and lease.

        While the transaction runs, readers keep reading (and filling the cache with) the
        namespace as it was, which is the truth until the COMMIT; every such copy carries the
        published epoch of its lease, and a fill is applied only while that epoch is still the
        published one (``fill.lua``). Deleting the published epoch after the COMMIT therefore
        kills every copy taken before it, and voids every fill still in flight from a read of
        the old rows: the next publication must raise the durable epoch first and carries a
        new nonce, and a lease taken under it is taken after the COMMIT, so its read of
        PostgreSQL sees the replaced namespace. Redis unreachable at that step: the bypass of
        a missed invalidation, as for any write. So once this returns no process reads a value
        from before the replace.

        A failure retires every copy of the namespace too (a new epoch), in a task of its own:
        a COMMIT whose outcome is unknown, or a cancelled caller, may have replaced it. A
        durable tier whose replace is not atomic (not PostgreSQL) gets the seam's page-by-page
        replace through this backend's :meth:`import_batch` and ``delete_batch``, each
        retiring the keys it wrote."""
        durable = self._durable
        if not durable.replace_is_atomic:
            return await super().import_replace(pages)
        try:
            tally: ImportTally = await self._durable_call(durable.import_replace(pages))
        except BaseException:
            self._retiring(None)
            raise
        await asyncio.shield(self._retiring_task(self._remove_cleared()))
        return tally

    # ------------------------------------------------------------------ coordination

    def leases(self) -> LeaseBackend:
        """The durable tier's leases of this namespace (PostgreSQL's: its table, its clock,
        its ``LISTEN``/``NOTIFY`` wake-ups). Redis carries nothing of them: a lease is never
        cached, so its guarantees are PostgreSQL's, and a fence the durable tier checks is
        the one it granted."""
        return self._durable.leases()

    def agents(self) -> AgentBackend:
        """The durable tier's agent registry of this namespace (PostgreSQL's; never cached)."""
        return self._durable.agents()

    def queues(self) -> QueueBackend:
        """The durable tier's work queues of this namespace (PostgreSQL's: its tables, its
        clock, its ``LISTEN``/``NOTIFY`` wake-ups). Redis carries nothing of them: a job is
        never cached, so an acknowledged ``put`` is a committed PostgreSQL transaction and a
        Redis outage does not touch the queues."""
        return self._durable.queues()

    def changes(self) -> ChangeBackend:
        """The durable tier's change feed of this namespace (PostgreSQL's): every write
        reaches PostgreSQL, which records it in the write's own statement."""
        return self._durable.changes()

    def snapshots(self) -> SnapshotBackend:
        """The durable tier's snapshots of this namespace (PostgreSQL's: its tables, its
        transactions, its clock). Redis carries nothing of them: a snapshot reads and stores
        the truth, and a restore goes through this backend's own ``import_replace``, which
        retires the namespace's cached copies."""
        return self._durable.snapshots()


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` or one of its causes is a timeout (not a refusal)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if (
            isinstance(seen, (TimeoutError, asyncio.TimeoutError))
            or "Timeout" in type(seen).__name__
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_noscript(exc: BaseException) -> bool:
    return isinstance(exc, NoScriptError) or "NOSCRIPT" in str(exc)


def cache_client_options(deadline: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    options: dict[str, Any] = dict(extra or {})
    # A cache may evict: a lost copy is a miss, a lost epoch key is published again, and an
    # evicted lease voids its fill. (volatile-lru keeps the epoch keys, which have no TTL.)
    options.setdefault("allow_eviction", True)
    options.setdefault("timeout", deadline)
    options.setdefault("socket_timeout", deadline)
    options.setdefault("connect_timeout", deadline)
    return options


if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10

    @contextlib.asynccontextmanager
    async def _timeout(seconds: float) -> AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        handle = asyncio.get_running_loop().call_later(seconds, task.cancel)
        try:
            yield
        except asyncio.CancelledError as exc:
            raise asyncio.TimeoutError from exc
        finally:
            handle.cancel()
