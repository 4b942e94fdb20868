"""``Store``: the validating front end every backend shares.

:class:`Store` implements :class:`fleetmem.protocol.MemoryStore`: it checks and encodes every
argument once, before any I/O, then calls a :class:`fleetmem.backends.seam.KVBackend` -- the
key-value primitive of one technology (see ``docs/architecture.md``). Each technology's public
class (``InMemoryStore``, ``SQLiteStore``, ``PostgresStore``, ``RedisStore``, ``HybridStore``) is
a :class:`Store` that builds its backend from typed options or an injected client, pool or file.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, BinaryIO, ClassVar, Generic, TypeVar

from fleetmem._coalesce import Coalescer
from fleetmem._codec import (
    DEFAULT_MAX_VALUE_BYTES,
    encode_value,
    encode_value_ex,
    stored_form,
)
from fleetmem._validate import (
    check_positive_int,
    compile_glob,
    validate_amount,
    validate_key,
    validate_keys,
    validate_limit,
    validate_namespace,
    validate_optional_partition,
    validate_optional_ttl,
    validate_partition,
    validate_ttl,
    validate_version,
)
from fleetmem.agents import AgentRegistry
from fleetmem.backends.seam import (
    MISSING,
    RESERVED_NAMESPACE_PREFIX,
    EntryMeta,
    KVBackend,
    QueueBackend,
    SetOp,
    health_report,
)
from fleetmem.changes import Changes
from fleetmem.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    StoreClosedError,
)
from fleetmem.leases import HeldLease, Leases, fence_of
from fleetmem.portability import (
    ExportReport,
    ImportReport,
    Progress,
    check_mode,
    check_progress,
    check_target,
    export_entries,
    import_entries,
)
from fleetmem.protocol import TTL, Entry, Health, JSONValue, Lease, StoreStats
from fleetmem.queues import Queue
from fleetmem.snapshots import Snapshots, check_snapshot_name

__all__ = ["RESERVED_NAMESPACE_PREFIX", "SET_MANY_CHUNK", "Store"]

#: Items per chunk handed to ``set_many``: large batches are validated first, then re-encoded
#: chunk by chunk, so no more than one encoded chunk is held beyond the caller's input.
SET_MANY_CHUNK = 10_000

_S = TypeVar("_S", bound="Store[Any]")
_K = TypeVar("_K", bound=KVBackend)


def user_namespace(namespace: object) -> str:
    """``namespace`` validated, refusing fleetmem's reserved ones."""
    name = validate_namespace(namespace)
    if name.startswith(RESERVED_NAMESPACE_PREFIX):
        raise InvalidKeyError(
            f"invalid namespace {name!r}: namespaces beginning with "
            f"{RESERVED_NAMESPACE_PREFIX!r} are reserved for fleetmem's own state"
        )
    return name


def _namespace_arg(what: str, value: object) -> str:
    """A ``namespaces()`` argument that must look like a namespace name."""
    try:
        return validate_namespace(value)
    except InvalidKeyError:
        raise InvalidKeyError(
            f"invalid namespaces() {what} {value!r}: expected 1-64 characters of A-Z a-z 0-9 _ . -"
        ) from None


def _same(key: str) -> str:
    return key


def _op_key(op: SetOp) -> str:
    return op.key


class _Shared:
    """State shared by a store and its ``with_namespace`` views.

    ``views`` holds the live views weakly, so that ``fleetmem.observability.instrument`` can
    reach the views made before it was called."""

    __slots__ = ("closed", "views")

    def __init__(self) -> None:
        self.closed = False
        self.views: weakref.WeakSet[Store[Any]] = weakref.WeakSet()


class Store(Generic[_K]):
    """Validation, encoding and lifecycle in front of a :class:`KVBackend` (``kv``)."""

    backend_name: ClassVar[str] = "base"

    def __init__(self, kv: _K, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        user_namespace(kv.namespace)
        self._kv = kv
        self._max_value_bytes = check_positive_int("max_value_bytes", max_value_bytes)
        self._shared = _Shared()
        self._view_closed = False
        self._is_view = False
        self._coalescing = kv.coalesce_max_inflight is not None
        self._make_coalescers()
        self._leases: Leases | None = None
        self._agents: AgentRegistry | None = None
        self._queues: QueueBackend | None = None
        self._changes: Changes | None = None
        self._snapshots: Snapshots | None = None

    @classmethod
    def from_backend(
        cls: type[_S], kv: Any, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> _S:
        """A store of this class in front of an existing backend ``kv`` (which it then owns:
        closing the store closes it)."""
        store = cls.__new__(cls)
        Store.__init__(store, kv, max_value_bytes=max_value_bytes)
        return store

    @property
    def kv(self) -> _K:
        """The backend this store validates for: the public seam other backends build on."""
        return self._kv

    def _make_coalescers(self) -> None:
        kv = self._kv
        limit = kv.coalesce_max_inflight
        if not self._coalescing or limit is None:
            self._c_get: Coalescer[str, Any] | None = None
            self._c_entry: Coalescer[str, Entry | None] | None = None
            self._c_exists: Coalescer[str, bool] | None = None
            self._c_set: Coalescer[SetOp, EntryMeta] | None = None
            self._c_delete: Coalescer[str, bool] | None = None
            return
        self._c_get = Coalescer(kv.get, kv.get_batch, key=None, max_inflight=limit)
        self._c_entry = Coalescer(kv.get_entry, kv.get_entry_batch, key=None, max_inflight=limit)
        self._c_exists = Coalescer(kv.exists, kv.exists_batch, key=None, max_inflight=limit)
        writes = kv.coalesce_max_inflight_writes or limit
        self._c_set = Coalescer(kv.set_op, kv.set_batch, key=_op_key, max_inflight=writes)
        self._c_delete = Coalescer(kv.delete, kv.delete_batch, key=_same, max_inflight=writes)

    @property
    def coalescing(self) -> bool:
        """Whether concurrent single-key calls are merged into batches."""
        return self._c_get is not None

    def merge_counts(self) -> dict[str, tuple[int, int]]:
        """Per operation, (batches sent, calls they carried) since the store was made."""
        pairs = {
            "get": self._c_get,
            "get_entry": self._c_entry,
            "exists": self._c_exists,
            "set": self._c_set,
            "delete": self._c_delete,
        }
        return {
            name: (c.batches, c.batched_calls) if c is not None else (0, 0)
            for name, c in pairs.items()
        }

    def set_coalescing(self, enabled: bool) -> None:
        """Turn the merging of concurrent calls on or off (for this store or view)."""
        self._coalescing = bool(enabled)
        self._make_coalescers()

    # ---------------------------------------------------------------- identity and lifecycle

    @property
    def namespace(self) -> str:
        return self._kv.namespace

    @property
    def backend(self) -> str:
        return self._kv.backend_name

    @property
    def max_value_bytes(self) -> int:
        return self._max_value_bytes

    @property
    def closed(self) -> bool:
        return self._view_closed or self._shared.closed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} namespace={self.namespace!r}{self._kv.describe()}>"

    def with_namespace(self: _S, namespace: str) -> _S:
        """This store on another namespace, sharing its connections; closing it closes nothing
        but the view."""
        self._check_open()
        view = copy.copy(self)
        view._kv = self._kv.view(user_namespace(namespace))
        view._view_closed = False
        view._is_view = True
        view._make_coalescers()
        view._leases = None
        view._agents = None
        view._queues = None
        view._changes = None
        view._snapshots = None
        self._shared.views.add(view)
        return view

    # ---------------------------------------------------------------- coordination

    @property
    def leases(self) -> Leases:
        """Named leases with fencing tokens in this store's namespace (no I/O until used)."""
        if self._leases is None:
            self._leases = Leases(self._kv.leases(), self._check_open)
        return self._leases

    @property
    def agents(self) -> AgentRegistry:
        """The agent registry of this store's namespace (no I/O until used)."""
        if self._agents is None:
            self._agents = AgentRegistry(self._kv.agents(), self._check_open, self._max_value_bytes)
        return self._agents

    @property
    def changes(self) -> Changes:
        """The change feed of this store's namespace (no I/O until used)."""
        if self._changes is None:
            self._changes = Changes(self._kv.changes(), self._check_open, lambda: self.closed)
        return self._changes

    @property
    def snapshots(self) -> Snapshots:
        """The named, incremental snapshots of this store's namespace (``docs/snapshots.md``):
        ``create``, ``list``, ``get``, ``diff``, ``restore``, ``delete``. No I/O until used."""
        if self._snapshots is None:
            self._snapshots = Snapshots(self._kv, self._check_open)
        return self._snapshots

    def queue(self, name: str) -> Queue:
        """The durable work queue ``name`` of this store's namespace (no I/O until used)."""
        if self._queues is None:
            self._queues = self._kv.queues()
        return Queue(self._queues, name, self._check_open, self._max_value_bytes)

    async def list_queues(self) -> list[str]:
        """Names of this namespace's queues holding at least one job or a held result,
        ascending."""
        self._check_open()
        if self._queues is None:
            self._queues = self._kv.queues()
        return await self._queues.list_queues()

    def _check_open(self) -> None:
        if self._view_closed or self._shared.closed:
            raise StoreClosedError(
                f"{type(self).__name__} for namespace {self.namespace!r} is closed"
            )

    async def close(self) -> None:
        if self._is_view:
            self._view_closed = True
            return
        if self._shared.closed:
            return
        self._shared.closed = True
        await self._kv.aclose()

    @classmethod
    def from_url(cls: type[_S], url: str, **options: Any) -> _S:
        """Build a store from a URL (no I/O); ``open_store`` then awaits :meth:`connect`."""
        raise ConfigurationError(f"{cls.__name__} cannot be built from a URL")

    async def connect(self: _S) -> _S:
        """Open connections and check the schema. Idempotent; a no-op for embedded stores."""
        self._check_open()
        await self._kv.connect()
        return self

    async def __aenter__(self: _S) -> _S:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _encode(self, value: Any) -> bytes:
        return encode_value(value, self._max_value_bytes)

    # ---------------------------------------------------------------- reads

    async def get(self, key: str, default: JSONValue = None) -> JSONValue:
        validate_key(key)
        self._check_open()
        c = self._c_get
        value = await (self._kv.get(key) if c is None else c.call(key))
        return default if value is MISSING else value

    async def get_entry(self, key: str) -> Entry | None:
        validate_key(key)
        self._check_open()
        c = self._c_entry
        return await (self._kv.get_entry(key) if c is None else c.call(key))

    async def get_many(self, keys: Iterable[str]) -> dict[str, JSONValue]:
        wanted = validate_keys(keys)
        self._check_open()
        if not wanted:
            return {}
        found = await self._kv.get_many(wanted)
        if len(found) == len(wanted):  # all there: reorder in C
            return dict(zip(wanted, map(found.__getitem__, wanted), strict=True))
        return {k: found[k] for k in wanted if k in found}

    async def exists(self, key: str) -> bool:
        validate_key(key)
        self._check_open()
        c = self._c_exists
        return await (self._kv.exists(key) if c is None else c.call(key))

    async def ttl(self, key: str) -> float | None:
        validate_key(key)
        self._check_open()
        return await self._kv.ttl(key)

    async def keys(
        self,
        prefix: str = "",
        *,
        partition: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[str]:
        if prefix != "" or not isinstance(prefix, str):
            validate_key(prefix)  # a non-empty prefix follows the key rules
        part = validate_optional_partition(partition)
        lim = validate_limit(limit)
        if after is not None:
            validate_key(after)
        self._check_open()
        if lim == 0:
            return []
        return await self._kv.keys(prefix, part, lim, after)

    async def search(
        self,
        pattern: str,
        *,
        partition: str | None = None,
        limit: int | None = None,
    ) -> dict[str, JSONValue]:
        glob = compile_glob(pattern)
        part = validate_optional_partition(partition)
        lim = validate_limit(limit)
        self._check_open()
        if lim == 0 or not pattern:
            return {}
        if glob.literal is not None:
            # No wildcard: an exact lookup.
            if part is None:
                value = await self._kv.get(glob.literal)
                return {} if value is MISSING else {glob.literal: value}
            entry = await self._kv.get_entry(glob.literal)
            if entry is None or entry.partition != part:
                return {}
            return {entry.key: entry.value}
        return await self._kv.search(glob, part, lim)

    async def partitions(self) -> list[str]:
        self._check_open()
        return await self._kv.partitions()

    async def namespaces(
        self,
        prefix: str = "",
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[str]:
        if prefix != "" or not isinstance(prefix, str):
            _namespace_arg("prefix", prefix)
        lim = validate_limit(limit)
        if after is not None:
            _namespace_arg("after", after)
        self._check_open()
        if lim == 0 or prefix.startswith(RESERVED_NAMESPACE_PREFIX):
            return []
        return await self._kv.namespaces(prefix, lim, after)

    async def stats(self) -> StoreStats:
        self._check_open()
        return await self._kv.stats()

    async def health(self) -> Health:
        if self.closed:
            return Health(
                ok=False,
                backend=self.backend,
                latency_ms=None,
                details={"error": "store is closed", "namespace": self.namespace},
            )
        return await health_report(self._kv)

    # ---------------------------------------------------------------- writes

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
        validate_key(key)
        ttl_ms = validate_optional_ttl(ttl, keep_ttl)
        part = validate_optional_partition(partition)
        payload, exact = encode_value_ex(value, self._max_value_bytes)
        if fence is not None:
            fenced = fence_of(fence, self._kv.namespace)
            self._check_open()
            meta = await self._kv.set(key, payload, ttl_ms, part, bool(keep_ttl), fenced)
            return Entry(key, stored_form(value, payload, exact), *meta)
        self._check_open()
        c = self._c_set
        if c is None:
            meta = await self._kv.set(key, payload, ttl_ms, part, bool(keep_ttl))
        else:
            meta = await c.call(SetOp(key, payload, ttl_ms, part, bool(keep_ttl)))
        return Entry(key, stored_form(value, payload, exact), *meta)

    async def set_many(
        self,
        items: Mapping[str, JSONValue],
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> int:
        if not isinstance(items, Mapping):
            raise InvalidArgumentError(
                f"items must be a mapping of key to value, not {type(items).__name__}"
            )
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        fenced = fence_of(fence, self._kv.namespace)
        encode = self._encode
        if len(items) <= SET_MANY_CHUNK:
            chunk = [(validate_key(k), encode(v)) for k, v in items.items()]
            self._check_open()
            if not chunk:
                return 0
            if fenced is None:
                return await self._kv.set_many(iter([chunk]), ttl_ms, part)
            return await self._kv.set_many(iter([chunk]), ttl_ms, part, fenced)
        # Validate everything first (all or nothing), then encode again chunk by chunk.
        for k, v in items.items():
            validate_key(k)
            encode(v)
        self._check_open()
        if fenced is None:
            return await self._kv.set_many(_chunks(items, encode), ttl_ms, part)
        return await self._kv.set_many(_chunks(items, encode), ttl_ms, part, fenced)

    async def set_if_absent(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> bool:
        validate_key(key)
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        payload = self._encode(value)
        fenced = fence_of(fence, self._kv.namespace)
        self._check_open()
        if fenced is None:
            return await self._kv.set_if_absent(key, payload, ttl_ms, part)
        return await self._kv.set_if_absent(key, payload, ttl_ms, part, fenced)

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
        validate_key(key)
        expected = validate_version(version)
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        payload, exact = encode_value_ex(value, self._max_value_bytes)
        fenced = fence_of(fence, self._kv.namespace)
        self._check_open()
        if fenced is None:
            meta = await self._kv.compare_and_set(key, payload, expected, ttl_ms, part)
        else:
            meta = await self._kv.compare_and_set(key, payload, expected, ttl_ms, part, fenced)
        return Entry(key, stored_form(value, payload, exact), *meta)

    async def incr(
        self,
        key: str,
        amount: int | float = 1,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> int | float:
        validate_key(key)
        delta = validate_amount(amount)
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        fenced = fence_of(fence, self._kv.namespace)
        self._check_open()
        if fenced is None:
            return await self._kv.incr(key, delta, ttl_ms, part)
        return await self._kv.incr(key, delta, ttl_ms, part, fenced)

    async def delete(self, key: str, *, fence: Lease | HeldLease | None = None) -> bool:
        validate_key(key)
        if fence is not None:
            fenced = fence_of(fence, self._kv.namespace)
            self._check_open()
            return await self._kv.delete(key, fenced)
        self._check_open()
        c = self._c_delete
        return await (self._kv.delete(key) if c is None else c.call(key))

    async def delete_many(
        self, keys: Iterable[str], *, fence: Lease | HeldLease | None = None
    ) -> int:
        wanted = validate_keys(keys)
        fenced = fence_of(fence, self._kv.namespace)
        self._check_open()
        if not wanted:
            return 0
        if fenced is None:
            return await self._kv.delete_many(wanted)
        return await self._kv.delete_many(wanted, fenced)

    async def expire(self, key: str, ttl: TTL) -> bool:
        validate_key(key)
        ttl_ms = validate_ttl(ttl)
        self._check_open()
        return await self._kv.expire(key, ttl_ms)

    async def persist(self, key: str) -> bool:
        validate_key(key)
        self._check_open()
        return await self._kv.expire(key, None)

    async def clear_partition(self, partition: str) -> int:
        part = validate_partition(partition)
        self._check_open()
        return await self._kv.clear(part)

    async def clear(self) -> int:
        self._check_open()
        return await self._kv.clear(None)

    async def cleanup_expired(self) -> int:
        self._check_open()
        return await self._kv.cleanup_expired()

    # ---------------------------------------------------------------- portability

    async def export_to(
        self,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        prefix: str = "",
        partition: str | None = None,
        snapshot: str | None = None,
        progress: Progress | None = None,
    ) -> ExportReport:
        """Write the namespace's live entries (those whose key starts with ``prefix``, of
        ``partition`` when given) to ``dest`` in the fleetmem export format (see
        :mod:`fleetmem.portability`): a path -- gzip-compressed when it ends in ``.gz`` -- or a
        binary file object (written uncompressed, flushed, left open).

        * Entries already expired are not exported; keys are strictly ascending.
        * Consistency: one point-in-time view where the backend has one
          (``ExportReport.consistency == "snapshot"``: memory, SQLite, PostgreSQL, the hybrid);
          on Redis (``"per-entry"``) each entry is exact, but an entry written while the
          export runs may or may not be in it.
        * At most one page of entries (10,000) is held in memory.
        * A path is written through a temporary file in its directory, renamed when complete:
          a failed or cancelled export leaves no file (an existing file is replaced only by a
          complete export).

        With ``snapshot=NAME``, the entries snapshot ``NAME`` of this namespace holds are
        written instead (of ``prefix`` and ``partition`` likewise), as they were taken -- also
        an entry whose expiry has passed since, which an import then skips -- and the header
        names the snapshot; an unknown name raises
        :class:`~fleetmem.errors.SnapshotNotFoundError` before the file is opened.

        ``prefix`` and ``partition`` follow the rules of :meth:`keys`; a bad argument raises
        before any I/O. ``progress("export", done)`` is called after each page."""
        if prefix != "" or not isinstance(prefix, str):
            validate_key(prefix)
        part = validate_optional_partition(partition)
        name = None if snapshot is None else check_snapshot_name(snapshot)
        target = check_target(dest, writing=True)
        report = check_progress(progress)
        self._check_open()
        if name is not None:
            await self.snapshots.require(name)
        return await export_entries(self._kv, target, prefix, part, report, name)

    async def import_from(
        self,
        src: str | os.PathLike[str] | BinaryIO,
        *,
        mode: str = "merge",
        progress: Progress | None = None,
    ) -> ImportReport:
        """Check the whole export ``src`` (a path, gzip when it ends in ``.gz``, or a binary
        file object read from its position to its end), then write its entries to this
        store's namespace -- whatever namespace the header names.

        **Checked first, then written**: every line is checked (the header, valid JSON, each
        key under the key rules, each value under this store's value rules and
        ``max_value_bytes``, partitions, datetimes, keys strictly ascending, nothing after the
        trailer, its count and checksum) before the first write; any problem raises
        :class:`~fleetmem.errors.InvalidExportError` naming the line, and nothing is written.
        An unknown ``mode`` raises ``InvalidArgumentError`` before anything is opened.

        **Written**: each entry's key, value, partition and absolute expiry (the remaining
        TTL is computed on the target's clock when written); versions and timestamps follow
        this store's write rules (a new key gets version 1); an entry whose expiry has passed
        is skipped and counted. The change feed records each write (``set``) and each key a
        replace deletes (``delete``).

        * ``"merge"``: every entry is written, other keys are left alone.
        * ``"missing"``: only keys with no live entry are written.
        * ``"replace"``: the namespace ends up holding exactly the export's live entries (every
          other key deleted, also one whose entry in the export has expired); one transaction
          where ``kv.replace_is_atomic`` (memory, SQLite, PostgreSQL, the hybrid).

        A missing file raises the ``OSError`` of opening it. ``progress`` sees ``"check"``
        and ``"import"``."""
        checked_mode = check_mode(mode)
        source = check_target(src, writing=False)
        report = check_progress(progress)
        self._check_open()
        return await import_entries(self._kv, source, checked_mode, self._max_value_bytes, report)


def _chunks(
    items: Mapping[str, Any], encode: Any, size: int = SET_MANY_CHUNK
) -> Iterator[list[tuple[str, bytes]]]:
    """``items`` encoded, ``size`` at a time, in one list that is emptied before it is filled
    again: a consumer is done with a chunk when it asks for the next, so a ``set_many`` never
    holds more than one chunk of encoded values (the consumer's loop variable would otherwise
    keep the previous chunk alive while the next one is built)."""
    chunk: list[tuple[str, bytes]] = []
    for k, v in items.items():
        chunk.append((k, encode(v)))
        if len(chunk) >= size:
            yield chunk
            chunk.clear()
    if chunk:
        yield chunk
