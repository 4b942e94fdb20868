"""``BaseStore``: the public methods of every backend, validating once before any I/O.

A backend subclasses :class:`BaseStore` and implements the ``_``-prefixed hooks. The hooks
receive arguments that are already validated and encoded:

* keys and partitions are valid ``str``; ``partition=None`` means "keep the entry's partition,
  ``default`` for a new one";
* values arrive as ``payload`` -- the compact UTF-8 JSON from :func:`fleetmem._codec.encode_value`;
* TTLs arrive as whole milliseconds (``ttl_ms``), ``None`` for no expiry;
* ``limit`` is ``None`` or an ``int`` > 0 (``limit=0`` never reaches a backend).

Hooks return decoded values (backends decode with :func:`fleetmem._codec.decode_value`) and
raise fleetmem errors only: each backend translates its driver's exceptions at one choke point.
"""

from __future__ import annotations

import abc
import copy
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, TypeVar

from fleetmem._coalesce import Coalescer
from fleetmem._codec import (
    DEFAULT_MAX_VALUE_BYTES,
    encode_value,
    encode_value_ex,
    stored_form,
)
from fleetmem._validate import (
    GlobPattern,
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
from fleetmem.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    StoreClosedError,
)
from fleetmem.protocol import TTL, Entry, Health, JSONValue, StoreStats

__all__ = ["MISSING", "SET_MANY_CHUNK", "BaseStore", "EntryMeta", "SetOp"]

#: Items per chunk handed to ``_set_many``: large batches are validated first, then re-encoded
#: chunk by chunk, so no more than one encoded chunk is held beyond the caller's input.
SET_MANY_CHUNK = 10_000


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: Returned by ``_get`` for a missing or expired key.
MISSING: Any = _Missing()

_S = TypeVar("_S", bound="BaseStore")


class EntryMeta(NamedTuple):
    """The metadata of an entry a write produced (``Entry`` without key and value)."""

    partition: str
    version: int
    created_at: Any  # datetime (tz-aware UTC)
    updated_at: Any
    expires_at: Any  # datetime | None


class SetOp(NamedTuple):
    """One ``set`` call, validated and encoded, as a batch hook receives it."""

    key: str
    payload: bytes
    ttl_ms: int | None
    partition: str | None
    keep_ttl: bool


#: Namespaces beginning with this hold fleetmem's own state (the hybrid tier's epochs): no store
#: can be opened on one, so nothing a user does (``clear()``, a restore of one namespace, a
#: listing) can reach that state.
RESERVED_NAMESPACE_PREFIX = "_fleetmem"


def _user_namespace(namespace: object) -> str:
    name = validate_namespace(namespace)
    if name.startswith(RESERVED_NAMESPACE_PREFIX):
        raise InvalidKeyError(
            f"invalid namespace {name!r}: namespaces beginning with "
            f"{RESERVED_NAMESPACE_PREFIX!r} are reserved for fleetmem's own state"
        )
    return name


def _same(key: str) -> str:
    return key


def _op_key(op: SetOp) -> str:
    return op.key


class _Shared:
    """State shared by a store and its ``with_namespace`` views."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False


class BaseStore(abc.ABC):
    """Validation, encoding and lifecycle shared by every backend (see ``MemoryStore``)."""

    backend_name: ClassVar[str] = "base"

    def __init__(
        self, *, namespace: str = "default", max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> None:
        self._namespace = _user_namespace(namespace)
        if (
            isinstance(max_value_bytes, bool)
            or not isinstance(max_value_bytes, int)
            or (max_value_bytes <= 0)
        ):
            raise ConfigurationError(
                f"max_value_bytes must be a positive int, not {max_value_bytes!r}"
            )
        self._max_value_bytes = max_value_bytes
        self._shared = _Shared()
        self._view_closed = False
        self._is_view = False
        self._coalescing = self.coalesce_max_inflight is not None
        self._make_coalescers()

    #: Concurrent single-key calls beyond this many in flight are merged into batches (see
    #: ``fleetmem._coalesce``); ``None`` turns merging off. A backend sets it when its batch
    #: hooks (``_get_many``, ``_get_entries``, ``_set_batch``, ``_delete_batch``) do one round
    #: trip per batch.
    coalesce_max_inflight: ClassVar[int | None] = None
    #: The same for set/delete (``None``: as for reads). A backend whose write batches each
    #: wait for a commit may want a few more of them in flight than read batches.
    coalesce_max_inflight_writes: ClassVar[int | None] = None

    def _make_coalescers(self) -> None:
        limit = self.coalesce_max_inflight
        if not self._coalescing or limit is None:
            self._c_get: Coalescer[str, Any] | None = None
            self._c_entry: Coalescer[str, Entry | None] | None = None
            self._c_exists: Coalescer[str, bool] | None = None
            self._c_set: Coalescer[SetOp, EntryMeta] | None = None
            self._c_delete: Coalescer[str, bool] | None = None
            return
        self._c_get = Coalescer(self._get, self._get_batch, key=None, max_inflight=limit)
        self._c_entry = Coalescer(
            self._get_entry, self._get_entry_batch, key=None, max_inflight=limit
        )
        self._c_exists = Coalescer(self._exists, self._exists_batch, key=None, max_inflight=limit)
        writes = self.coalesce_max_inflight_writes or limit
        self._c_set = Coalescer(self._set_op, self._set_batch, key=_op_key, max_inflight=writes)
        self._c_delete = Coalescer(self._delete, self._delete_batch, key=_same, max_inflight=writes)

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
        return self._namespace

    @property
    def backend(self) -> str:
        return self.backend_name

    @property
    def max_value_bytes(self) -> int:
        return self._max_value_bytes

    @property
    def closed(self) -> bool:
        return self._view_closed or self._shared.closed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} namespace={self._namespace!r}{self._repr_details()}>"

    def _repr_details(self) -> str:
        """Extra text for ``repr`` (never a password)."""
        return ""

    def with_namespace(self: _S, namespace: str) -> _S:
        self._check_open()
        return self._view(_user_namespace(namespace))

    def _reserved_view(self: _S, namespace: str) -> _S:
        """A view on one of fleetmem's own namespaces (``_fleetmem...``), which users cannot
        open: the hybrid tier keeps its epochs there."""
        if not validate_namespace(namespace).startswith(RESERVED_NAMESPACE_PREFIX):
            raise ValueError(f"{namespace!r} is not a reserved namespace")
        return self._view(namespace)

    def _view(self: _S, namespace: str) -> _S:
        self._check_open()
        view = copy.copy(self)
        view._namespace = namespace
        view._view_closed = False
        view._is_view = True
        view._bind_namespace()
        view._make_coalescers()
        return view

    def _bind_namespace(self) -> None:  # noqa: B027 - an optional hook
        """Recompute namespace-dependent state after ``with_namespace`` (a hook)."""

    def _check_open(self) -> None:
        if self._view_closed or self._shared.closed:
            raise StoreClosedError(
                f"{type(self).__name__} for namespace {self._namespace!r} is closed"
            )

    async def close(self) -> None:
        if self._is_view:
            self._view_closed = True
            return
        if self._shared.closed:
            return
        self._shared.closed = True
        await self._aclose()

    @classmethod
    def from_url(cls: type[_S], url: str, **options: Any) -> _S:
        """Build a store from a URL (no I/O); ``open_store`` then awaits :meth:`connect`."""
        raise ConfigurationError(f"{cls.__name__} cannot be built from a URL")

    async def connect(self: _S) -> _S:
        """Open connections and check the schema. Idempotent; a no-op for embedded stores."""
        self._check_open()
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
        value = await (self._get(key) if c is None else c.call(key))
        return default if value is MISSING else value

    async def get_entry(self, key: str) -> Entry | None:
        validate_key(key)
        self._check_open()
        c = self._c_entry
        return await (self._get_entry(key) if c is None else c.call(key))

    async def get_many(self, keys: Iterable[str]) -> dict[str, JSONValue]:
        wanted = validate_keys(keys)
        self._check_open()
        if not wanted:
            return {}
        found = await self._get_many(wanted)
        if len(found) == len(wanted):  # all there: reorder in C
            return dict(zip(wanted, map(found.__getitem__, wanted), strict=True))
        return {k: found[k] for k in wanted if k in found}

    async def exists(self, key: str) -> bool:
        validate_key(key)
        self._check_open()
        c = self._c_exists
        return await (self._exists(key) if c is None else c.call(key))

    async def ttl(self, key: str) -> float | None:
        validate_key(key)
        self._check_open()
        return await self._ttl(key)

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
        return await self._keys(prefix, part, lim, after)

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
                value = await self._get(glob.literal)
                return {} if value is MISSING else {glob.literal: value}
            entry = await self._get_entry(glob.literal)
            if entry is None or entry.partition != part:
                return {}
            return {entry.key: entry.value}
        return await self._search(glob, part, lim)

    async def partitions(self) -> list[str]:
        self._check_open()
        return await self._partitions()

    async def stats(self) -> StoreStats:
        self._check_open()
        return await self._stats()

    async def health(self) -> Health:
        if self.closed:
            return Health(
                ok=False,
                backend=self.backend_name,
                latency_ms=None,
                details={"error": "store is closed", "namespace": self._namespace},
            )
        start = time.perf_counter()
        try:
            details = await self._health()
        except Exception as exc:  # health() never raises
            return Health(
                ok=False,
                backend=self.backend_name,
                latency_ms=None,
                details={"error": f"{type(exc).__name__}: {exc}", "namespace": self._namespace},
            )
        latency = (time.perf_counter() - start) * 1000.0
        ok = bool(details.pop("ok", True))
        details.setdefault("namespace", self._namespace)
        return Health(ok=ok, backend=self.backend_name, latency_ms=latency, details=details)

    # ---------------------------------------------------------------- writes

    async def set(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        keep_ttl: bool = False,
    ) -> Entry:
        validate_key(key)
        ttl_ms = validate_optional_ttl(ttl, keep_ttl)
        part = validate_optional_partition(partition)
        payload, exact = encode_value_ex(value, self._max_value_bytes)
        self._check_open()
        c = self._c_set
        if c is None:
            meta = await self._set(key, payload, ttl_ms, part, bool(keep_ttl))
        else:
            meta = await c.call(SetOp(key, payload, ttl_ms, part, bool(keep_ttl)))
        return Entry(key, stored_form(value, payload, exact), *meta)

    async def set_many(
        self,
        items: Mapping[str, JSONValue],
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
    ) -> int:
        if not isinstance(items, Mapping):
            raise InvalidArgumentError(
                f"items must be a mapping of key to value, not {type(items).__name__}"
            )
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        encode = self._encode
        if len(items) <= SET_MANY_CHUNK:
            chunk = [(validate_key(k), encode(v)) for k, v in items.items()]
            self._check_open()
            if not chunk:
                return 0
            return await self._set_many(iter([chunk]), ttl_ms, part)
        # Validate everything first (all or nothing), then encode again chunk by chunk.
        for k, v in items.items():
            validate_key(k)
            encode(v)
        self._check_open()
        return await self._set_many(_chunks(items, encode), ttl_ms, part)

    async def set_if_absent(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
    ) -> bool:
        validate_key(key)
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        payload = self._encode(value)
        self._check_open()
        return await self._set_if_absent(key, payload, ttl_ms, part)

    async def compare_and_set(
        self,
        key: str,
        value: JSONValue,
        *,
        version: int,
        ttl: TTL | None = None,
        partition: str | None = None,
    ) -> Entry:
        validate_key(key)
        expected = validate_version(version)
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        payload, exact = encode_value_ex(value, self._max_value_bytes)
        self._check_open()
        meta = await self._compare_and_set(key, payload, expected, ttl_ms, part)
        return Entry(key, stored_form(value, payload, exact), *meta)

    async def incr(
        self,
        key: str,
        amount: int | float = 1,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
    ) -> int | float:
        validate_key(key)
        delta = validate_amount(amount)
        ttl_ms = validate_optional_ttl(ttl)
        part = validate_optional_partition(partition)
        self._check_open()
        return await self._incr(key, delta, ttl_ms, part)

    async def delete(self, key: str) -> bool:
        validate_key(key)
        self._check_open()
        c = self._c_delete
        return await (self._delete(key) if c is None else c.call(key))

    async def delete_many(self, keys: Iterable[str]) -> int:
        wanted = validate_keys(keys)
        self._check_open()
        if not wanted:
            return 0
        return await self._delete_many(wanted)

    async def expire(self, key: str, ttl: TTL) -> bool:
        validate_key(key)
        ttl_ms = validate_ttl(ttl)
        self._check_open()
        return await self._expire(key, ttl_ms)

    async def persist(self, key: str) -> bool:
        validate_key(key)
        self._check_open()
        return await self._expire(key, None)

    async def clear_partition(self, partition: str) -> int:
        part = validate_partition(partition)
        self._check_open()
        return await self._clear(part)

    async def clear(self) -> int:
        self._check_open()
        return await self._clear(None)

    async def cleanup_expired(self) -> int:
        self._check_open()
        return await self._cleanup_expired()

    # ---------------------------------------------------------------- hooks

    @abc.abstractmethod
    async def _get(self, key: str) -> Any:
        """The decoded live value of ``key``, or :data:`MISSING`."""

    @abc.abstractmethod
    async def _get_entry(self, key: str) -> Entry | None: ...

    @abc.abstractmethod
    async def _get_many(self, keys: list[str]) -> dict[str, Any]:
        """Live values of ``keys`` (distinct); any order, missing keys omitted."""

    @abc.abstractmethod
    async def _exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def _ttl(self, key: str) -> float | None:
        """Seconds left; raise ``KeyNotFoundError`` for a missing or expired key."""

    @abc.abstractmethod
    async def _keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]: ...

    @abc.abstractmethod
    async def _search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        """Live entries matching ``pattern`` (which has a wildcard), ascending by key."""

    @abc.abstractmethod
    async def _partitions(self) -> list[str]: ...

    @abc.abstractmethod
    async def _stats(self) -> StoreStats: ...

    @abc.abstractmethod
    async def _health(self) -> dict[str, Any]:
        """Check the backend; return details (an ``ok`` item set to False marks it unhealthy)."""

    @abc.abstractmethod
    async def _set(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None, keep_ttl: bool
    ) -> EntryMeta: ...

    @abc.abstractmethod
    async def _set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
    ) -> int:
        """Write every chunk (keys distinct within the whole call); return the count."""

    @abc.abstractmethod
    async def _set_if_absent(
        self, key: str, payload: bytes, ttl_ms: int | None, partition: str | None
    ) -> bool: ...

    @abc.abstractmethod
    async def _compare_and_set(
        self, key: str, payload: bytes, version: int, ttl_ms: int | None, partition: str | None
    ) -> EntryMeta:
        """Raise ``VersionConflictError(key, version, current)`` on a mismatch."""

    @abc.abstractmethod
    async def _incr(
        self, key: str, amount: int | float, ttl_ms: int | None, partition: str | None
    ) -> int | float: ...

    @abc.abstractmethod
    async def _delete(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def _delete_many(self, keys: list[str]) -> int: ...

    @abc.abstractmethod
    async def _expire(self, key: str, ttl_ms: int | None) -> bool:
        """Set (``ttl_ms``) or remove (``None``) the expiry of a live key."""

    @abc.abstractmethod
    async def _clear(self, partition: str | None) -> int:
        """Delete the namespace's entries (of ``partition`` when given); count the live ones."""

    @abc.abstractmethod
    async def _cleanup_expired(self) -> int: ...

    @abc.abstractmethod
    async def _aclose(self) -> None:
        """Release what this store created (never an injected client or pool)."""

    # ---------------------------------------------------------------- batch hooks
    # Used to merge concurrent single-key calls. The defaults are correct but make one call per
    # item; a backend that sets ``coalesce_max_inflight`` overrides them with one round trip.

    async def _get_entries(self, keys: list[str]) -> dict[str, Entry]:
        """Live entries of ``keys`` (distinct); missing keys omitted."""
        out: dict[str, Entry] = {}
        for key in keys:
            entry = await self._get_entry(key)
            if entry is not None:
                out[key] = entry
        return out

    async def _get_entries_ttl(self, keys: list[str]) -> dict[str, tuple[Entry, int | None]]:
        """Live entries of ``keys`` (distinct) with their remaining life in milliseconds
        measured **on the server's clock** (None: persistent); missing keys omitted.

        A cache in front of this store (``HybridStore``) sizes its TTLs with it. The default
        reads the local clock, which is the server's clock only for embedded stores (memory,
        SQLite); a store with a server of its own overrides it and computes the remaining life
        where the expiry is measured.
        """
        entries = await self._get_entries(keys)
        now = datetime.now(timezone.utc)
        out: dict[str, tuple[Entry, int | None]] = {}
        for key, entry in entries.items():
            left = None
            if entry.expires_at is not None:
                left = max(0, int((entry.expires_at - now).total_seconds() * 1000))
            out[key] = (entry, left)
        return out

    async def _set_batch(self, ops: list[SetOp]) -> list[EntryMeta | BaseException]:
        """Apply ``ops`` (distinct keys), each exactly as ``_set`` would; one result per op."""
        out: list[EntryMeta | BaseException] = []
        for op in ops:
            try:
                out.append(await self._set_op(op))
            except Exception as exc:
                out.append(exc)
        return out

    async def _delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        """Delete ``keys`` (distinct); for each, whether a live entry existed."""
        out: list[bool | BaseException] = []
        for key in keys:
            try:
                out.append(await self._delete(key))
            except Exception as exc:
                out.append(exc)
        return out

    async def _set_op(self, op: SetOp) -> EntryMeta:
        return await self._set(op.key, op.payload, op.ttl_ms, op.partition, op.keep_ttl)

    # Merged reads may repeat a key; the hooks above take distinct keys.

    async def _get_batch(self, keys: list[str]) -> list[Any]:
        found = await self._get_many(list(dict.fromkeys(keys)))
        return [found.get(key, MISSING) for key in keys]

    async def _get_entry_batch(self, keys: list[str]) -> list[Entry | None]:
        found = await self._get_entries(list(dict.fromkeys(keys)))
        return [found.get(key) for key in keys]

    async def _exists_batch(self, keys: list[str]) -> list[bool]:
        found = await self._get_entries(list(dict.fromkeys(keys)))
        return [key in found for key in keys]


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
