"""The store contract: the :class:`MemoryStore` protocol and the records it returns.

Every backend (``InMemoryStore``, ``SQLiteStore``, ``PostgresStore``, ``RedisStore``,
``HybridStore``) shows exactly this behaviour; ``fleetmem.testing.conformance`` is its
executable form. The rules that hold for every method:

Scope
    A store is bound to one namespace (``[A-Za-z0-9_.-]{1,64}``). Nothing done through it reads,
    lists, matches, counts or deletes an entry of another namespace, including namespaces that
    share a prefix (``a`` vs ``ab`` vs ``a.b``). The one look beyond it is ``namespaces()``,
    which lists the *names* of the namespaces on the same backend that hold a live entry (never
    their entries).

Keys and partitions
    A key is a ``str`` of 1-1024 UTF-8 bytes with no control characters (U+0000-U+001F, U+007F)
    and no lone surrogates; every other character (``* ? [ ] \\ % _ { } :``) is literal. A
    partition follows the same rules with at most 255 bytes; every entry has exactly one, the
    default being ``"default"``. On a write, ``partition=None`` keeps an existing entry's partition
    (``"default"`` for a new entry) and a given partition moves the entry. A bad namespace, key or
    partition (including a non-``str``) raises :class:`~fleetmem.errors.InvalidKeyError` before
    any I/O.

Values
    Any JSON value: ``dict`` (str keys), ``list``/``tuple``, ``str``, ``int`` (any size),
    finite ``float``, ``bool``, ``None``. A read returns a value equal, as JSON, to
    ``json.loads(json.dumps(value))``: a tuple comes back as a list, an integral float may come
    back as an ``int`` and ``-0.0`` as ``0``, dict key order is not kept, ``True`` never becomes
    ``1``. Refused with :class:`~fleetmem.errors.SerializationError` before any I/O: other types,
    non-``str`` dict keys, NaN and infinities, nesting deeper than 64 levels, and any string
    (value or dict key) holding U+0000 -- PostgreSQL's ``jsonb`` cannot store it, so every backend
    refuses it alike rather than round-tripping it on some. A serialized value larger than the
    store's ``max_value_bytes`` (default 8 MiB) raises
    :class:`~fleetmem.errors.ValueTooLargeError`.

TTL and expiry
    ``ttl`` is seconds (``int``/``float`` > 0) or a ``timedelta`` > 0; ``None`` means no expiry.
    Zero, negative, below one millisecond, above 100 years, NaN, infinities, a ``bool``, or ``ttl``
    together with ``keep_ttl=True`` raise :class:`~fleetmem.errors.InvalidArgumentError` (a
    ``ValueError``). Resolution is one millisecond. An expired entry is invisible on every path
    from the moment it expires (``get``, ``get_entry``, ``get_many``, ``exists``, ``keys``,
    ``search``, ``partitions``, ``namespaces``, ``stats``) and counts as absent for
    ``set_if_absent``, ``compare_and_set(version=0)`` and ``incr``. Expiry is measured on the
    server's clock where there is a server. ``cleanup_expired`` and sweepers only free space.

Versions
    Every successful write of a key (``set``, ``set_many``, a ``set_if_absent`` that wrote,
    ``compare_and_set``, ``incr``) adds 1; a new entry has version 1, also when a key is created
    again after deletion or expiry. ``expire`` and ``persist`` change neither the version nor
    ``updated_at``.

Fenced writes
    Every key-value write (``set``, ``set_many``, ``set_if_absent``, ``compare_and_set``,
    ``incr``, ``delete``, ``delete_many``) takes ``fence=``: a :class:`Lease` of this store's
    namespace, or the :class:`~fleetmem.leases.HeldLease` of ``leases.lock()``. The write is
    applied only if, atomically with it and on the server's clock, that lease is still live and
    still carries that token; otherwise it raises :class:`~fleetmem.errors.LeaseLostError` and
    nothing changes. So an agent that paused past its lease cannot overwrite the work of the one
    that took over. The fence is checked before the write's own conditions (a lost fence wins
    over a version conflict). A ``set_many`` of more than 10,000 items is checked chunk by chunk:
    chunks written before the lease was lost stay, as for any failure of such a batch. Before
    any I/O, a ``HeldLease`` whose ``lost`` is set raises ``LeaseLostError``, and a lease of
    another namespace or anything else :class:`~fleetmem.errors.InvalidArgumentError`.
    ``expire``, ``persist`` and the ``clear`` family take no fence. ``leases`` and ``agents``
    are described in ``docs/coordination.md``.

Closing
    ``close()`` is idempotent and closes only what the store created (never an injected client
    or pool); closing a ``with_namespace`` view closes nothing shared. Any other call on a closed
    store raises :class:`~fleetmem.errors.StoreClosedError` -- except ``health()``, which never
    raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # leases.py and agents.py import this module
    import os
    from typing import BinaryIO

    from fleetmem.agents import AgentRegistry
    from fleetmem.changes import Changes
    from fleetmem.leases import HeldLease, Leases
    from fleetmem.portability import ExportReport, ImportReport, Progress
    from fleetmem.queues import Queue
    from fleetmem.snapshots import Snapshots

__all__ = [
    "TTL",
    "Agent",
    "Change",
    "ChangeBatch",
    "Entry",
    "Health",
    "JSONValue",
    "Job",
    "JobResult",
    "Lease",
    "MemoryStore",
    "QueueStats",
    "Snapshot",
    "SnapshotDiff",
    "StoreStats",
]

#: A JSON value as fleetmem stores it (dict, list/tuple, str, int, float, bool, None).
JSONValue = Any
#: A time to live: seconds (> 0) or a positive ``timedelta``.
TTL = float | timedelta


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease (a named lock) granted to one holder, as the server granted or renewed it.

    ``token`` is the fencing token: strictly greater than every token granted before for
    ``name`` in ``namespace`` (across releases, expiries and restarts of a durable backend).
    ``acquired_at`` and ``expires_at`` are timezone-aware UTC on the server's clock.
    ``namespace`` is the namespace the lease lives in: a lease fences writes of that namespace
    only. Pass it as ``fence=`` to any key-value write.
    """

    name: str
    owner: str
    token: int
    acquired_at: datetime
    expires_at: datetime
    namespace: str = "default"


@dataclass(frozen=True, slots=True)
class Agent:
    """A registered agent: ``info`` (a JSON object), ``generation`` (grows each time the agent
    registers again after it was gone), times timezone-aware UTC on the server's clock."""

    id: str
    info: dict[str, Any]
    generation: int
    registered_at: datetime
    last_seen: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Change:
    """One recorded write of a namespace's change feed (see ``docs/changes.md``).

    ``cursor`` is opaque; cursors of one namespace sort (as ``str``) in feed order. ``op`` is
    ``"set"`` (``version`` and ``value`` are the new ones, ``value`` in its stored form, as
    ``get`` returns it), ``"delete"`` (``version`` and ``value`` are ``None``), ``"ttl"`` (an
    ``expire``/``persist``: ``version`` unchanged, ``value`` ``None``, ``expires_at`` the new
    expiry) or ``"clear"`` (``key`` is ``None``; ``partition`` is the cleared partition, or
    ``None`` for a whole-namespace ``clear()``). ``at`` is the server's time of the write; times
    are timezone-aware UTC.
    """

    cursor: str
    op: str
    key: str | None
    partition: str | None
    version: int | None
    value: Any
    expires_at: datetime | None
    at: datetime


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """What ``store.changes.read`` returns: the changes, in feed order, and the cursor to pass
    as the next ``since`` (an empty ``changes`` means the reader is at the head)."""

    changes: list[Change]
    cursor: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A named snapshot of a namespace (``store.snapshots``), as it was taken.

    ``created_at`` is timezone-aware UTC on the backend's clock; ``keys`` is the number of
    entries it holds (the namespace's live entries at that instant); ``bytes`` approximates
    what it stored beyond what it shared with the namespace's earlier snapshots when it was
    taken (each new or changed entry's key, value and partition plus a fixed overhead), and is
    not recomputed later."""

    name: str
    created_at: datetime
    keys: int
    bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotDiff:
    """What ``store.snapshots.diff(a, b)`` found, each list ascending by key: ``added`` (in
    ``b``, or the live namespace, and not in ``a``), ``removed`` (in ``a``, not in ``b``),
    ``changed`` (in both, with another value -- compared as JSON -- or partition)."""

    added: list[str]
    removed: list[str]
    changed: list[str]


@dataclass(frozen=True, slots=True)
class Job:
    """A job of a work queue, as the server last claimed (or dead-lettered) it.

    ``id`` is unique in the namespace and never reused: 16 lowercase hex digits of a sequence,
    so ids sort in ``put`` order. ``priority`` runs higher first. ``attempts`` counts claims
    (1 on the first; an expired lease counts as an attempt). ``token`` grows with every claim of
    the job: ``ack``, ``nack`` and ``extend`` with this object succeed only while no newer claim
    superseded it. Times are timezone-aware UTC on the server's clock; ``claimed_at``,
    ``lease_expires_at`` and ``consumer`` describe the latest claim (``None`` before any).
    ``last_error`` is the ``error`` of the latest ``nack`` (or ``None``).
    """

    id: str
    queue: str
    payload: Any
    priority: int
    attempts: int
    max_attempts: int
    enqueued_at: datetime
    ready_at: datetime
    claimed_at: datetime | None
    lease_expires_at: datetime | None
    consumer: str | None
    token: int
    last_error: str | None
    namespace: str = "default"


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a job ended: ``status`` is ``"done"`` (acked; ``value`` is the ``ack``'s result) or
    ``"dead"`` (dead-lettered; ``error`` is its last error). ``finished_at`` is when it was acked
    or died, on the server's clock."""

    id: str
    status: str
    value: Any
    error: str | None
    attempts: int
    finished_at: datetime


@dataclass(frozen=True, slots=True)
class QueueStats:
    """What one queue holds right now: ``ready`` (claimable now), ``delayed`` (ready later),
    ``claimed`` (under a live lease), ``dead`` (dead letter), ``done`` (results still held)."""

    ready: int
    delayed: int
    claimed: int
    dead: int
    done: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored entry with its metadata.

    Datetimes are timezone-aware UTC, taken from the backend server's clock where there is one.
    ``expires_at`` is ``None`` for a persistent entry.
    """

    key: str
    value: JSONValue
    partition: str
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


def _entry_init() -> Any:
    """``Entry.__init__`` with the generated one's signature, setting the slots through their
    descriptors: a frozen dataclass's own ``__init__`` goes through ``object.__setattr__`` by
    name for each field, twice as slow, and every write and every entry read builds one."""
    setters = [Entry.__dict__[f.name].__set__ for f in fields(Entry)]
    (s_key, s_value, s_partition, s_version, s_created, s_updated, s_expires) = setters

    def __init__(
        self: Entry,
        key: str,
        value: JSONValue,
        partition: str,
        version: int,
        created_at: datetime,
        updated_at: datetime,
        expires_at: datetime | None,
    ) -> None:
        s_key(self, key)
        s_value(self, value)
        s_partition(self, partition)
        s_version(self, version)
        s_created(self, created_at)
        s_updated(self, updated_at)
        s_expires(self, expires_at)

    __init__.__qualname__ = "Entry.__init__"
    return __init__


Entry.__init__ = _entry_init()  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a namespace holds right now.

    ``keys`` counts live entries only and ``partitions`` maps each partition holding a live entry
    to its live count. ``expired_pending`` counts expired entries not yet freed (an upper bound
    where the server evicts by itself). ``bytes`` is an approximate size of the stored values.
    """

    namespace: str
    keys: int
    partitions: dict[str, int]
    expired_pending: int
    bytes: int
    backend: str


@dataclass(frozen=True, slots=True)
class Health:
    """The result of a health check: never an exception."""

    ok: bool
    backend: str
    latency_ms: float | None
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class MemoryStore(Protocol):
    """The async key-value store contract shared by every fleetmem backend."""

    @property
    def namespace(self) -> str:
        """The namespace this store reads and writes."""
        ...

    @property
    def backend(self) -> str:
        """The backend's name: ``memory``, ``sqlite``, ``postgres``, ``redis`` or ``hybrid``."""
        ...

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called on this store (or on the store it is a view of)."""
        ...

    def with_namespace(self, namespace: str) -> MemoryStore:
        """A view bound to ``namespace`` that shares this store's connections.

        Closing the view closes nothing shared; closing this store closes the view too.
        """
        ...

    if TYPE_CHECKING:
        # Checked statically only: on Python < 3.12 isinstance() reads every member of a
        # runtime protocol, and these build backend objects (or raise ConfigurationError on a
        # backend that has no leases yet).

        @property
        def leases(self) -> Leases:
            """Named leases with fencing tokens in this namespace (no I/O until used)."""
            ...

        @property
        def changes(self) -> Changes:
            """The change feed of this namespace (no I/O until used; see docs/changes.md)."""
            ...

        @property
        def snapshots(self) -> Snapshots:
            """The named, incremental snapshots of this namespace (no I/O until used; see
            docs/snapshots.md)."""
            ...

        @property
        def agents(self) -> AgentRegistry:
            """The agent registry of this namespace (no I/O until used)."""
            ...

        def queue(self, name: str) -> Queue:
            """The durable work queue ``name`` of this namespace (no I/O until used)."""
            ...

    async def get(self, key: str, default: JSONValue = None) -> JSONValue:
        """The live value of ``key``, or ``default`` when it is missing or expired."""
        ...

    async def get_entry(self, key: str) -> Entry | None:
        """The live entry of ``key`` with its metadata, or ``None``."""
        ...

    async def get_many(self, keys: Iterable[str]) -> dict[str, JSONValue]:
        """The live values of ``keys``, in the order of ``keys``; missing keys are omitted.

        A key given twice appears once. Every key is validated before any I/O.
        """
        ...

    async def exists(self, key: str) -> bool:
        """Whether ``key`` holds a live entry."""
        ...

    async def set(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        keep_ttl: bool = False,
        fence: Lease | HeldLease | None = None,
    ) -> Entry:
        """Store ``value`` under ``key`` and return the new entry (version + 1, new: 1).

        Without ``ttl`` the entry becomes persistent, unless ``keep_ttl=True`` keeps the current
        expiry of a live entry (a new entry is then persistent).
        """
        ...

    async def set_many(
        self,
        items: Mapping[str, JSONValue],
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> int:
        """Store every item of ``items``; return how many were written.

        Every key and value is validated before any I/O: one bad item and nothing is written.
        Each written entry's version is incremented as by ``set``. Large batches are sent in
        chunks with a few round trips each.
        """
        ...

    async def set_if_absent(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> bool:
        """Atomically store ``value`` only if ``key`` has no live entry; ``True`` if written.

        Among concurrent callers exactly one wins.
        """
        ...

    async def compare_and_set(
        self,
        key: str,
        value: JSONValue,
        *,
        version: int,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> Entry:
        """Atomically store ``value`` if the live entry's version is ``version``.

        ``version=0`` means the key must be absent (or expired). Without ``ttl`` an existing
        expiry is kept. On a mismatch nothing changes and
        :class:`~fleetmem.errors.VersionConflictError` carries the current version (0 when
        absent). A negative or non-``int`` version is an ``InvalidArgumentError``; so is one above
        ``2**63 - 1``: versions are signed 64-bit counters on every backend, no entry can have a
        larger one (refused before any I/O, not answered as a conflict).
        """
        ...

    async def incr(
        self,
        key: str,
        amount: int | float = 1,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> int | float:
        """Atomically add ``amount`` to the number under ``key`` and return the new number.

        A missing or expired key starts from 0. Integers are exact in signed 64 bits; a result
        beyond raises :class:`~fleetmem.errors.InvalidArgumentError` and changes nothing. A float
        amount (or a float stored value) gives a float. A stored value that is not a number
        (including a ``bool``) raises :class:`~fleetmem.errors.NotANumberError` (a
        ``TypeError``). Without ``ttl`` the current expiry is kept.
        """
        ...

    async def delete(self, key: str, *, fence: Lease | HeldLease | None = None) -> bool:
        """Delete ``key``; ``True`` if a live entry existed."""
        ...

    async def delete_many(
        self, keys: Iterable[str], *, fence: Lease | HeldLease | None = None
    ) -> int:
        """Delete ``keys``; return how many live entries were deleted."""
        ...

    async def ttl(self, key: str) -> float | None:
        """Seconds left before ``key`` expires, ``None`` if persistent.

        A missing or expired key raises :class:`~fleetmem.errors.KeyNotFoundError`.
        """
        ...

    async def expire(self, key: str, ttl: TTL) -> bool:
        """Set the expiry of a live ``key``; ``True`` if it existed. Version unchanged."""
        ...

    async def persist(self, key: str) -> bool:
        """Remove the expiry of a live ``key``; ``True`` if it existed. Version unchanged."""
        ...

    async def keys(
        self,
        prefix: str = "",
        *,
        partition: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[str]:
        """Live keys starting with the literal ``prefix``, ascending by code point.

        ``after`` is an exclusive cursor: pass the last key of a page to get the next one.
        ``limit`` below 0 is an ``InvalidArgumentError``; ``limit=0`` returns ``[]``; a limit above
        ``2**63 - 1`` is no limit (as on every backend: none could carry it).
        """
        ...

    async def search(
        self,
        pattern: str,
        *,
        partition: str | None = None,
        limit: int | None = None,
    ) -> dict[str, JSONValue]:
        """Live entries whose whole key matches the glob ``pattern``, ascending by key.

        ``*`` any run of characters (``/`` included), ``?`` one character, ``[abc]``, ``[a-z]``,
        ``[!a]``/``[^a]`` one character in / not in the set, ``\\x`` the literal ``x``; every other
        character is literal. ``\\`` escapes inside a class too, a reversed range matches
        nothing, ``]`` right after ``[``, ``[!`` or ``[^`` is a member. The empty pattern matches
        nothing. Unclosed ``[``, a trailing ``\\``, more than 256 bytes, more than 16 ``*`` or a
        control character anywhere (U+0000-U+001F, U+007F, escaped or in a class too: no key
        holds one) raise :class:`~fleetmem.errors.InvalidPatternError`, before any I/O.
        ``limit`` is as for :meth:`keys`. Matching is linear in the key.
        """
        ...

    async def partitions(self) -> list[str]:
        """Partitions holding at least one live entry, ascending."""
        ...

    async def namespaces(
        self,
        prefix: str = "",
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[str]:
        """Names of the namespaces on this backend that hold a live entry, ascending.

        "This backend" is what the store's connection reaches: the same PostgreSQL table, Redis
        database (or Cluster), SQLite file, or -- for ``InMemoryStore`` -- the same store object
        and its views. The store's own namespace is listed only while it holds a live entry; a
        namespace whose entries all expired or were deleted is never listed, and one is listed
        as soon as a write to it has returned (from any process). fleetmem's reserved
        ``_fleetmem*`` namespaces are never listed. The answer comes from an index on every
        backend, never from reading every entry.

        ``prefix`` keeps the names that start with it (``""`` or up to 64 characters of
        ``A-Z a-z 0-9 _ . -``); ``after`` is an exclusive cursor (a namespace name: pass the
        last name of a page to get the next one); ``limit`` is as for :meth:`keys`. A bad
        ``prefix`` or ``after`` raises :class:`~fleetmem.errors.InvalidKeyError`, a bad
        ``limit`` :class:`~fleetmem.errors.InvalidArgumentError`, before any I/O.
        """
        ...

    async def clear_partition(self, partition: str) -> int:
        """Delete every entry of ``partition``; return how many live entries were deleted."""
        ...

    async def clear(self) -> int:
        """Delete every entry of this namespace; return how many live entries were deleted."""
        ...

    async def cleanup_expired(self) -> int:
        """Free the space of this namespace's expired entries; return how many were removed."""
        ...

    async def stats(self) -> StoreStats:
        """Counts and sizes for this namespace only."""
        ...

    async def list_queues(self) -> list[str]:
        """Names of this namespace's work queues holding a job or a held result, ascending."""
        ...

    async def export_to(
        self,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        prefix: str = "",
        partition: str | None = None,
        snapshot: str | None = None,
        progress: Progress | None = None,
    ) -> ExportReport:
        """Write the live entries (of ``prefix``, ``partition``) -- or those snapshot
        ``snapshot`` holds -- to ``dest`` in the fleetmem export format: header, entries
        ascending by key, count and SHA-256 trailer; gzip for a ``.gz`` path. One point-in-time
        view where the backend has one (see ``docs/portability.md``)."""
        ...

    async def import_from(
        self,
        src: str | os.PathLike[str] | BinaryIO,
        *,
        mode: str = "merge",
        progress: Progress | None = None,
    ) -> ImportReport:
        """Check the whole export ``src`` first (any problem: ``InvalidExportError`` naming the
        line, nothing written), then write its entries into this namespace with their
        partition and absolute expiry; ``mode`` is ``"merge"``, ``"missing"`` or
        ``"replace"``."""
        ...

    async def health(self) -> Health:
        """Check the backend; never raises, also when closed or unreachable."""
        ...

    async def close(self) -> None:
        """Release what this store created. Idempotent."""
        ...

    async def __aenter__(self) -> MemoryStore: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
