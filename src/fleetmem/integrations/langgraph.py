"""LangGraph's long-term memory on fleetmem: :class:`FleetmemStore`, a ``BaseStore``.

Swap it in where a LangGraph store is built (the ``langgraph`` extra)::

    from fleetmem.integrations.langgraph import FleetmemStore

    store = FleetmemStore.from_url("postgresql://pg/app", namespace="memories")
    graph = builder.compile(store=store)

or adopt a fleetmem store already open (``FleetmemStore(await open_store(...))``). Every
fleetmem backend works the same way; ``docs/langgraph.md`` has the mapping and what differs
from LangGraph's own stores.

**Mapping.** An item ``(namespace, key)`` is the fleetmem entry whose key is each label
followed by ``/``, then ``/``, then the item's key: ``("users", "u1"), "prefs"`` is
``users/u1//prefs``. In labels ``%``, ``/`` and control characters are written ``%XX``; in the
key ``%`` and control characters are. Labels are never empty (LangGraph's rule), so the first
``//`` ends the namespace, a namespace prefix is a key prefix ending in ``/`` (a search under
``("a", "b")`` never reaches ``("a", "bc")``), and every label LangGraph accepts round-trips.
The value is the item's mapping, stored as is. An item with a TTL lives in the partition
``ttl:<minutes>`` (the length a read's refresh gives it again); one without in ``default``.
The whole key is at most 1024 UTF-8 bytes (fleetmem's key limit): a longer one is refused with
:class:`~fleetmem.errors.InvalidKeyError` before any I/O.

**Stricter than LangGraph's stores** (documented in ``docs/langgraph.md``): an expired item is
never returned, listed or counted, whatever ``omit_expired`` says (expiry is the backend's own,
no sweeper is needed); bad input -- a label with ``.``, an unknown filter operator, a negative
limit, a non-positive TTL -- is refused before any I/O, so nothing of the batch is written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from operator import attrgetter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar, cast

from fleetmem._codec import encode_value
from fleetmem._validate import KEY_CEILING, validate_key, validate_namespace, validate_ttl
from fleetmem.errors import (
    InvalidArgumentError,
    InvalidKeyError,
    MissingDependencyError,
    StoreClosedError,
)

try:
    from langgraph.store.base import (
        NOT_PROVIDED,
        BaseStore,
        GetOp,
        Item,
        ListNamespacesOp,
        MatchCondition,
        NotProvided,
        Op,
        PutOp,
        Result,
        SearchItem,
        SearchOp,
        TTLConfig,
    )
    from langgraph.store.base import InvalidNamespaceError as _LangGraphNamespaceError
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependencyError(exc.name or "langgraph", "langgraph") from None

if TYPE_CHECKING:
    from fleetmem.protocol import Entry
    from fleetmem.store import Store

__all__ = [
    "FleetmemStore",
    "InvalidNamespaceError",
    "TTLConfig",
    "UnsupportedFeatureWarning",
    "item_key",
    "split_item_key",
]

_T = TypeVar("_T")

#: The partition of an item written with a TTL: ``ttl:`` and its minutes.
TTL_PARTITION_PREFIX = "ttl:"
#: The partition of an item without a TTL (fleetmem's default partition).
PLAIN_PARTITION = "default"
#: Entries read per statement when a search walks a namespace prefix.
SEARCH_PAGE = 1000
#: Keys read per statement when listing namespaces (the walk jumps past each namespace).
LIST_PAGE = 64
#: The longest TTL in minutes (fleetmem's longest, 100 years).
_MAX_TTL_MINUTES = 100 * 365 * 24 * 60
#: The shortest TTL in minutes (fleetmem's shortest, one millisecond).
_MIN_TTL_MINUTES = 0.001 / 60

_UPDATED_AT = attrgetter("updated_at")
_SURROGATE = re.compile("[\ud800-\udfff]")
_OPERATORS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_CONTROL = [chr(c) for c in range(0x20)] + ["\x7f"]
_LABEL_TABLE = str.maketrans({c: f"%{ord(c):02X}" for c in [*_CONTROL, "%", "/"]})
_KEY_TABLE = str.maketrans({c: f"%{ord(c):02X}" for c in [*_CONTROL, "%"]})


class InvalidNamespaceError(InvalidKeyError, _LangGraphNamespaceError):
    """A namespace LangGraph does not allow: empty (for a write), a label that is not a
    non-empty ``str``, holds ``.`` or NUL, or a root label ``langgraph``. Both fleetmem's
    :class:`~fleetmem.errors.InvalidKeyError` and LangGraph's ``InvalidNamespaceError``."""


class UnsupportedFeatureWarning(UserWarning):
    """A LangGraph feature fleetmem does not provide (vector search): the argument is
    ignored. Warned once per :class:`FleetmemStore` and feature."""


# ------------------------------------------------------------------------------- keys


def _labels(namespace: object) -> tuple[str, ...]:
    if not isinstance(namespace, tuple):
        raise InvalidNamespaceError(
            f"a namespace is a tuple of str, not {type(namespace).__name__}"
        )
    for label in namespace:
        if not isinstance(label, str):
            raise InvalidNamespaceError(
                f"namespace labels must be str, not {type(label).__name__} in {namespace!r}"
            )
        if not label:
            raise InvalidNamespaceError(f"namespace labels cannot be empty: {namespace!r}")
        if "." in label or "\x00" in label:
            raise InvalidNamespaceError(
                f"namespace labels cannot hold '.' or NUL: {label!r} in {namespace!r}"
            )
        if _SURROGATE.search(label) is not None:
            raise InvalidNamespaceError(
                f"namespace labels cannot hold a lone surrogate (no UTF-8 text can): "
                f"{label!r} in {namespace!r}"
            )
    return namespace


def _write_namespace(namespace: object) -> tuple[str, ...]:
    labels = _labels(namespace)
    if not labels:
        raise InvalidNamespaceError("the namespace of an item cannot be empty")
    if labels[0] == "langgraph":
        raise InvalidNamespaceError(f"the root label cannot be 'langgraph': {labels!r}")
    return labels


def _checked(full: str) -> str:
    """``full`` if it is within fleetmem's key limit (checked for every op of a batch before
    any of them runs, so an over-long key cannot fail halfway through the writes)."""
    return validate_key(full)


def _item_key_str(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidKeyError(f"an item's key must be a str, not {type(key).__name__}")
    return key


def _prefix(labels: tuple[str, ...]) -> str:
    return "".join([label.translate(_LABEL_TABLE) + "/" for label in labels])


def _encode(labels: tuple[str, ...], key: str) -> str:
    """The fleetmem key of the item ``key`` in the namespace ``labels`` (checked labels)."""
    return _prefix(labels) + "/" + key.translate(_KEY_TABLE)


def item_key(namespace: tuple[str, ...], key: str) -> str:
    """The fleetmem key of LangGraph's item ``(namespace, key)`` (see the module's mapping);
    checks the labels as LangGraph does, not the key's length."""
    return _encode(_labels(namespace), _item_key_str(key))


def _unescape(text: str) -> str:
    if "%" not in text:
        return text
    parts = text.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        out.append(chr(int(part[:2], 16)) + part[2:])
    return "".join(out)


def split_item_key(full: str) -> tuple[tuple[str, ...], str] | None:
    """``(namespace, key)`` of a fleetmem key :func:`item_key` made; ``None`` for any other."""
    end = full.find("//")
    if end <= 0:
        return None
    try:
        labels = tuple([_unescape(part) for part in full[:end].split("/")])
        key = _unescape(full[end + 2 :])
    except ValueError:
        return None
    if "%" in full and _encode(labels, key) != full:
        return None  # escapes the adapter never writes ('%41', lowercase hex): not an item
    return labels, key


# ---------------------------------------------------------------------------- filters

_MISSING: Any = object()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: ``true`` is not ``1``, numbers compare as numbers (exactly,
    ``1 == 1.0``; big integers without rounding), objects by their members, arrays in order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return False


def _ordered(value: Any, operand: Any) -> int | None:
    """-1, 0 or 1 comparing ``value`` to ``operand`` (numbers with numbers, strings with
    strings by code point); ``None`` when they are not of one ordered kind."""
    if isinstance(operand, str):
        if not isinstance(value, str):
            return None
    elif not _is_number(value):
        return None
    return int(value > operand) - int(value < operand)


def _condition(field: str, operator: str, operand: Any) -> Callable[[Any], bool]:
    if operator == "$eq":
        return lambda v: v is not _MISSING and _json_equal(v, operand)
    if operator == "$ne":
        return lambda v: v is _MISSING or not _json_equal(v, operand)
    if not (
        isinstance(operand, str)
        or (_is_number(operand) and (isinstance(operand, int) or math.isfinite(operand)))
    ):
        raise InvalidArgumentError(
            f"filter {field!r}: {operator} compares with a finite number or a string, "
            f"not {operand!r}"
        )
    if operator == "$gt":
        return lambda v: (c := _ordered(v, operand)) is not None and c > 0
    if operator == "$gte":
        return lambda v: (c := _ordered(v, operand)) is not None and c >= 0
    if operator == "$lt":
        return lambda v: (c := _ordered(v, operand)) is not None and c < 0
    return lambda v: (c := _ordered(v, operand)) is not None and c <= 0


def compile_filter(flt: object) -> Callable[[Any], bool] | None:
    """A predicate on an item's value for a ``SearchOp`` filter (``None``: no filter).

    Each member names a top-level field of the value. A plain value, or a mapping without
    ``$`` members, must equal the field as JSON values; a mapping with ``$`` members holds
    operators, all of which must hold: ``$eq``, ``$ne`` (true too when the field is
    missing), ``$gt``/``$gte``/``$lt``/``$lte`` (a number compared with numbers, exactly --
    big integers too --, or a string compared with strings by code point; a field of
    another kind, or missing, does not match). An unknown operator, or an order operator
    with another operand, raises :class:`~fleetmem.errors.InvalidArgumentError`."""
    if flt is None:
        return None
    if not isinstance(flt, Mapping):
        raise InvalidArgumentError(f"a search filter is a mapping, not {type(flt).__name__}")
    checks: list[tuple[str, Callable[[Any], bool]]] = []
    for field, wanted in flt.items():
        if not isinstance(field, str):
            raise InvalidArgumentError(f"filter fields are str, not {type(field).__name__}")
        if isinstance(wanted, Mapping) and any(
            isinstance(k, str) and k.startswith("$") for k in wanted
        ):
            for operator, operand in wanted.items():
                if operator not in _OPERATORS:
                    raise InvalidArgumentError(
                        f"filter {field!r}: unknown operator {operator!r} "
                        f"(expected one of {', '.join(sorted(_OPERATORS))})"
                    )
                checks.append((field, _condition(field, operator, operand)))
        else:
            checks.append((field, _condition(field, "$eq", wanted)))
    if not checks:
        return None

    def matches(value: Any) -> bool:
        if not isinstance(value, Mapping):
            return all(check(_MISSING) for _, check in checks)
        return all(check(value.get(field, _MISSING)) for field, check in checks)

    return matches


# ------------------------------------------------------------------------------- plans


def _non_negative(what: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgumentError(f"{what} must be an int >= 0, not {value!r}")
    return value


def _ttl_minutes(ttl: object) -> float | None:
    if ttl is None:
        return None
    if not _is_number(ttl):
        raise InvalidArgumentError(f"ttl is a number of minutes or None, not {ttl!r}")
    # fleetmem's TTLs run from one millisecond to 100 years (compared before any float
    # conversion, which an int beyond a float's range would overflow).
    if not (_MIN_TTL_MINUTES <= ttl <= _MAX_TTL_MINUTES):  # type: ignore[operator]
        raise InvalidArgumentError(
            f"ttl must be at least one millisecond ({_MIN_TTL_MINUTES:.3g} minutes) and at "
            f"most {_MAX_TTL_MINUTES} minutes, not {ttl!r}"
        )
    return float(ttl)  # type: ignore[arg-type]


def _placement(minutes: float | None) -> tuple[float | None, str]:
    """The TTL in seconds and the partition of an item written with ``minutes``."""
    if minutes is None:
        return None, PLAIN_PARTITION
    return minutes * 60, f"{TTL_PARTITION_PREFIX}{minutes!r}"


def _ttl_of(entry: Entry) -> float | None:
    """The minutes an item's read refresh gives it again, from its partition."""
    if entry.expires_at is None or not entry.partition.startswith(TTL_PARTITION_PREFIX):
        return None
    try:
        minutes = float(entry.partition[len(TTL_PARTITION_PREFIX) :])
    except ValueError:
        return None
    return minutes if math.isfinite(minutes) and minutes > 0 else None


async def _refresh(store: Store[Any], entry: Entry, minutes: float) -> None:
    """Give a read item its TTL again -- only while it is the version that was read, so a
    write landing between the read and the refresh keeps the expiry it set (a put without a
    TTL stays persistent). The version check is atomic on every backend."""
    await store.kv.expire(entry.key, validate_ttl(minutes * 60), entry.version)


class _Get(NamedTuple):
    slot: int
    namespace: tuple[str, ...]
    key: str
    full: str | None  # None: the empty namespace, which holds no item
    refresh: bool


class _Put(NamedTuple):
    namespace: tuple[str, ...]
    key: str
    full: str
    value: dict[str, Any] | None
    minutes: float | None


class _Search(NamedTuple):
    slot: int
    prefix: str
    matches: Callable[[Any], bool] | None
    limit: int
    offset: int
    refresh: bool


class _List(NamedTuple):
    slot: int
    start: str
    conditions: tuple[MatchCondition, ...]
    max_depth: int | None
    limit: int
    offset: int


_Read = _Get | _Search | _List


def _matches(condition: MatchCondition, labels: tuple[str, ...]) -> bool:
    path = condition.path
    if len(labels) < len(path):
        return False
    pairs = (
        zip(labels, path, strict=False)
        if condition.match_type == "prefix"
        else zip(reversed(labels), reversed(path), strict=False)
    )
    return all(p == "*" or k == p for k, p in pairs)


def _search_item_slow(labels: tuple[str, ...], key: str, entry: Entry) -> SearchItem:
    return SearchItem(
        namespace=labels,
        key=key,
        value=entry.value,
        created_at=entry.created_at,
        updated_at=entry.updated_at,
    )


def _search_item_fast(labels: tuple[str, ...], key: str, entry: Entry) -> SearchItem:
    """:func:`_search_item_slow` without ``Item.__init__``'s conversions (none applies:
    the timestamps are datetimes and the namespace a tuple), a third of its cost; used only
    while LangGraph's items have exactly the slots it sets (checked at import)."""
    item = _NEW_ITEM(SearchItem)
    item.value = entry.value
    item.key = key
    item.namespace = labels
    item.created_at = entry.created_at
    item.updated_at = entry.updated_at
    item.score = None
    return item


_NEW_ITEM = SearchItem.__new__
_search_item = (
    _search_item_fast
    if getattr(Item, "__slots__", None) == ("value", "key", "namespace", "created_at", "updated_at")
    and getattr(SearchItem, "__slots__", None) == ("score",)
    else _search_item_slow
)


# ------------------------------------------------------------------------------- loops

#: How often a caller waiting for a call handed to another loop checks that loop still runs.
_POLL_SECONDS = 0.5


async def _handed_over(
    home: asyncio.AbstractEventLoop, make: Callable[[], Coroutine[Any, Any, _T]]
) -> _T:
    """``make()`` run on ``home`` (another thread's loop), awaited here; a
    :class:`~fleetmem.errors.StoreClosedError` when ``home`` is not running or stops before
    the call ends, never a wait for good."""
    if home.is_closed() or not home.is_running():
        raise StoreClosedError("the event loop this FleetmemStore runs on is closed or not running")
    future = asyncio.run_coroutine_threadsafe(make(), home)
    waiter = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=_POLL_SECONDS)
            if done:
                return waiter.result()
            if not home.is_running():
                future.cancel()
                raise StoreClosedError(
                    "the event loop this FleetmemStore runs on stopped during the call"
                )
    except asyncio.CancelledError:
        future.cancel()
        raise


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The adapter's own loop thread: runs until stopped, lets calls submitted just before
    the stop finish (they refuse, the adapter being closed), then closes the loop."""
    try:
        loop.run_forever()
    finally:
        try:
            for _ in range(3):
                loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join()


def _close_on_a_loop_of_its_own(store: Store[Any]) -> None:
    """Close ``store`` whose event loop has ended (best effort: it frees what an embedded
    store holds; a server connection of the dead loop cannot be ended from another)."""
    with contextlib.suppress(Exception):
        asyncio.run(store.close())


# ------------------------------------------------------------------------------- store


class FleetmemStore(BaseStore):
    """A LangGraph ``BaseStore`` on a fleetmem store (see the module docstring).

    ``FleetmemStore(store)`` adopts an open fleetmem store (closing the adapter leaves it
    open); :meth:`from_url` opens one on first use and owns it. Both take ``ttl=``, a
    LangGraph ``TTLConfig``: ``default_ttl`` (minutes) for writes that name no TTL,
    ``refresh_on_read`` (default ``True``) for reads that do not say; ``omit_expired`` is
    accepted and has no effect (expired items are never returned); ``sweep_interval_minutes``
    is accepted and has no effect (no sweeper is needed).

    The async methods run on the event loop the fleetmem store belongs to: the running
    loop when the adapter is created (or the first one to use it); a call from another
    loop is handed to it. The sync methods (``get``, ``put``, ``batch``, ...) work from any
    thread but that loop's (there they raise ``asyncio.InvalidStateError``, as LangGraph's
    async stores do); used only synchronously, the adapter runs a loop thread of its own,
    stopped by :meth:`close`.
    """

    supports_ttl = True
    _store: Store[Any] | None
    _loop: asyncio.AbstractEventLoop | None
    _thread: threading.Thread | None
    _opener: tuple[str | None, str, dict[str, Any]] | None
    _opening: asyncio.Future[Store[Any]] | None

    def __init__(self, store: Store[Any], *, ttl: TTLConfig | None = None) -> None:
        from fleetmem.store import Store

        if not isinstance(cast(object, store), Store):
            raise InvalidArgumentError(
                f"FleetmemStore adopts a fleetmem store, not {type(store).__name__}"
            )
        self._setup(ttl)
        self._store = store
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    def _setup(self, ttl: TTLConfig | None) -> None:
        self.ttl_config = self._check_ttl_config(ttl)
        cfg = self.ttl_config or {}
        self._default_ttl = _ttl_minutes(cfg.get("default_ttl"))
        self._refresh_default = bool(cfg.get("refresh_on_read", True))
        self._store = None
        self._opener = None
        self._opening = None
        self._owned = False
        self._loop = None
        self._thread = None
        self._lock = threading.RLock()
        self._warned: set[str] = set()
        self._closed = False
        self._left_behind: Store[Any] | None = None

    @staticmethod
    def _check_ttl_config(ttl: object) -> TTLConfig | None:
        if ttl is None:
            return None
        if not isinstance(ttl, Mapping):
            raise InvalidArgumentError(f"ttl must be a TTLConfig (a dict), not {ttl!r}")
        known = {"default_ttl", "refresh_on_read", "omit_expired", "sweep_interval_minutes"}
        unknown = sorted(set(ttl) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown TTLConfig field(s): {', '.join(unknown)}")
        for flag in ("refresh_on_read", "omit_expired"):
            if flag in ttl and not isinstance(ttl[flag], bool):
                raise InvalidArgumentError(f"TTLConfig {flag} must be a bool")
        interval = ttl.get("sweep_interval_minutes")
        if interval is not None and not _is_number(interval):
            raise InvalidArgumentError("TTLConfig sweep_interval_minutes must be a number")
        _ttl_minutes(ttl.get("default_ttl"))
        return TTLConfig(**ttl)  # type: ignore[typeddict-item]

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        namespace: str = "langgraph",
        ttl: TTLConfig | None = None,
        **options: Any,
    ) -> FleetmemStore:
        """An adapter that opens ``open_store(url, namespace=namespace, **options)`` on first
        use and closes it with :meth:`close`/:meth:`aclose` (or the context managers).

        ``url`` is any fleetmem URL (``None``: the ``FLEETMEM_*`` settings, else the embedded
        SQLite default); ``namespace`` is the fleetmem namespace holding every item
        (``langgraph`` unless given). Nothing is opened here: no I/O."""
        self = cls.__new__(cls)
        self._setup(ttl)
        if url is not None and not isinstance(url, str):
            raise InvalidArgumentError(f"url must be a str, not {type(url).__name__}")
        self._opener = (url, validate_namespace(namespace), dict(options))
        self._owned = True
        return self

    def __repr__(self) -> str:
        inner = repr(self._store) if self._store is not None else "unopened"
        return f"FleetmemStore({inner})"

    @property
    def store(self) -> Store[Any] | None:
        """The fleetmem store under the adapter (``None`` before :meth:`from_url`'s opens)."""
        return self._store

    # ---------------------------------------------------------------- loops

    def _home(self) -> asyncio.AbstractEventLoop | None:
        """The loop the fleetmem store runs on, or ``None`` when it is the running one
        (bound here when the adapter has none yet). A store :meth:`from_url` opened on a
        loop that has since closed (an ``asyncio.run`` that returned) is left behind and a
        new one is opened on the running loop; an adopted store cannot be, and refuses."""
        loop = asyncio.get_running_loop()
        home = self._loop
        if home is loop:
            return None
        with self._lock:
            home = self._loop
            if home is None:
                self._loop = home = loop
            elif home.is_closed() and self._owned and self._thread is None and not self._closed:
                self._left_behind, self._store = self._store, None
                self._opening = None
                self._loop = home = loop
        return None if home is loop else home

    async def _on_home(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        home = self._home()
        if home is None:
            return await make()
        return await _handed_over(home, make)

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_run_loop, args=(loop,), name="fleetmem-langgraph", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
                # An adapter dropped without close() must not leave its thread running.
                weakref.finalize(self, _stop_loop, loop, thread)
            return self._loop

    def _sync(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        with self._lock:
            # Checked and submitted under the lock close() takes before it stops the
            # adapter's thread, so no call is submitted to a loop that is going away.
            if self._closed:
                raise StoreClosedError("this FleetmemStore is closed")
            home = self._loop if self._loop is not None else self._private_loop()
            if home is running:
                raise asyncio.InvalidStateError(
                    "a synchronous FleetmemStore call on the event loop it runs on would block "
                    "that loop: use the async methods there (aget, aput, asearch, abatch, ...)"
                )
            if home.is_closed() or not home.is_running():
                raise StoreClosedError(
                    "the event loop this FleetmemStore runs on is closed or not running"
                )
            future = asyncio.run_coroutine_threadsafe(make(), home)
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                if future.done():
                    raise  # the call's own TimeoutError
                if not home.is_running():
                    future.cancel()
                    raise StoreClosedError(
                        "the event loop this FleetmemStore runs on stopped during the call"
                    ) from None

    def _ready(self) -> Store[Any] | None:
        """The open store, without a coroutine; ``None``: :meth:`_open` opens it or raises."""
        store = self._store
        return None if store is None or store.closed or self._closed else store

    async def _open(self) -> Store[Any]:
        if self._closed:
            raise StoreClosedError("this FleetmemStore is closed")
        store = self._store
        if store is not None:
            if store.closed:
                raise StoreClosedError("the fleetmem store under this FleetmemStore is closed")
            return store
        if self._opener is None:
            raise StoreClosedError(
                "the event loop this FleetmemStore's store runs on is closed: an adopted "
                "store cannot move to another loop"
            )
        if self._opening is None:
            url, namespace, options = self._opener
            self._opening = asyncio.ensure_future(self._connect(url, namespace, options))
        try:
            return await asyncio.shield(self._opening)
        except BaseException:
            if self._opening is not None and self._opening.done():
                self._opening = None
            raise

    async def _connect(self, url: str | None, namespace: str, options: dict[str, Any]) -> Any:
        from fleetmem.factory import open_store

        left, self._left_behind = self._left_behind, None
        if left is not None and not left.closed:
            await asyncio.to_thread(_close_on_a_loop_of_its_own, left)
        store = await open_store(url, namespace=namespace, **options)
        self._store = store
        return store

    # ---------------------------------------------------------------- lifecycle

    async def _close_here(self) -> None:
        self._closed = True
        if self._opening is not None and not self._opening.done():
            with contextlib.suppress(BaseException):
                await self._opening
        store = self._store
        if self._owned and store is not None:
            await store.close()

    def _stop_thread(self) -> None:
        with self._lock:
            self._closed = True
            thread, loop = self._thread, self._loop
            self._thread = None
        if thread is not None and loop is not None:
            _stop_loop(loop, thread)

    def _stranded(self) -> list[Store[Any]]:
        """Owned stores whose loop has closed: they can only be closed on a loop of their
        own (see :meth:`close`)."""
        if not self._owned:
            return []
        stores = [self._left_behind]
        if self._loop is not None and self._loop.is_closed():
            stores.append(self._store)
        return [s for s in stores if s is not None and not s.closed]

    async def aclose(self) -> None:
        """Close the fleetmem store if this adapter opened it (:meth:`from_url`), and stop
        the adapter's own loop thread if it started one. Idempotent; see :meth:`close`."""
        if self._loop is not None and not self._loop.is_closed() and not self._closed:
            await self._on_home(self._close_here)
        for store in self._stranded():
            await asyncio.to_thread(_close_on_a_loop_of_its_own, store)
        self._closed = True
        if self._thread is not None:
            await asyncio.to_thread(self._stop_thread)

    def close(self) -> None:
        """:meth:`aclose` for synchronous code (not on the adapter's event loop).

        Close the adapter before the event loop it runs on ends: once that loop is closed,
        an owned store is closed on a loop of its own, which frees an embedded store
        (memory, SQLite) but cannot end connections opened on the dead loop (PostgreSQL,
        Redis), whose sockets the process then drops when it exits."""
        if self._loop is not None and not self._loop.is_closed() and not self._closed:
            self._sync(self._close_here)
        for store in self._stranded():
            _close_on_a_loop_of_its_own(store)
        self._closed = True
        self._stop_thread()

    async def __aenter__(self) -> FleetmemStore:
        await self._on_home(self._open)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> FleetmemStore:
        self._sync(self._open)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def start_ttl_sweeper(
        self, sweep_interval_minutes: int | None = None
    ) -> asyncio.Future[None]:
        """Nothing to start: fleetmem expires items itself (an expired item is never read).
        Returns a finished future, for code written for LangGraph's stores."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def stop_ttl_sweeper(self, timeout: float | None = None) -> bool:
        """Nothing to stop (see :meth:`start_ttl_sweeper`); returns ``True``."""
        return True

    async def sweep_ttl(self) -> int:
        """Free the space of expired entries now (``cleanup_expired``); how many went.
        Never needed for correctness: expired items are not read in any case."""
        return await self._on_home(self._sweep_here)

    async def _sweep_here(self) -> int:
        return await (await self._open()).cleanup_expired()

    # ---------------------------------------------------------------- warnings

    def _warn_once(self, feature: str, message: str) -> None:
        if feature in self._warned:
            return
        self._warned.add(feature)
        warnings.warn(message, UnsupportedFeatureWarning, stacklevel=4)

    # ---------------------------------------------------------------- planning

    def _refresh(self, refresh: bool | None) -> bool:
        return self._refresh_default if refresh is None else bool(refresh)

    def _plan_get(self, index: int, op: GetOp) -> _Get:
        labels = _labels(op.namespace)
        key = _item_key_str(op.key)
        full = _checked(_encode(labels, key)) if labels else None
        return _Get(index, labels, key, full, bool(op.refresh_ttl))

    def _plan_put(self, op: PutOp) -> _Put | None:
        """The write of ``op``; ``None`` for a delete that cannot match an item (in the
        empty namespace, which LangGraph lets a delete name but never holds an item)."""
        value = op.value
        if value is None:
            labels = _labels(op.namespace)
            key = _item_key_str(op.key)
            if not labels:
                return None
            full = _checked(_encode(labels, key))
            return _Put(labels, key, full, None, None)
        labels = _write_namespace(op.namespace)
        key = _item_key_str(op.key)
        full = _checked(_encode(labels, key))
        if not isinstance(value, Mapping):
            raise InvalidArgumentError(
                f"an item's value is a mapping (None deletes it), not {type(value).__name__}"
            )
        if op.index not in (None, False):
            self._warn_once(
                "index",
                "FleetmemStore has no vector search: PutOp.index is ignored "
                "(the item is stored and found by get, filters and namespaces)",
            )
        return _Put(
            labels, key, full, value if type(value) is dict else dict(value), _ttl_minutes(op.ttl)
        )

    def _plan_search(self, index: int, op: SearchOp) -> _Search:
        labels = _labels(op.namespace_prefix)
        matches = compile_filter(op.filter)
        limit = _non_negative("limit", op.limit)
        offset = _non_negative("offset", op.offset)
        if op.query is not None:
            self._warn_once(
                "query",
                "FleetmemStore has no vector search: SearchOp.query is ignored "
                "(results are filtered and ordered as without a query)",
            )
        return _Search(index, _prefix(labels), matches, limit, offset, bool(op.refresh_ttl))

    def _plan_list(self, index: int, op: ListNamespacesOp) -> _List:
        conditions = tuple(op.match_conditions or ())
        start: tuple[str, ...] = ()
        for condition in conditions:
            if not (isinstance(condition, tuple) and len(condition) == 2):
                raise InvalidArgumentError(f"not a MatchCondition: {condition!r}")
            match_type, path = condition[0], condition[1]
            if match_type not in ("prefix", "suffix"):
                raise InvalidArgumentError(
                    f"match_type is 'prefix' or 'suffix', not {match_type!r}"
                )
            _labels(path)
            if match_type == "prefix":
                literal: list[str] = []
                for label in path:
                    if label == "*":
                        break
                    literal.append(label)
                if len(literal) > len(start):
                    start = tuple(literal)
        max_depth = op.max_depth
        if max_depth is not None and (
            not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 1
        ):
            raise InvalidArgumentError(f"max_depth must be an int >= 1 or None, not {max_depth!r}")
        return _List(
            index,
            _prefix(start),
            tuple(MatchCondition(c[0], c[1]) for c in conditions),
            max_depth,
            _non_negative("limit", op.limit),
            _non_negative("offset", op.offset),
        )

    def _plan(self, ops: Iterable[Op]) -> tuple[int, list[_Read], dict[str, _Put]]:
        reads: list[_Read] = []
        puts: dict[str, _Put] = {}
        count = 0
        for index, op in enumerate(ops):
            count += 1
            if isinstance(op, GetOp):
                reads.append(self._plan_get(index, op))
            elif isinstance(op, PutOp):
                put = self._plan_put(op)
                if put is not None:
                    puts.pop(put.full, None)  # the last write of a key wins, in its place
                    puts[put.full] = put
            elif isinstance(op, SearchOp):
                reads.append(self._plan_search(index, op))
            elif isinstance(op, ListNamespacesOp):
                reads.append(self._plan_list(index, op))
            else:
                raise InvalidArgumentError(f"not a LangGraph store op: {type(op).__name__}")
        return count, reads, puts

    # ---------------------------------------------------------------- execution

    async def _execute(self, plan: tuple[int, list[_Read], dict[str, _Put]]) -> list[Result]:
        count, reads, puts = plan
        store = await self._open()
        if puts and (reads or len(puts) > 1):
            # One write alone is checked by the store before its I/O; with more, every value
            # is checked before the first read or write, so none can fail halfway.
            limit = store.max_value_bytes
            for put in puts.values():
                if put.value is not None:
                    encode_value(put.value, limit)
        results: list[Result] = [None] * count
        if len(reads) == 1:
            results[reads[0].slot] = await self._read(store, reads[0])
        elif reads:
            # Reads first, all of them seeing the store before this batch's writes (as
            # LangGraph's stores do), concurrently: single gets merge into one round trip.
            done = await asyncio.gather(
                *[self._read(store, read) for read in reads], return_exceptions=True
            )
            for read, result in zip(reads, done, strict=True):
                if isinstance(result, BaseException):
                    raise result
                results[read.slot] = result
        if puts:
            await self._write(store, list(puts.values()))
        return results

    async def _read(self, store: Store[Any], read: _Read) -> Result:
        if isinstance(read, _Get):
            return await self._get(store, read)
        if isinstance(read, _Search):
            return await self._search(store, read)
        return await self._list(store, read)

    async def _get(self, store: Store[Any], get: _Get) -> Item | None:
        if get.full is None:
            return None
        entry = await store.get_entry(get.full)
        if entry is None:
            return None
        if get.refresh:
            minutes = _ttl_of(entry)
            if minutes is not None:
                await _refresh(store, entry, minutes)
        return Item(
            value=entry.value,
            key=get.key,
            namespace=get.namespace,
            created_at=entry.created_at,
            updated_at=entry.updated_at,
        )

    async def _put(self, store: Store[Any], put: _Put) -> None:
        """One ``aput``: one ``set`` (concurrent ones merge in the store's own write batches;
        merging them here into one ``set_many`` per tick, last write winning, was measured
        20% slower at 64 coroutines on PostgreSQL)."""
        ttl, partition = _placement(put.minutes)
        await store.set(put.full, put.value, ttl=ttl, partition=partition)

    async def _write(self, store: Store[Any], puts: list[_Put]) -> None:
        deletes = [put.full for put in puts if put.value is None]
        groups: dict[float | None, dict[str, Any]] = {}
        for put in puts:
            if put.value is not None:
                groups.setdefault(put.minutes, {})[put.full] = put.value
        if deletes:
            await store.delete_many(deletes)
        for minutes, items in groups.items():
            ttl, partition = _placement(minutes)
            if len(items) == 1:
                ((full, value),) = items.items()
                await store.set(full, value, ttl=ttl, partition=partition)
            else:
                await store.set_many(items, ttl=ttl, partition=partition)

    async def _search(self, store: Store[Any], search: _Search) -> list[SearchItem]:
        want = search.offset + search.limit
        if want == 0:
            return []
        if store.closed:
            raise StoreClosedError("the fleetmem store under this FleetmemStore is closed")
        kv = store.kv
        matches = search.matches
        # The best ``want`` matches, newest first, then by key: pages come in key order and
        # the sort is stable, so equal timestamps keep their key order across pages.
        kept: list[Entry] = []
        after: str | None = None
        while True:
            page = await kv.entries_page(search.prefix, after, SEARCH_PAGE)
            found = [
                entry
                for entry in page
                if entry.key.find("//") > 0 and (matches is None or matches(entry.value))
            ]
            if found:
                kept = sorted(kept + found, key=_UPDATED_AT, reverse=True)[:want]
            if len(page) < SEARCH_PAGE:
                break
            after = page[-1].key
        kept = kept[search.offset :]
        if search.refresh:
            refreshes = [
                _refresh(store, entry, minutes)
                for entry in kept
                if (minutes := _ttl_of(entry)) is not None
            ]
            if refreshes:
                await asyncio.gather(*refreshes)
        items: list[SearchItem] = []
        namespaces: dict[str, tuple[str, ...]] = {}
        for entry in kept:
            full = entry.key
            end = full.find("//")
            head = full[:end]
            try:
                labels = namespaces.get(head)
                if labels is None:
                    labels = namespaces[head] = tuple([_unescape(p) for p in head.split("/")])
                key = _unescape(full[end + 2 :])
            except ValueError:  # not written by the adapter: a stray '%'
                continue
            if "%" in full and _encode(labels, key) != full:
                continue  # escapes the adapter never writes: not an item
            items.append(_search_item(labels, key, entry))
        return items

    async def _list(self, store: Store[Any], plan: _List) -> list[tuple[str, ...]]:
        """Namespaces from the key index: one key per namespace is read, then the walk
        jumps past that namespace (past its whole subtree once ``max_depth`` cuts it)."""
        if plan.limit == 0:
            return []
        if store.closed:
            raise StoreClosedError("the fleetmem store under this FleetmemStore is closed")
        kv = store.kv
        out: list[tuple[str, ...]] = []
        skipped = 0
        after: str | None = None
        max_depth = plan.max_depth
        while True:
            keys = await kv.keys(plan.start, None, LIST_PAGE, after)
            for key in keys:
                if after is not None and key <= after:
                    continue
                end = key.find("//")
                parsed = split_item_key(key)
                if parsed is None:
                    after = key
                    continue
                labels = parsed[0]
                matched = all(_matches(c, labels) for c in plan.conditions)
                if max_depth is not None and len(labels) >= max_depth:
                    shown = labels[:max_depth]
                    if matched:
                        # Every namespace below cuts to the same one: skip the subtree.
                        cut = 0
                        for _ in range(max_depth):
                            cut = key.index("/", cut) + 1
                        after = key[:cut] + KEY_CEILING
                    else:
                        after = key[: end + 2] + KEY_CEILING
                else:
                    shown = labels
                    after = key[: end + 2] + KEY_CEILING
                if not matched:
                    continue
                if skipped < plan.offset:
                    skipped += 1
                    continue
                out.append(shown)
                if len(out) >= plan.limit:
                    return out
            if len(keys) < LIST_PAGE:
                return out

    # ---------------------------------------------------------------- BaseStore

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops``: every op is checked first (nothing happens on bad input); the reads
        run concurrently and see the store as it was before the batch's writes; then the
        writes, the last one of a key winning."""
        plan = self._plan(ops)
        return await self._on_home(lambda: self._execute(plan))

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """:meth:`abatch` from synchronous code (any thread but the adapter's event loop)."""
        plan = self._plan(ops)
        return self._sync(lambda: self._execute(plan))

    async def aget(
        self,
        namespace: tuple[str, ...],
        key: str,
        *,
        refresh_ttl: bool | None = None,
    ) -> Item | None:
        """The item ``(namespace, key)``, or ``None`` (missing or expired)."""
        get = self._plan_get(0, GetOp(namespace, str(key), self._refresh(refresh_ttl)))
        if self._home() is None:
            store = self._ready() or await self._open()
            return await self._get(store, get)
        return await self._on_home(lambda: self._run_get(get))

    async def _run_get(self, get: _Get) -> Item | None:
        return await self._get(await self._open(), get)

    def get(
        self,
        namespace: tuple[str, ...],
        key: str,
        *,
        refresh_ttl: bool | None = None,
    ) -> Item | None:
        """:meth:`aget` from synchronous code."""
        get = self._plan_get(0, GetOp(namespace, str(key), self._refresh(refresh_ttl)))
        return self._sync(lambda: self._run_get(get))

    def _search_op(
        self,
        namespace_prefix: tuple[str, ...],
        query: str | None,
        filter: dict[str, Any] | None,
        limit: int,
        offset: int,
        refresh_ttl: bool | None,
    ) -> list[Op]:
        return [
            SearchOp(namespace_prefix, filter, limit, offset, query, self._refresh(refresh_ttl))
        ]

    async def asearch(
        self,
        namespace_prefix: tuple[str, ...],
        /,
        *,
        query: str | None = None,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
        refresh_ttl: bool | None = None,
    ) -> list[SearchItem]:
        """The items under ``namespace_prefix`` matching ``filter``, newest first (see the
        module docstring and ``docs/langgraph.md``)."""
        ops = self._search_op(namespace_prefix, query, filter, limit, offset, refresh_ttl)
        if self._home() is None:
            plan = self._plan_search(0, cast(SearchOp, ops[0]))
            store = self._ready() or await self._open()
            return await self._search(store, plan)
        return cast("list[SearchItem]", (await self.abatch(ops))[0])

    def search(
        self,
        namespace_prefix: tuple[str, ...],
        /,
        *,
        query: str | None = None,
        filter: dict[str, Any] | None = None,
        limit: int = 10,
        offset: int = 0,
        refresh_ttl: bool | None = None,
    ) -> list[SearchItem]:
        """:meth:`asearch` from synchronous code."""
        ops = self._search_op(namespace_prefix, query, filter, limit, offset, refresh_ttl)
        return cast("list[SearchItem]", self.batch(ops)[0])

    @staticmethod
    def _list_op(
        prefix: tuple[str, ...] | None,
        suffix: tuple[str, ...] | None,
        max_depth: int | None,
        limit: int,
        offset: int,
    ) -> list[Op]:
        conditions = []
        if prefix:
            conditions.append(MatchCondition(match_type="prefix", path=prefix))
        if suffix:
            conditions.append(MatchCondition(match_type="suffix", path=suffix))
        return [ListNamespacesOp(tuple(conditions), max_depth, limit, offset)]

    async def alist_namespaces(
        self,
        *,
        prefix: tuple[str, ...] | None = None,
        suffix: tuple[str, ...] | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[tuple[str, ...]]:
        """The namespaces holding a live item, matched, cut and paged (see ``docs``)."""
        ops = self._list_op(prefix, suffix, max_depth, limit, offset)
        return cast("list[tuple[str, ...]]", (await self.abatch(ops))[0])

    def list_namespaces(
        self,
        *,
        prefix: tuple[str, ...] | None = None,
        suffix: tuple[str, ...] | None = None,
        max_depth: int | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[tuple[str, ...]]:
        """:meth:`alist_namespaces` from synchronous code."""
        ops = self._list_op(prefix, suffix, max_depth, limit, offset)
        return cast("list[tuple[str, ...]]", self.batch(ops)[0])

    async def aput(
        self,
        namespace: tuple[str, ...],
        key: str,
        value: Mapping[str, Any],
        index: Literal[False] | list[str] | None = None,
        *,
        ttl: float | NotProvided | None = NOT_PROVIDED,
    ) -> None:
        """Store ``value`` as the item ``(namespace, key)`` (``ttl`` in minutes; not given:
        the ``TTLConfig``'s ``default_ttl``; ``None``: no expiry)."""
        minutes = self._default_ttl if isinstance(ttl, NotProvided) else ttl
        put = self._plan_put(PutOp(namespace, str(key), value, index, minutes))
        assert put is not None  # a value is written, never skipped
        if self._home() is None:
            store = self._ready() or await self._open()
            await self._put(store, put)
            return
        await self._on_home(lambda: self._run_put(put))

    async def _run_put(self, put: _Put) -> None:
        await self._put(await self._open(), put)

    async def _run_write(self, puts: list[_Put]) -> None:
        await self._write(await self._open(), puts)

    async def adelete(self, namespace: tuple[str, ...], key: str) -> None:
        """Delete the item ``(namespace, key)`` (nothing happens when it is missing)."""
        put = self._plan_put(PutOp(namespace, str(key), None))
        if put is not None:
            await self._on_home(lambda: self._run_write([put]))

    def put(
        self,
        namespace: tuple[str, ...],
        key: str,
        value: Mapping[str, Any],
        index: Literal[False] | list[str] | None = None,
        *,
        ttl: float | NotProvided | None = NOT_PROVIDED,
    ) -> None:
        """:meth:`aput` from synchronous code."""
        minutes = self._default_ttl if isinstance(ttl, NotProvided) else ttl
        put = self._plan_put(PutOp(namespace, str(key), value, index, minutes))
        assert put is not None  # a value is written, never skipped
        self._sync(lambda: self._run_put(put))

    def delete(self, namespace: tuple[str, ...], key: str) -> None:
        """:meth:`adelete` from synchronous code."""
        put = self._plan_put(PutOp(namespace, str(key), None))
        if put is not None:
            self._sync(lambda: self._run_write([put]))
