"""The typed seam between fleetmem's validating front end and its backends.

:class:`fleetmem.store.Store` validates and encodes every argument once, before any I/O, then
calls a :class:`KVBackend`: the key-value primitive of one technology, bound to one namespace.
Every method here receives arguments that are already valid:

* keys and partitions are valid ``str``; ``partition=None`` means "keep the entry's partition,
  ``default`` for a new one";
* values arrive as ``payload`` -- the compact UTF-8 JSON from :func:`fleetmem._codec.encode_value`;
* TTLs arrive as whole milliseconds (``ttl_ms``), ``None`` for no expiry;
* ``limit`` is ``None`` or an ``int`` > 0 (``limit=0`` never reaches a backend).

Methods return decoded values (backends decode with :func:`fleetmem._codec.decode_value`) and
raise fleetmem errors only: each technology translates its driver's exceptions at one choke
point, its connector.

This interface is public: a backend built on other backends (the hybrid) calls theirs through
it and nothing else, and a third-party backend implements it and runs
``fleetmem.testing.conformance`` to prove it keeps the contract.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Container, Iterator
from datetime import datetime, timezone
from typing import Any, ClassVar, NamedTuple, TypeVar

from fleetmem._notify import Notifier, Watch
from fleetmem._validate import GlobPattern
from fleetmem.errors import (
    AgentGoneError,
    ChangesExpiredError,
    ChangesNotEnabledError,
    ConfigurationError,
    InvalidArgumentError,
    LeaseLostError,
    SnapshotExistsError,
    SnapshotNotFoundError,
)
from fleetmem.protocol import Agent, Entry, Health, Job, JobResult, Lease, QueueStats, StoreStats

__all__ = [
    "DEFAULT_JOB_LEASE",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RESULT_TTL",
    "MISSING",
    "RESERVED_NAMESPACE_PREFIX",
    "AgentBackend",
    "ChangeBackend",
    "ChangeEvent",
    "ChangePage",
    "EntryMeta",
    "Fence",
    "ImportOp",
    "ImportTally",
    "KVBackend",
    "LeaseBackend",
    "NewJob",
    "QueueBackend",
    "SetOp",
    "SnapshotBackend",
    "SnapshotRow",
    "agent_gone",
    "backoff_ms",
    "decode_cursor",
    "encode_cursor",
    "health_report",
    "job_lost",
    "lease_lost",
    "record_bytes",
    "rendered_pages",
    "snapshot_exists",
    "snapshot_not_found",
]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: Returned by :meth:`KVBackend.get` for a missing or expired key.
MISSING: Any = _Missing()

_K = TypeVar("_K", bound="KVBackend")

#: Namespaces beginning with this hold fleetmem's own state (the hybrid tier's epochs): no store
#: can be opened on one (:func:`fleetmem.store.user_namespace`), so nothing a user does
#: (``clear()``, a restore of one namespace, a listing) can reach that state.
RESERVED_NAMESPACE_PREFIX = "_fleetmem"


class EntryMeta(NamedTuple):
    """The metadata of an entry a write produced (``Entry`` without key and value)."""

    partition: str
    version: int
    created_at: Any  # datetime (tz-aware UTC)
    updated_at: Any
    expires_at: Any  # datetime | None


class SetOp(NamedTuple):
    """One ``set`` call, validated and encoded, as a batch method receives it."""

    key: str
    payload: bytes
    ttl_ms: int | None
    partition: str | None
    keep_ttl: bool


class ImportOp(NamedTuple):
    """One entry of an import, verified and encoded: written with its partition and absolute
    expiry; its version and timestamps follow the target's write rules."""

    key: str
    payload: bytes
    partition: str
    expires_at: datetime | None  # tz-aware UTC; None: persistent


class ImportTally(NamedTuple):
    """What an import call did: entries written, skipped because their expiry had passed,
    skipped because the key had a live entry (``missing_only``)."""

    written: int
    expired: int
    existing: int


class Fence(NamedTuple):
    """A fenced write's condition: lease ``name`` of the backend's namespace must be live and
    hold ``token`` when the write is applied, checked atomically with it on the server's clock.
    Otherwise the backend raises :func:`lease_lost` and changes nothing."""

    name: str
    token: int


def lease_lost(name: str, token: int) -> LeaseLostError:
    """The error every backend raises for a lease (or a fence) that is no longer held."""
    return LeaseLostError(
        f"lease {name!r} is no longer held with token {token}: it expired, was released or "
        "was taken by another holder; nothing was changed"
    )


async def rendered_pages(
    pages: AsyncGenerator[list[Entry], None], render: Callable[[Entry], bytes]
) -> AsyncGenerator[tuple[list[str], bytearray], None]:
    """Pages of entries as :meth:`KVBackend.export_lines` gives them: per non-empty page, its
    keys and its entries' lines, each ``render(entry)`` (``pages`` closed with this
    iterator). Each line is appended as soon as it is made: an orjson result keeps its whole
    output buffer, and holding a page of them (``b"".join`` makes a list first) costs ten
    times as much in page faults."""
    async with contextlib.aclosing(pages):
        async for page in pages:
            if not page:
                continue
            blob = bytearray()
            for entry in page:
                blob += render(entry)
            yield [entry.key for entry in page], blob


class KVBackend(abc.ABC):
    """The key-value primitive of one technology, bound to one namespace.

    A backend object is cheap to copy: :meth:`view` gives one bound to another namespace that
    shares this one's connector (pool, client, file), so views never open connections.
    """

    #: The name ``Store.backend`` reports (``memory``, ``sqlite``, ``postgres``, ...).
    backend_name: ClassVar[str] = "base"
    #: Concurrent single-key calls beyond this many in flight are merged into batches (see
    #: ``fleetmem._coalesce``); ``None`` turns merging off. A backend sets it when its batch
    #: methods (``get_many``, ``get_entries``, ``set_batch``, ``delete_batch``) do one round
    #: trip per batch.
    coalesce_max_inflight: ClassVar[int | None] = None
    #: The same for set/delete (``None``: as for reads). A backend whose write batches each
    #: wait for a commit may want a few more of them in flight than read batches.
    coalesce_max_inflight_writes: ClassVar[int | None] = None

    def __init__(self, *, namespace: str) -> None:
        self._namespace = namespace

    @property
    def namespace(self) -> str:
        return self._namespace

    def view(self: _K, namespace: str) -> _K:
        """This backend bound to ``namespace`` (already validated), sharing its connector."""
        other = copy.copy(self)
        other._namespace = namespace
        other._bind_namespace()
        return other

    def reserved_view(self: _K, namespace: str) -> _K:
        """A view on one of fleetmem's own namespaces (``_fleetmem...``), which no store can
        be opened on: the hybrid tier keeps its epochs there."""
        if not namespace.startswith(RESERVED_NAMESPACE_PREFIX):
            raise ValueError(f"{namespace!r} is not a reserved namespace")
        return self.view(namespace)

    def _bind_namespace(self) -> None:  # noqa: B027 - an optional hook
        """Recompute namespace-dependent state after :meth:`view` (for subclasses)."""

    def describe(self) -> str:
        """Extra text for the store's ``repr`` (never a password)."""
        return ""

    async def connect(self) -> None:  # noqa: B027 - embedded backends have nothing to open
        """Open connections and check the schema. Idempotent."""

    # ---------------------------------------------------------------- key-value

    @abc.abstractmethod
    async def get(self, key: str) -> Any:
        """The decoded live value of ``key``, or :data:`MISSING`."""

    @abc.abstractmethod
    async def get_entry(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        """Live values of ``keys`` (distinct); any order, missing keys omitted."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds left; raise ``KeyNotFoundError`` for a missing or expired key."""

    @abc.abstractmethod
    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]: ...

    @abc.abstractmethod
    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        """Live entries matching ``pattern`` (which has a wildcard), ascending by key."""

    @abc.abstractmethod
    async def partitions(self) -> list[str]: ...

    @abc.abstractmethod
    async def namespaces(self, prefix: str, limit: int | None, after: str | None) -> list[str]:
        """Names of the namespaces reachable through this backend's connector (its table,
        database, file, dicts) holding a live entry, ascending, starting with ``prefix``, above
        ``after`` when given, at most ``limit``; never one beginning with
        :data:`RESERVED_NAMESPACE_PREFIX`. Answered from an index, never by reading every
        entry. ``prefix`` is ``""`` or a valid namespace that is not reserved, ``after`` a
        valid namespace or ``None``."""

    @abc.abstractmethod
    async def stats(self) -> StoreStats: ...

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]:
        """Check the backend; return details (an ``ok`` item set to False marks it unhealthy)."""

    @abc.abstractmethod
    async def set(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence | None = None,
    ) -> EntryMeta:
        """Every write takes ``fence``: when given, the write is applied only if that lease
        is live and holds that token, checked atomically with the write (one statement or
        transaction, one script); otherwise raise :func:`lease_lost` and change nothing. A
        fence is checked before anything else the write could raise. ``Store`` passes
        ``fence`` only when the caller gave one, so a backend written before fences existed
        still serves every unfenced write."""

    @abc.abstractmethod
    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int:
        """Write every chunk (keys distinct within the whole call); return the count. With a
        fence, every chunk is written under it (a chunk whose check fails raises; chunks
        written before it stay, as for any other failure of a multi-chunk ``set_many``)."""

    @abc.abstractmethod
    async def set_if_absent(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> bool: ...

    @abc.abstractmethod
    async def compare_and_set(
        self,
        key: str,
        payload: bytes,
        version: int,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> EntryMeta:
        """Raise ``VersionConflictError(key, version, current)`` on a mismatch (a lost fence
        wins over a version conflict)."""

    @abc.abstractmethod
    async def incr(
        self,
        key: str,
        amount: int | float,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int | float: ...

    @abc.abstractmethod
    async def delete(self, key: str, fence: Fence | None = None) -> bool: ...

    @abc.abstractmethod
    async def delete_many(self, keys: list[str], fence: Fence | None = None) -> int: ...

    @abc.abstractmethod
    async def expire(self, key: str, ttl_ms: int | None, version: int | None = None) -> bool:
        """Set (``ttl_ms``) or remove (``None``) the expiry of a live key; with ``version``,
        only while the live entry's version is ``version`` (atomically: a write that lands
        first makes it a no-op returning ``False``)."""

    @abc.abstractmethod
    async def clear(self, partition: str | None) -> int:
        """Delete the namespace's entries (of ``partition`` when given); count the live ones."""

    @abc.abstractmethod
    async def cleanup_expired(self) -> int: ...

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what this backend created (never an injected client or pool). Called once,
        on the store that is not a view."""

    # ---------------------------------------------------------------- coordination

    def leases(self) -> LeaseBackend:
        """The lease primitive of this technology, bound to this namespace and sharing this
        backend's connector (and its fence checks)."""
        raise ConfigurationError(f"the {self.backend_name} backend has no leases")

    def agents(self) -> AgentBackend:
        """The agent registry of this technology, bound to this namespace."""
        raise ConfigurationError(f"the {self.backend_name} backend has no agent registry")

    def queues(self) -> QueueBackend:
        """The work queues of this technology, bound to this namespace."""
        raise ConfigurationError(f"the {self.backend_name} backend has no work queues")

    def changes(self) -> ChangeBackend:
        """The change feed of this technology, bound to this namespace."""
        raise ConfigurationError(f"the {self.backend_name} backend has no change feed")

    def snapshots(self) -> SnapshotBackend:
        """The snapshots of this technology, bound to this namespace."""
        raise ConfigurationError(f"the {self.backend_name} backend has no snapshots")

    # ---------------------------------------------------------------- portability
    # Export and import (``fleetmem.portability``). The defaults are correct on any backend
    # through the methods above; a technology overrides them for a consistent view, fewer
    # round trips, or one transaction.

    #: ``"snapshot"`` when :meth:`export_pages` reads one consistent point-in-time view,
    #: ``"per-entry"`` when each entry is exact but writes during the export may or may not
    #: be in it (the default below, and Redis).
    export_consistency: ClassVar[str] = "per-entry"
    #: True when :meth:`import_replace` is one transaction (nobody sees a half-replaced
    #: namespace, and a failure changes nothing).
    replace_is_atomic: ClassVar[bool] = False

    async def server_time(self) -> datetime:
        """Now (tz-aware UTC) on the clock that judges this backend's expiry: the server's
        where there is one. An import skips, and a copy's verification excuses, entries whose
        expiry has passed on this clock, not the caller's. The default is the local clock,
        which is the right one for embedded backends (memory, SQLite)."""
        return datetime.now(timezone.utc)

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """The live entries whose key starts with ``prefix`` (of ``partition`` when given),
        ascending by key (``str`` order, i.e. by code point), in pages of at most
        ``page_size`` (> 0). The caller closes the iterator (``contextlib.aclosing``) when it
        stops early, so a backend may hold a transaction open while it runs: an override is an
        async generator too, annotated ``-> AsyncGenerator[list[Entry], None]``.

        The default pages through :meth:`keys` and :meth:`get_entries` (``per-entry``)."""
        after: str | None = None
        while True:
            keys = await self.keys(prefix, partition, page_size, after)
            if not keys:
                return
            found = await self.get_entries(keys)
            page = [found[k] for k in keys if k in found]
            if page:
                yield page
            if len(keys) < page_size:
                return
            after = keys[-1]

    async def entries_page(self, prefix: str, after: str | None, limit: int) -> list[Entry]:
        """At most ``limit`` (> 0) live entries whose key starts with ``prefix`` and is above
        ``after`` (exclusive; ``None``: from the start), ascending by key: one page of a
        keyset walk that holds nothing between pages (each page is its own read, so a walk
        of several pages is not one instant, unlike :meth:`export_pages`).

        A page shorter than ``limit`` is the end of the range: a walk stops at the first one.

        The default reads :meth:`keys` then :meth:`get_entries`; a key deleted or expired in
        between is left out and the page is filled up from the keys after it, so that it
        comes back short only at the end. A technology that can answer in one statement
        overrides it."""
        out: list[Entry] = []
        cursor = after
        while len(out) < limit:
            want = limit - len(out)
            keys = await self.keys(prefix, None, want, cursor)
            if not keys:
                break
            found = await self.get_entries(keys)
            out.extend(found[k] for k in keys if k in found)
            if len(keys) < want:
                break
            cursor = keys[-1]
        return out

    async def export_lines(
        self, prefix: str, partition: str | None, page_size: int, render: Callable[[Entry], bytes]
    ) -> AsyncGenerator[tuple[list[str], bytearray], None]:
        """The entries of :meth:`export_pages` as export lines: per page, its keys (ascending)
        and the lines of its entries, each ``render(entry)``, one after the other (the
        caller checks the order, and closes the iterator with ``contextlib.aclosing`` as for
        :meth:`export_pages`).

        A technology may override it to go from what its server answers to the lines without
        building an :class:`~fleetmem.protocol.Entry` per entry; the bytes must then be
        exactly ``render``'s for every entry (it may call ``render`` for the entries it does
        not write itself). The default renders :meth:`export_pages` (:func:`rendered_pages`)."""
        pages = rendered_pages(self.export_pages(prefix, partition, page_size), render)
        async with contextlib.aclosing(pages):
            async for item in pages:
                yield item

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        """Write ``ops`` (distinct keys): each entry's value, partition and absolute expiry,
        as a ``set`` would (versions and timestamps follow the write rules; the change feed
        records each write). An op whose ``expires_at`` has passed on this backend's clock is
        skipped and counted ``expired`` (nothing is written for it); with ``missing_only``, an
        op whose key has a live entry is skipped and counted ``existing``.

        The default computes each TTL on the local clock and writes one key at a time."""
        now = datetime.now(timezone.utc)
        written = expired = existing = 0
        for op in ops:
            ttl_ms: int | None = None
            if op.expires_at is not None:
                ttl_ms = int((op.expires_at - now).total_seconds() * 1000)
                if ttl_ms <= 0:
                    expired += 1
                    continue
            if missing_only:
                if await self.set_if_absent(op.key, op.payload, ttl_ms, op.partition):
                    written += 1
                else:
                    existing += 1
            else:
                await self.set(op.key, op.payload, ttl_ms, op.partition, False)
                written += 1
        return ImportTally(written, expired, existing)

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        """Make the namespace hold exactly the entries of ``pages`` (ascending by key within
        and across pages): write each (as :meth:`import_batch` without ``missing_only``) and
        delete every other key -- also a key whose op has expired (counted ``expired``).

        The default is not atomic (:attr:`replace_is_atomic` False): it writes page by page and
        deletes, between a page's first and last key, the keys not in it (a merge with
        :meth:`keys`), then every key after the last page, holding one page of keys at a time.
        A technology with transactions overrides it with one."""
        total = ImportTally(0, 0, 0)
        previous: str | None = None
        async for page in pages:
            if not page:
                continue
            tally = await self.import_batch(page, False)
            total = ImportTally(
                total.written + tally.written, total.expired + tally.expired, total.existing
            )
            # An op skipped as expired leaves its key to be deleted too: keep only the keys
            # that were written, i.e. whose expiry is still ahead after the batch.
            now = datetime.now(timezone.utc)
            keep = {op.key for op in page if op.expires_at is None or op.expires_at > now}
            await self._delete_between(previous, page[-1].key, keep)
            previous = page[-1].key
        await self._delete_between(previous, None, ())
        return total

    async def _delete_between(
        self, after: str | None, upto: str | None, keep: Container[str]
    ) -> None:
        """Delete every key above ``after`` up to ``upto`` (inclusive; ``None``: no end) that
        is not in ``keep``, a page of keys at a time."""
        cursor = after
        while True:
            keys = await self.keys("", None, 1000, cursor)
            doomed = [k for k in keys if (upto is None or k <= upto) and k not in keep]
            if doomed:
                await self.delete_batch(doomed)
            if len(keys) < 1000 or (upto is not None and keys[-1] >= upto):
                return
            cursor = keys[-1]

    # ---------------------------------------------------------------- batches
    # Used to merge concurrent single-key calls. The defaults are correct but make one call per
    # item; a backend that sets ``coalesce_max_inflight`` overrides them with one round trip.

    async def get_entries(self, keys: list[str]) -> dict[str, Entry]:
        """Live entries of ``keys`` (distinct); missing keys omitted."""
        out: dict[str, Entry] = {}
        for key in keys:
            entry = await self.get_entry(key)
            if entry is not None:
                out[key] = entry
        return out

    async def get_entries_ttl(self, keys: list[str]) -> dict[str, tuple[Entry, int | None]]:
        """Live entries of ``keys`` (distinct) with their remaining life in milliseconds
        measured **on the server's clock** (None: persistent); missing keys omitted.

        A cache in front of this store (``HybridStore``) sizes its TTLs with it. The default
        reads the local clock, which is the server's clock only for embedded stores (memory,
        SQLite); a store with a server of its own overrides it and computes the remaining life
        where the expiry is measured.
        """
        entries = await self.get_entries(keys)
        now = datetime.now(timezone.utc)
        out: dict[str, tuple[Entry, int | None]] = {}
        for key, entry in entries.items():
            left = None
            if entry.expires_at is not None:
                left = max(0, int((entry.expires_at - now).total_seconds() * 1000))
            out[key] = (entry, left)
        return out

    async def set_batch(self, ops: list[SetOp]) -> list[EntryMeta | BaseException]:
        """Apply ``ops`` (distinct keys), each exactly as ``set`` would; one result per op."""
        out: list[EntryMeta | BaseException] = []
        for op in ops:
            try:
                out.append(await self.set_op(op))
            except Exception as exc:
                out.append(exc)
        return out

    async def delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        """Delete ``keys`` (distinct); for each, whether a live entry existed."""
        out: list[bool | BaseException] = []
        for key in keys:
            try:
                out.append(await self.delete(key))
            except Exception as exc:
                out.append(exc)
        return out

    async def set_op(self, op: SetOp) -> EntryMeta:
        return await self.set(op.key, op.payload, op.ttl_ms, op.partition, op.keep_ttl)

    # Merged reads may repeat a key; the hooks above take distinct keys.

    async def get_batch(self, keys: list[str]) -> list[Any]:
        found = await self.get_many(list(dict.fromkeys(keys)))
        return [found.get(key, MISSING) for key in keys]

    async def get_entry_batch(self, keys: list[str]) -> list[Entry | None]:
        found = await self.get_entries(list(dict.fromkeys(keys)))
        return [found.get(key) for key in keys]

    async def exists_batch(self, keys: list[str]) -> list[bool]:
        found = await self.get_entries(list(dict.fromkeys(keys)))
        return [key in found for key in keys]


class LeaseBackend(abc.ABC):
    """Named leases with fencing tokens, bound to one namespace (see ``COORDINATION.md``).

    Arguments arrive valid: names follow the key rules, ``owner`` is 1-255 bytes, TTLs are
    whole milliseconds > 0. Times are the server's clock. A lease record outlives its lease:
    the last token of a name is kept so that the next grant gets a greater one.
    """

    #: Seconds between two tries of a waiting ``acquire`` when no notification comes (a
    #: release in another process normally wakes it through :meth:`watch`).
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, *, namespace: str, notifier: Notifier) -> None:
        self._namespace = namespace
        self._notifier = notifier

    @property
    def namespace(self) -> str:
        return self._namespace

    @abc.abstractmethod
    async def acquire(self, name: str, owner: str, ttl_ms: int) -> tuple[Lease | None, int | None]:
        """Grant ``name`` to ``owner`` if no live lease exists: ``(lease, None)`` with a token
        greater than every earlier one; otherwise ``(None, ms)`` where ``ms`` is the current
        lease's remaining life on the server's clock (a waiter sleeps at most that long)."""

    @abc.abstractmethod
    async def renew(self, name: str, token: int, ttl_ms: int | None) -> Lease:
        """Extend the live lease ``name`` holding ``token`` by ``ttl_ms`` (``None``: the TTL it
        was last granted or renewed with); raise :func:`lease_lost` otherwise."""

    @abc.abstractmethod
    async def release(self, name: str, token: int) -> bool:
        """Free the live lease ``name`` if it holds ``token`` (and wake waiters); ``False``
        otherwise, changing nothing."""

    @abc.abstractmethod
    async def holder(self, name: str) -> Lease | None:
        """The live lease of ``name``, or ``None``."""

    async def listen(self) -> None:  # noqa: B027 - embedded backends wake waiters directly
        """Make sure releases made by other processes reach :attr:`_notifier` (start a
        ``LISTEN`` or a subscription once per connector). Idempotent."""

    @contextlib.asynccontextmanager
    async def watch(self, name: str) -> AsyncIterator[Watch]:
        """Watch ``name`` for releases; enter it *before* trying, so none is missed."""
        await self.listen()
        with self._notifier.watch((self._namespace, name)) as w:
            yield w


class AgentBackend(abc.ABC):
    """The agent registry of one namespace (see ``COORDINATION.md``).

    Arguments arrive valid: ids follow the key rules, ``info`` is the encoded JSON of a dict,
    TTLs are whole milliseconds. An agent is live until ``expires_at`` on the server's clock;
    the record of a gone agent keeps its generation so the next ``register`` gets a greater one.
    """

    def __init__(self, *, namespace: str) -> None:
        self._namespace = namespace

    @property
    def namespace(self) -> str:
        return self._namespace

    @abc.abstractmethod
    async def register(self, agent_id: str, info: bytes, ttl_ms: int) -> Agent:
        """Live agent: replace info and TTL, keep ``registered_at`` and ``generation``. Absent
        or expired: create it with a generation greater than any earlier one of that id."""

    @abc.abstractmethod
    async def heartbeat(self, agent_id: str, ttl_ms: int | None, info: bytes | None) -> Agent:
        """Extend a live agent by ``ttl_ms`` (``None``: its last TTL), replacing ``info`` when
        given; raise ``AgentGoneError`` for an absent or expired one, changing nothing."""

    @abc.abstractmethod
    async def deregister(self, agent_id: str) -> bool:
        """Remove a live agent (its generation is kept); ``True`` if it was live."""

    @abc.abstractmethod
    async def get(self, agent_id: str) -> Agent | None: ...

    @abc.abstractmethod
    async def list(self, prefix: str, limit: int | None, after: str | None) -> list[Agent]:
        """Live agents whose id starts with ``prefix``, above ``after``, ascending by id."""

    @abc.abstractmethod
    async def count(self) -> int: ...


def agent_gone(agent_id: str) -> AgentGoneError:
    """The error every backend raises for a heartbeat of an agent that is not live."""
    return AgentGoneError(
        f"agent {agent_id!r} is not registered (never registered, deregistered or expired); "
        "register it again"
    )


#: Claims of a job before it goes to the dead letter, when ``put`` does not say.
DEFAULT_MAX_ATTEMPTS = 5
#: The lease of a claim when none is given, in seconds.
DEFAULT_JOB_LEASE = 30.0
#: How long an ``ack``'s result is held when none is given, in seconds (one day).
DEFAULT_RESULT_TTL = 86400.0


class NewJob(NamedTuple):
    """A job to enqueue, validated and encoded by the front end."""

    payload: bytes  #: compact UTF-8 JSON (:func:`fleetmem._codec.encode_value`)
    priority: int  #: signed 32 bits; higher is claimed first
    delay_ms: int  #: >= 0; the job is not ready before ``now + delay_ms`` (server clock)
    max_attempts: int  #: 1 .. 2**31 - 1
    dedupe_key: str | None  #: key rules; ``None``: no deduplication


def job_lost(queue: str, job_id: str, token: int) -> LeaseLostError:
    """The error every backend raises when ``extend`` finds its claim superseded or gone."""
    return LeaseLostError(
        f"job {job_id!r} of queue {queue!r} is no longer claimed with token {token}: another "
        "claim superseded it, or it was finished, dead-lettered or cancelled; nothing was changed"
    )


def backoff_ms(attempts: int, jitter: float) -> int:
    """The default retry delay after ``attempts`` claims: ``min(2 ** (attempts - 1), 3600)``
    seconds plus ``jitter`` (0 .. 0.1) of it, in whole milliseconds."""
    base = min(2 ** min(max(attempts - 1, 0), 12), 3600)  # 2**12 > 3600: no huge power
    return int(base * (1.0 + jitter) * 1000)


class QueueBackend(abc.ABC):
    """The work queues of one namespace (see ``COORDINATION.md``, "Work queues").

    Arguments arrive valid: queue names follow the key rules (at most 255 bytes), consumers and
    dedupe keys the key rules, job ids are 16 lowercase hex digits, durations are whole
    milliseconds (``lease_ms`` > 0, others >= 0), payloads and results are encoded JSON. Times
    are the server's clock.

    A job's **effective state** at time ``now`` is what every method must report, whatever the
    stored record says (a record may only move at the next claim or sweep):

    * ``ready`` -- waiting and ``ready_at <= now``; or claimed with ``lease_expires_at <= now``
      and ``attempts < max_attempts`` (it is ready again, ordered as if ``ready_at`` were its
      lease's expiry);
    * ``delayed`` -- waiting and ``ready_at > now``;
    * ``claimed`` -- claimed and ``lease_expires_at > now``;
    * ``dead`` -- dead-lettered; or claimed with ``lease_expires_at <= now`` and
      ``attempts >= max_attempts`` (dead since its lease expired: ``finished_at`` is that time);
    * ``done`` -- acked, while its result is held (``result_ttl``); afterwards the job is gone
      (its id is never reused).

    Claim order: higher ``priority`` first, then earlier ``ready_at``, then earlier put (lower
    id). A claim increments ``attempts`` and ``token`` (``token`` never resets, ``attempts``
    resets to 0 on ``retry_dead``).

    A **claim holds** (for ``ack``, ``nack``, ``extend``) while the stored job is claimed with
    that ``token`` and is not dead (an expired lease is fine as long as nobody claimed it since
    and attempts remain).
    """

    #: Seconds between the tries of a waiting ``claim`` or ``result`` when no notification comes.
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, *, namespace: str, notifier: Notifier) -> None:
        self._namespace = namespace
        self._notifier = notifier

    @property
    def namespace(self) -> str:
        return self._namespace

    def claim_key(self, queue: str) -> tuple[str, str, str]:
        """The :class:`Notifier` key of ``queue``'s claim waiters in this namespace."""
        return ("queue", self._namespace, queue)

    def result_key(self, job_id: str) -> tuple[str, str, str]:
        """The :class:`Notifier` key of the waiters of ``job_id``'s result."""
        return ("result", self._namespace, job_id)

    @abc.abstractmethod
    async def put(self, queue: str, jobs: list[NewJob]) -> list[str]:
        """Enqueue ``jobs`` (one or more) atomically and durably, in order: their ids, in order.
        A job whose ``dedupe_key`` is held by a ready, delayed or claimed job of ``queue``
        enqueues nothing and gets that job's id. Wakes claim waiters (this process and others)."""

    @abc.abstractmethod
    async def claim(
        self, queue: str, consumer: str, lease_ms: int, limit: int
    ) -> tuple[list[Job], int | None]:
        """Claim up to ``limit`` (>= 1) ready jobs in claim order; with them, when fewer than
        ``limit`` were claimed, the milliseconds until the next job of ``queue`` becomes ready
        (a delayed one, or a live lease that may expire), ``None`` if nothing is pending. A job
        whose lease expired on its last attempt is moved to the dead letter, never returned."""

    @abc.abstractmethod
    async def extend(self, queue: str, job_id: str, token: int, lease_ms: int) -> Job:
        """If the claim holds: its lease now ends ``lease_ms`` from now; the updated job.
        Otherwise raise :func:`job_lost`, changing nothing."""

    @abc.abstractmethod
    async def ack(
        self, queue: str, job_id: str, token: int, result: bytes, result_ttl_ms: int
    ) -> bool:
        """If the claim holds: the job is done, ``result`` held for ``result_ttl_ms``, its
        dedupe key free, result waiters woken; ``True``. Otherwise ``False``, nothing changed."""

    @abc.abstractmethod
    async def nack(
        self, queue: str, job_id: str, token: int, retry_in_ms: int, error: str | None
    ) -> bool:
        """If the claim holds: record ``error`` as ``last_error``; the job is ready again
        ``retry_in_ms`` from now, or dead (result waiters woken) when its attempts reached
        ``max_attempts``; ``True``. Otherwise ``False``, nothing changed."""

    @abc.abstractmethod
    async def cancel(self, queue: str, job_id: str) -> bool:
        """Remove the job if it is ready or delayed right now: ``True``. Otherwise ``False``."""

    @abc.abstractmethod
    async def result(self, queue: str, job_id: str) -> JobResult | None:
        """The job's :class:`JobResult` if it is done (result still held) or dead; else ``None``."""

    @abc.abstractmethod
    async def stats(self, queue: str) -> QueueStats: ...

    @abc.abstractmethod
    async def dead(self, queue: str, limit: int, after: str | None) -> list[Job]:
        """Dead jobs of ``queue`` with an id above ``after``, ascending by id, at most ``limit``."""

    @abc.abstractmethod
    async def retry_dead(self, queue: str, ids: list[str] | None) -> int:
        """Move dead jobs (all, or those of ``ids``) back to ready now, attempts reset to 0: how
        many moved. A dead job whose dedupe key another ready, delayed or claimed job holds
        stays dead (retrying it would run that work twice)."""

    @abc.abstractmethod
    async def purge_dead(self, queue: str) -> int:
        """Remove every dead job of ``queue``: how many."""

    @abc.abstractmethod
    async def list_queues(self) -> list[str]:
        """Names of this namespace's queues holding a job or a held result, ascending."""

    async def listen(self) -> None:  # noqa: B027 - embedded backends wake waiters directly
        """Make sure puts and acks made by other processes reach :attr:`_notifier`. Idempotent."""

    async def await_result(self, queue: str, job_id: str) -> None:  # noqa: B027 - optional
        """Called once before a ``result(wait=...)`` starts waiting: a backend that notifies
        acks only of awaited jobs marks ``job_id`` here."""

    @contextlib.contextmanager
    def watch(self, key: tuple[str, str, str]) -> Iterator[Watch]:
        """Watch a :meth:`claim_key` or :meth:`result_key`; enter it *before* trying."""
        with self._notifier.watch(key) as w:
            yield w


#: Change ops, as ``Change.op`` reports them.
CHANGE_OPS = ("set", "delete", "ttl", "clear")


class ChangeEvent(NamedTuple):
    """One change as a backend returns it: ``pos`` orders the namespace's feed within one
    epoch (strictly increasing, not necessarily gapless); the rest is ``fleetmem.Change``
    without its cursor (``value`` decoded; ``None`` but for ``set``)."""

    pos: int
    op: str
    key: str | None
    partition: str | None
    version: int | None
    value: Any
    expires_at: datetime | None
    at: datetime


class ChangePage(NamedTuple):
    """What :meth:`ChangeBackend.read` returns: ``events`` in feed order, and ``last``, the
    position the reader is at afterwards -- the last event's ``pos``, or when there is none
    the ``after`` it was given (``after=None``: the position just before the oldest retained
    change, which is the head when the feed is empty)."""

    epoch: int
    events: list[ChangeEvent]
    last: int


#: Hex digits of the namespace tag, the epoch and the position in a cursor.
_TAG_DIGITS, _EPOCH_DIGITS, _POS_DIGITS = 10, 16, 20
_CURSOR_LEN = _TAG_DIGITS + _EPOCH_DIGITS + _POS_DIGITS + 2
_HEX = frozenset("0123456789abcdef")


def _namespace_tag(namespace: str) -> str:
    import hashlib

    return hashlib.blake2b(namespace.encode(), digest_size=8).hexdigest()[:_TAG_DIGITS]


def encode_cursor(namespace: str, epoch: int, pos: int) -> str:
    """The cursor string of position ``pos`` of ``namespace``'s feed in ``epoch``.

    ``<tag>-<epoch>-<pos>`` in fixed-width lowercase hex, so that the cursors of one namespace
    sort as ``str`` in feed order (an epoch begins with each ``enable()`` after a
    ``disable()``); the tag (a hash of the namespace) lets a cursor of another namespace be
    told apart."""
    return f"{_namespace_tag(namespace)}-{epoch:0{_EPOCH_DIGITS}x}-{pos:0{_POS_DIGITS}x}"


def decode_cursor(namespace: str, cursor: object) -> tuple[int, int]:
    """``(epoch, pos)`` of a cursor of ``namespace``; ``InvalidArgumentError`` for anything
    else (not a ``str``, garbage, a cursor of another namespace), before any I/O."""
    if not isinstance(cursor, str):
        raise InvalidArgumentError(
            f"a change cursor must be a str returned by fleetmem, not {type(cursor).__name__}"
        )
    if (
        len(cursor) != _CURSOR_LEN
        or cursor[_TAG_DIGITS] != "-"
        or cursor[_TAG_DIGITS + 1 + _EPOCH_DIGITS] != "-"
        or not _HEX.issuperset(cursor.replace("-", ""))
    ):
        raise InvalidArgumentError(f"{cursor[:80]!r} is not a change cursor")
    if cursor[:_TAG_DIGITS] != _namespace_tag(namespace):
        raise InvalidArgumentError(
            f"change cursor {cursor!r} belongs to another namespace than {namespace!r}"
        )
    epoch = int(cursor[_TAG_DIGITS + 1 : _TAG_DIGITS + 1 + _EPOCH_DIGITS], 16)
    pos = int(cursor[-_POS_DIGITS:], 16)
    return epoch, pos


class ChangeBackend(abc.ABC):
    """The change feed of one namespace (see ``CHANGES.md``).

    **Recording** is done by the technology's :class:`KVBackend` writes, not here: each write
    of a namespace whose feed is enabled (a server-side flag: writers that never called
    :meth:`enable` record too) records its changes in the same statement, transaction or script
    as the write, with op ``set`` (set, each key of set_many/set_batch, set_if_absent that
    wrote, compare_and_set, incr), ``delete`` (each *live* key deleted), ``ttl`` (expire/persist
    of a live key; the version is unchanged) or ``clear`` (clear/clear_partition that removed
    at least one live entry; ``partition`` is the cleared one or ``None``). A write that changes
    nothing records nothing; ``cleanup_expired`` and expiry record nothing.

    **Positions**: within one epoch (a new epoch starts with each ``enable`` of a disabled
    feed), ``pos`` values are integers >= 1 that strictly increase in the order the writes took
    effect -- for one key the versions increase -- and a reader never sees a position appear
    below one it has already been given (lossless). Position 0 is "before everything".

    Arguments arrive valid: ``retention_ms`` > 0, ``limit`` in 1..10,000, ``epoch``/``after``
    decoded from a cursor of this namespace (which may still be stale or forged: the backend
    checks it against its state).
    """

    #: Seconds a :meth:`wait` sleeps at most when no notification comes (the fallback poll).
    poll_interval: ClassVar[float] = 1.0

    def __init__(self, *, namespace: str, notifier: Notifier) -> None:
        self._namespace = namespace
        self._notifier = notifier

    @property
    def namespace(self) -> str:
        return self._namespace

    def wake_key(self) -> tuple[str, str]:
        """The :class:`Notifier` key of this namespace's waiting watchers."""
        return ("changes", self._namespace)

    def cursor(self, epoch: int, pos: int) -> str:
        return encode_cursor(self._namespace, epoch, pos)

    def not_enabled(self) -> ChangesNotEnabledError:
        return ChangesNotEnabledError(
            f"the change feed of namespace {self._namespace!r} is not enabled: call "
            "store.changes.enable() first"
        )

    def expired(self, epoch: int, oldest: int) -> ChangesExpiredError:
        """The error for a cursor whose successors are gone; ``oldest`` is the position just
        before the oldest retained change of ``epoch`` (the current one)."""
        return ChangesExpiredError(self.cursor(epoch, oldest))

    def check_after(
        self, epoch: int, after: int, current_epoch: int, floor: int, head: int
    ) -> None:
        """The common checks of a read from ``(epoch, after)`` against the feed's state
        (``floor``: the position just before the oldest retained change; ``head``: the newest
        position handed out): a cursor of an older epoch or below ``floor`` is expired, one of
        a newer epoch or past ``head`` is not one this feed gave."""
        if epoch < current_epoch or (epoch == current_epoch and after < floor):
            raise self.expired(current_epoch, floor)
        if epoch > current_epoch or after > head:
            raise InvalidArgumentError(
                f"change cursor {self.cursor(epoch, after)!r} was not given by the feed of "
                f"namespace {self._namespace!r}"
            )

    @abc.abstractmethod
    async def enable(self, retention_ms: int) -> None:
        """Start recording (or, when enabled, only set the retention). Idempotent."""

    @abc.abstractmethod
    async def disable(self) -> None:
        """Stop recording and drop the log; nothing when not enabled. The next ``enable``
        starts a new, greater epoch (so every older cursor is expired)."""

    @abc.abstractmethod
    async def enabled(self) -> bool: ...

    @abc.abstractmethod
    async def head(self) -> tuple[int, int]:
        """``(epoch, pos)`` of the newest change recorded (``pos`` is the floor when none is
        retained). ``ChangesNotEnabledError`` when not enabled."""

    @abc.abstractmethod
    async def read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        """Up to ``limit`` changes after ``(epoch, after)`` in feed order (``after=None``:
        from the oldest retained; ``epoch`` is then ``None``). Trims what is past retention
        first. Raises ``ChangesNotEnabledError``; :meth:`expired` for a cursor of an older
        epoch or whose successors were trimmed; ``InvalidArgumentError`` for one it never gave
        (:meth:`check_after` does the three)."""

    async def listen(self) -> None:  # noqa: B027 - embedded backends wake watchers directly
        """Make sure changes recorded by other processes reach :attr:`_notifier` (or that
        :meth:`wait` otherwise learns of them). Idempotent; raises only what connecting does."""

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watch]:
        """Watch :meth:`wake_key`; enter it *before* reading, then :meth:`wait`."""
        with self._notifier.watch(self.wake_key()) as w:
            yield w

    async def wait(self, watch: Watch, epoch: int, after: int, timeout: float) -> None:
        """Return when a change after ``(epoch, after)`` may exist, or after ``timeout``
        seconds. ``watch`` was entered before the read that found nothing more, so a wake-up in
        between is not lost. The default waits for the watch; backends whose other processes
        cannot wake it (no notification) poll instead."""
        await watch.wait(timeout)


class SnapshotRow(NamedTuple):
    """A snapshot as its catalog holds it. ``seq`` orders the namespace's snapshots by
    creation (greater is newer); it is the backend's, never shown to users."""

    name: str
    seq: int
    created_at: datetime  # tz-aware UTC, the backend's clock
    keys: int
    bytes: int


#: The bytes a snapshot record counts beyond its key, value and partition (its version, three
#: timestamps, two sequence numbers): a round figure for :attr:`SnapshotRow.bytes`.
RECORD_OVERHEAD = 48


def record_bytes(key: str, payload_len: int, partition: str) -> int:
    """The bytes a snapshot record counts in :attr:`SnapshotRow.bytes`: its key and
    partition (UTF-8), its value's compact JSON length ``payload_len``, and
    :data:`RECORD_OVERHEAD`. Every technology counts the same way, so the figure is
    comparable across backends."""
    return len(key.encode()) + payload_len + len(partition.encode()) + RECORD_OVERHEAD


def snapshot_exists(namespace: str, name: str) -> SnapshotExistsError:
    return SnapshotExistsError(f"namespace {namespace!r} already has a snapshot {name!r}")


def snapshot_not_found(namespace: str, name: str) -> SnapshotNotFoundError:
    return SnapshotNotFoundError(f"namespace {namespace!r} has no snapshot {name!r}")


class SnapshotBackend(abc.ABC):
    """The named snapshots of one namespace (``PORTABILITY.md``, "Snapshots"), stored in the
    technology itself next to -- never among -- the namespace's entries: no ``keys``,
    ``search``, ``stats``, ``namespaces``, export, ``clear`` or change feed sees them.

    **Storage is incremental.** A snapshot has a sequence number ``seq`` (1, 2, ... per
    namespace; greater is newer). Entries are kept as *records* ``(key, from_seq, to_seq,
    value, partition, version, created_at, updated_at, expires_at)``; the snapshot ``s`` holds
    the records with ``from_seq <= s`` and (``to_seq`` NULL or ``s < to_seq``). Records whose
    ``to_seq`` is NULL are *open*: they hold the newest snapshot's entries.

    * :meth:`create` ``s = newest + 1``: take the namespace's live entries at one instant (the
      consistency of :meth:`KVBackend.export_pages`); close (``to_seq = s``) every open record
      whose key is no longer live or whose live entry differs in any field (value, partition,
      version, created_at, updated_at, expires_at); insert a record ``from_seq = s`` for every
      live entry without an equal open record; then write the catalog row (``keys`` = live
      entries, ``bytes`` = the sum of :func:`record_bytes` over the inserted records). A second
      snapshot after 1% of the entries changed therefore stores about 1% more.
    * :meth:`delete` of ``s``, with ``p`` the greatest remaining seq below it (0 if none) and
      ``n`` the least above it (none if ``s`` was the newest): delete the records held by
      ``s`` that neither ``p`` nor ``n`` holds (``p < from_seq`` and, when ``n`` exists,
      ``to_seq <= n``); remove the catalog row; when ``s`` was the newest, reopen
      (``to_seq = NULL``) every record with ``to_seq > p`` -- closed at ``s``, or at a seq
      deleted earlier, which the next create will reuse: each record left is held by a
      remaining snapshot, so such a record is held by ``p``, the newest now. What another
      snapshot holds is never freed.
    * Creates and deletes of one namespace are serialised (across processes for durable
      backends); each is atomic where the technology has transactions. A technology without
      them makes every later :meth:`create` repair what a crashed one left: before it starts,
      records with ``from_seq`` above the newest catalog seq are deleted and ``to_seq`` above
      it reset to NULL (neither is visible to any snapshot meanwhile).

    Names arrive valid (the key rules). The front end (:class:`fleetmem.snapshots.Snapshots`)
    builds ``diff``, ``restore`` and exports by name on :meth:`pages`."""

    def __init__(self, *, namespace: str) -> None:
        self._namespace = namespace

    @property
    def namespace(self) -> str:
        return self._namespace

    @abc.abstractmethod
    async def create(self, name: str) -> SnapshotRow:
        """Take a snapshot named ``name`` (see the class). Raises
        :class:`SnapshotExistsError` (:func:`snapshot_exists`) when the name is taken, having
        changed nothing."""

    @abc.abstractmethod
    async def get(self, name: str) -> SnapshotRow | None: ...

    @abc.abstractmethod
    async def delete(self, name: str) -> bool:
        """Delete the snapshot (see the class); False when there was none."""

    @abc.abstractmethod
    def pages(
        self, name: str, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """The entries snapshot ``name`` holds whose key starts with ``prefix`` (of
        ``partition`` when given), as they were taken -- also those whose expiry has passed
        since -- ascending by key, in pages of at most ``page_size``. Raises
        :class:`SnapshotNotFoundError` (:func:`snapshot_not_found`) on the first iteration
        when there is no such snapshot. An async generator; the caller closes it. The pages
        are one consistent reading of the snapshot where the technology can hold one (a
        snapshot's records change only when it is deleted)."""

    @abc.abstractmethod
    async def usage(self) -> tuple[int, int]:
        """``(records, bytes)`` stored for the namespace's snapshots now, bytes counted as
        :func:`record_bytes`: what a delete frees shows here (tests and ``bench/``)."""

    @abc.abstractmethod
    async def list(self) -> list[SnapshotRow]:
        """Every snapshot of the namespace, ascending by ``created_at`` (then ``seq``).
        (Declared last: below it, ``list`` in the class body names this method.)"""


async def health_report(kv: KVBackend) -> Health:
    """``kv.health()`` as a :class:`~fleetmem.protocol.Health`, timed; never raises."""
    start = time.perf_counter()
    try:
        details = await kv.health()
    except Exception as exc:  # health never raises
        return Health(
            ok=False,
            backend=kv.backend_name,
            latency_ms=None,
            details={"error": f"{type(exc).__name__}: {exc}", "namespace": kv.namespace},
        )
    latency = (time.perf_counter() - start) * 1000.0
    ok = bool(details.pop("ok", True))
    details.setdefault("namespace", kv.namespace)
    return Health(ok=ok, backend=kv.backend_name, latency_ms=latency, details=details)
