"""``RedisKV``: the key-value primitive on Redis 7 (standalone or Cluster).

Key layout (see ``lua/kv/_lib.lua``): every key of a namespace starts with ``fm:{<ns>}:`` -- the
namespace is the cluster hash tag, so all of a namespace lives in one slot and each multi-key
script runs there; a ``{`` inside a user key comes after the tag and cannot move it.

* ``fm:{ns}:e:<key>`` -- one STRING per entry: a 19-byte binary header (partition name length,
  version, created, updated), the partition name and the JSON (``entries.py`` holds the one
  reader of that format). Native TTL is the expiry. A plain ``GET`` reads it in one round trip.
* ``fm:{ns}:b:<lo>`` and ``fm:{ns}:d`` -- the sorted key index, split into buckets of under
  128 members (small sorted sets, every score 0, ordered by the key's UTF-8 bytes = code-point
  order) that Redis keeps as compact listpacks; ``d`` holds each bucket's lower bound. ``keys``
  and ``search`` read a ``BYLEX`` range bucket after bucket, so their cost follows the result.
* ``fm:{ns}:x`` -- a sorted set of the keys that have (or had) a TTL, scored by expiry: entries
  that Redis expired natively are found there and dropped from the index lazily (never for
  correctness: every read path checks that the entry key still exists).
* ``fm:{ns}:c`` -- a hash of live entries per partition (exact once ``x`` is pruned).
* ``fm:{ns}:f`` and ``fm:{ns}:s`` -- the change feed: its flag (a hash) and its log (a stream),
  see ``changes.py``. Every write script gets both in ``KEYS`` and, when the flag is there,
  records its changes in the log in the same script (``lua/changes/_feed.lua``); without a
  feed a write pays one ``HMGET`` of a missing key.

Every write is one Lua script (``lua/kv/``: a function called with ``FCALL`` on a standalone
server, ``EVALSHA`` on a cluster; see ``scripts.py``), so value, version, index, counts and TTL
change atomically; timestamps come from the server's ``TIME``. Concurrent single-key calls beyond
``coalesce_max_inflight`` are merged into one ``MGET`` or one script call per batch.

Export and import (``fleetmem.portability``): an export reads one page per ``scan`` call (the
key index walked, each live entry read with its expiry in the same script), so each entry is
exact but the export is not one point-in-time view (``export_consistency = "per-entry"``); an
import writes a batch per ``import`` script call (``lua/kv/import.lua``), every expiry judged
on the server's ``TIME``; a replace is those calls page by page plus deletes between the pages,
not one transaction (``replace_is_atomic = False``).

The driver is :class:`~fleetmem.backends.redis.connector.RedisConnector`, shared by a backend
and its views: the client, the eviction-policy check, script calls, and the one place where
redis-py errors are translated. Failure handling: each call runs under a deadline (``timeout``,
default 2 s) with redis-py's own retry switched off. Reads, and writes that provably never left
the client (the connection could not be opened), are retried ``retries`` times within that
deadline; a write whose connection died or timed out while in flight raises
:class:`~fleetmem.errors.OutcomeUnknownError`.

A full server (``maxmemory`` reached under ``noeviction``) stays readable and deletable: the
reads are ``no-writes`` scripts or plain commands, the deletes and the index upkeep of reads
``allow-oom`` scripts (see ``scripts.py``). A write that would add data is refused by Redis
before it runs and raises :class:`~fleetmem.errors.BackendUnavailableError` (nothing written),
as PostgreSQL's "disk full" does. ``connect()`` refuses a server whose ``maxmemory-policy``
may evict fleetmem's keys (anything but ``noeviction``) unless ``allow_eviction=True``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

from fleetmem._validate import DEFAULT_PARTITION, GlobPattern, prefix_upper_bound
from fleetmem.backends.redis.changes import BlockingReads, RedisChanges
from fleetmem.backends.redis.connector import RedisConnector
from fleetmem.backends.redis.entries import (
    datetime_ms,
    entry_meta,
    entry_value,
    entry_values,
    export_lines,
    mark_payload,
    ms_datetime,
    parse_entries,
    parse_entry,
    partition_name,
)
from fleetmem.backends.redis.scripts import SCRIPTS, Script
from fleetmem.backends.seam import (
    MISSING,
    RESERVED_NAMESPACE_PREFIX,
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
    lease_lost,
)
from fleetmem.errors import (
    BackendUnavailableError,
    FleetmemError,
    InvalidArgumentError,
    KeyNotFoundError,
    LeaseLostError,
    NotANumberError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["RedisKV"]

_log = logging.getLogger("fleetmem.redis")

_SET, _SET_IF_ABSENT, _CAS, _INCR = (
    SCRIPTS["set"],
    SCRIPTS["set_if_absent"],
    SCRIPTS["compare_and_set"],
    SCRIPTS["incr"],
)
_GET_ENTRY, _GET_ENTRIES = SCRIPTS["get_entry"], SCRIPTS["get_entries"]
_EXISTS_MANY, _SET_MANY = SCRIPTS["exists_many"], SCRIPTS["set_many"]
_SET_BATCH, _DELETE_MANY = SCRIPTS["set_batch"], SCRIPTS["delete_many"]
_IMPORT = SCRIPTS["import"]
_EXPIRE, _SCAN = SCRIPTS["expire"], SCRIPTS["scan"]
_CLEAR, _PRUNE = SCRIPTS["clear"], SCRIPTS["prune"]
_NS_LIVE, _NS_REGISTER = SCRIPTS["ns_live"], SCRIPTS["ns_register"]
_NS_SUSPECT, _NS_FORGET = SCRIPTS["ns_suspect"], SCRIPTS["ns_forget"]
_NS_READY, _NS_BACKFILL = SCRIPTS["ns_ready"], SCRIPTS["ns_backfill"]
_NS_DUE = SCRIPTS["ns_due"]
#: The fenced twins of the writes (``scripts.FENCED``): the same arguments, then the fence's
#: lease name and token, checked first by the script (``lua/kv/_fence.lua``).
_F_SET, _F_SET_IF_ABSENT = SCRIPTS["fenced_set"], SCRIPTS["fenced_set_if_absent"]
_F_CAS, _F_INCR = SCRIPTS["fenced_compare_and_set"], SCRIPTS["fenced_incr"]
_F_SET_MANY, _F_DELETE_MANY = SCRIPTS["fenced_set_many"], SCRIPTS["fenced_delete_many"]

#: KEYS of the namespace registry's scripts: ``fm:{_fleetmem}:ns`` (a sorted set of the names),
#: ``fm:{_fleetmem}:nss`` (names suspected of being empty, scored by the server's time of the
#: suspicion) and ``fm:{_fleetmem}:nsm`` (the marker of a complete registry, see
#: :meth:`RedisKV._complete_registry`), in a slot of their own. No user namespace can be
#: ``_fleetmem``, so no namespace's keys share that prefix.
_REGISTRY = b"fm:{_fleetmem}:"
_REGISTRY_SET = _REGISTRY + b"ns"
#: The one key every namespace holding an indexed entry has (its counts hash), as a ``SCAN``
#: pattern and as the exact shape a match must have (an entry key such as
#: ``fm:{a}:e:x}:c`` matches the pattern too; namespace names never hold a brace).
_COUNTS_PATTERN = b"fm:{*}:c"
_COUNTS_KEY = re.compile(rb"fm:\{([A-Za-z0-9_.-]{1,64})\}:c")
#: Names per ``ns_backfill`` call.
_BACKFILL_BATCH = 1000
#: Seconds a process trusts its own registration of a namespace: within them its writes to
#: that namespace do not register it again.
REGISTRATION_TRUST = 300.0


def _boot_clock() -> Callable[[], float]:
    """The clock that measures the trust: ``CLOCK_BOOTTIME`` where there is one (Linux), which
    keeps counting while the machine is suspended, unlike ``time.monotonic()`` there (a process
    woken from a long suspend would otherwise trust a registration that the registry may have
    dropped in the meantime); ``time.monotonic()`` elsewhere (it counts suspends on macOS)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    if boottime is None:
        return time.monotonic
    try:
        time.clock_gettime(boottime)
    except OSError:  # pragma: no cover - a kernel without it
        return time.monotonic
    return functools.partial(time.clock_gettime, boottime)


#: Seconds on the clock that measures :data:`REGISTRATION_TRUST` (see :func:`_boot_clock`).
_trust_clock = _boot_clock()
#: Milliseconds a namespace must stay suspected of being empty (on the registry's server
#: clock) before a listing may drop it from the registry: three times the trust, so that no
#: writer still trusts a registration made before the suspicion.
FORGET_AFTER_MS = 900_000
#: Registry names a listing reads per page, and liveness checks it keeps in flight at once.
_NS_PAGE = 256
_NS_CONCURRENCY = 32
#: Aged suspicions a ``clear()`` settles on its way out (see :meth:`RedisKV._settle_suspicions`).
_NS_SETTLE = 32

#: Keys per MGET / script call in the batch operations.
_BATCH = 10_000
#: Items per unfenced ``set_many`` script call: the packed command is the driver's copy of the
#: values, so a slice keeps it a fifth of a ``set_many`` chunk (the round trips it adds cost
#: ~2%). A fenced ``set_many`` sends each front-end chunk (up to 10,000 items) as one call, so
#: that the chunk is atomic with its fence check (see :meth:`RedisKV._fenced_set_many`).
_SET_MANY_SLICE = 2000
#: Merged ``set`` calls per script call (five arguments each).
_OPS_BATCH = 1000
#: Import ops per ``import`` script call (four arguments each), and the stored bytes after
#: which a call goes out with fewer (values may be up to ``max_value_bytes`` each: a call
#: stays far below Redis's query buffer limit).
_IMPORT_OPS = 1000
_IMPORT_BYTES = 16 * 1024 * 1024
#: Modes of the ``import`` script (``lua/kv/import.lua``).
_MERGE, _MISSING, _REPLACE = b"m", b"a", b"r"
#: Index members a ``scan`` / ``clear`` / ``prune`` call looks at before handing back a cursor.
_SCAN_BUDGET = 5000
_KIND = {b'"': "str", b"{": "dict", b"[": "list", b"t": "bool", b"f": "bool", b"n": "NoneType"}


def _part_arg(partition: str | None) -> str:
    """``partition`` as the scripts take it: "" keeps, "=<name>" sets ("=" for default)."""
    if partition is None:
        return ""
    return "=" if partition == DEFAULT_PARTITION else "=" + partition


def _lost_midway(fence: Fence, done: int, what: str) -> LeaseLostError:
    """``LeaseLostError`` for a fenced ``set_many`` / ``delete_many`` refused after earlier
    script calls of it were applied: seam's wording, with "nothing was changed" replaced by
    what those calls did (``done`` items ``what``); the refused call and the rest changed
    nothing."""
    text = str(lease_lost(fence.name, fence.token))
    head = text.removesuffix("; nothing was changed")
    return LeaseLostError(
        f"{head}; {done:,} items were already {what}, which stay; the refused call and the "
        "rest changed nothing"
    )


class RedisKV(KVBackend):
    """Entries on Redis 7 without modules, standalone or Redis Cluster.

    Build it with :meth:`from_url` (``redis://``, ``rediss://``, ``unix://``) or from an
    injected ``redis.asyncio.Redis`` / ``RedisCluster`` client (created with
    ``decode_responses=False``), which the store then never closes.
    """

    backend_name = "redis"
    #: Concurrent get / get_entry / exists / set / delete calls beyond this many in flight are
    #: merged: one MGET or one script call per batch (see ``fleetmem._coalesce``).
    coalesce_max_inflight = 2

    def __init__(self, connector: RedisConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        #: Shared by every view: the client and what connect() learnt live there.
        self._connector = connector
        #: Shared by every view: namespace -> ``_trust_clock()`` when this process last sent
        #: its registration (see :meth:`namespaces`).
        self._registered: dict[str, float] = {}
        connector.on_new_server_run(self._forget_registrations)
        #: Shared by every view: the connections of the change feeds' blocking reads.
        self._blocking = BlockingReads(connector)
        self._bind_namespace()

    @classmethod
    def from_url(cls, url: str, *, namespace: str, **options: Any) -> RedisKV:
        """A backend for ``url`` (no I/O; ``connect()`` opens it); the options (``timeout``,
        ``retries``, ``cluster``, ``allow_eviction``, ``username``, ``password``, ``ssl_*``...)
        are those of :meth:`RedisConnector.from_url
        <fleetmem.backends.redis.connector.RedisConnector.from_url>`."""
        return cls(RedisConnector.from_url(url, **options), namespace=namespace)

    @property
    def connector(self) -> RedisConnector:
        """The driver: client, deadline and error translation, script calls (shared by
        every view of this backend)."""
        return self._connector

    def _bind_namespace(self) -> None:
        prefix = f"fm:{{{self._namespace}}}:"
        self._ep = prefix + "e:"
        # KEYS of every script call, encoded once: the namespace prefix (it routes the call to
        # the namespace's slot; the scripts derive every key from it); a write also declares
        # the two keys of the change feed it may record in (same slot).
        self._keys = (prefix.encode(),)
        self._wkeys = (*self._keys, *RedisChanges.feed_keys(self._namespace))
        # The constant head of the common ``set`` call, in both forms, and of a fenced one.
        self._set_head = RedisConnector.prepare(_SET, self._wkeys)
        self._fset_head = RedisConnector.prepare(_F_SET, self._wkeys)
        # The Notifier key of this namespace's change watchers, woken after every write.
        self._wake = ("changes", self._namespace)

    def leases(self) -> LeaseBackend:
        """Leases of this namespace on the same connector (``leases.py``)."""
        from fleetmem.backends.redis.leases import RedisLeases

        return RedisLeases(self._connector, namespace=self._namespace)

    def agents(self) -> AgentBackend:
        """The agent registry of this namespace on the same connector (``agents.py``)."""
        from fleetmem.backends.redis.agents import RedisAgents

        return RedisAgents(self._connector, namespace=self._namespace)

    def queues(self) -> QueueBackend:
        """The work queues of this namespace on the same connector (``queues.py``)."""
        from fleetmem.backends.redis.queues import RedisQueues

        return RedisQueues(self._connector, namespace=self._namespace)

    def changes(self) -> ChangeBackend:
        """The change feed of this namespace on the same connector (``changes.py``); this
        backend's writes record in it."""
        return RedisChanges(self._connector, namespace=self._namespace, blocking=self._blocking)

    def snapshots(self) -> SnapshotBackend:
        """The named snapshots of this namespace on the same connector (``snapshots.py``):
        under the namespace's hash tag, out of sight of every key-value read, count and
        ``clear``."""
        from fleetmem.backends.redis.snapshots import RedisSnapshots

        return RedisSnapshots(self._connector, namespace=self._namespace)

    def describe(self) -> str:
        return self._connector.describe()

    async def connect(self) -> None:
        """Reach the server (and find out whether it is a Cluster), then check its eviction
        policy unless ``allow_eviction`` (see :meth:`RedisConnector.connect`)."""
        await self._connector.connect()

    async def aclose(self) -> None:
        await self._blocking.aclose()
        await self._connector.aclose()

    # Plain functions returning the connector's coroutine: no coroutine layer of their own.
    def _exec(self, write: bool, *args: Any) -> Awaitable[Any]:
        return self._connector.execute(write, *args)

    def _script(self, write: bool, script: Script, *args: Any) -> Awaitable[Any]:
        keys = self._wkeys if write else self._keys  # every write may record a change
        return self._connector.call(script, keys, *args, write=write)

    def _changed(self) -> None:
        """After a write: wake this process's watchers of the namespace's feed (a change
        recorded by the write is theirs to read; without a feed nobody watches)."""
        self._connector.notifier.notify_every(self._wake)

    # ---------------------------------------------------------------- reads

    async def get(self, key: str) -> Any:
        raw = await self._connector.execute(False, "GET", self._ep + key)
        if raw is None:
            return MISSING
        return entry_value(raw)

    async def get_entry(self, key: str) -> Entry | None:
        res = await self._script(False, _GET_ENTRY, key)
        if res is None:
            return None
        return parse_entry(key, res[0], res[1])

    async def get_entries(self, keys: list[str]) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            res = await self._script(False, _GET_ENTRIES, *chunk)
            for i, key in enumerate(chunk):
                raw = res[2 * i]
                if raw is not None:
                    out[key] = parse_entry(key, raw, res[2 * i + 1])
        return out

    async def exists_batch(self, keys: list[str]) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(keys), _BATCH):
            res = await self._script(False, _EXISTS_MANY, *keys[start : start + _BATCH])
            out.extend(flag == 1 for flag in res)
        return out

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ep = self._ep
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            raws = await self._exec(False, "MGET", *[ep + k for k in chunk])
            for key, value in zip(chunk, entry_values(raws, MISSING), strict=True):
                if value is not MISSING:
                    out[key] = value
        return out

    async def get_batch(self, keys: list[str]) -> list[Any]:
        """Values of merged ``get`` calls, in order (one MGET)."""
        ep = self._ep
        out: list[Any] = []
        for start in range(0, len(keys), _BATCH):
            raws = await self._exec(False, "MGET", *[ep + k for k in keys[start : start + _BATCH]])
            out += entry_values(raws, MISSING)
        return out

    async def exists(self, key: str) -> bool:
        return bool(await self._exec(False, "EXISTS", self._ep + key))

    async def ttl(self, key: str) -> float | None:
        ms = await self._exec(False, "PTTL", self._ep + key)
        if ms == -2:
            raise KeyNotFoundError(f"key {key!r} does not exist")
        return None if ms < 0 else ms / 1000.0

    def _range(self, prefix: str, after: str | None) -> tuple[bytes, bytes]:
        encoded = prefix.encode()
        lo = b"[" + encoded if prefix else b"-"
        if after is not None and after >= prefix:
            # Members of `after` are "after" and "after\0<partition>": start just past them.
            lo = b"[" + after.encode() + b"\x01"
        hi = b"(" + encoded + b"\xff" if prefix else b"+"
        return lo, hi

    async def _scan_page(self, lo: bytes, hi: bytes, want: int, pf: str) -> tuple[bytes, list[str]]:
        res = await self._script(False, _SCAN, lo, hi, want, _SCAN_BUDGET, pf)
        return res[0], [k.decode() for k in res[1:]]

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        lo, hi = self._range(prefix, after)
        pf = "" if partition is None else _part_arg(partition)
        out: list[str] = []
        while True:
            want = 5000 if limit is None else min(limit - len(out), 5000)
            cursor, page = await self._scan_page(lo, hi, want, pf)
            out.extend(page)
            if not cursor or (limit is not None and len(out) >= limit):
                return out
            lo = cursor

    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        lo, hi = self._range(pattern.prefix, None)
        pf = "" if partition is None else _part_arg(partition)
        out: dict[str, Any] = {}
        ep = self._ep
        matches = pattern.matches
        while True:
            want = 1000 if limit is None else min(1000, max(2 * (limit - len(out)), 100))
            cursor, page = await self._scan_page(lo, hi, want, pf)
            hits = [k for k in page if matches(k)]
            if hits:
                raws = await self._exec(False, "MGET", *[ep + k for k in hits])
                for key, raw in zip(hits, raws, strict=True):
                    if raw is not None:
                        out[key] = entry_value(raw)
                        if limit is not None and len(out) >= limit:
                            return out
            if not cursor:
                return out
            lo = cursor

    async def _prune(self, mode: str) -> list[Any]:
        """Drop the index members of natively expired entries; the last script reply."""
        for _ in range(100_000):
            res: list[Any] = await self._script(False, _PRUNE, _SCAN_BUDGET, mode)
            if int(res[1]):
                return res
        raise BackendUnavailableError("Redis: expired entries are pruned slower than they expire")

    async def partitions(self) -> list[str]:
        flat = (await self._prune("stats"))[2]
        return sorted(flat[i].decode() for i in range(0, len(flat), 2) if int(flat[i + 1]) > 0)

    # ---------------------------------------------------------------- the namespace registry

    def _trusted(self) -> bool:
        """Whether this process registered the namespace less than REGISTRATION_TRUST ago."""
        sent = self._registered.get(self._namespace)
        return sent is not None and _trust_clock() - sent < REGISTRATION_TRUST

    def _forget_registrations(self) -> None:
        """The connector reached a new server run (a restart, a failover): the registry may
        have lost what this process registered, so every namespace is registered again, after
        the write in flight (it went out on the new connection) and before the next one. Not
        on a Cluster, whose registry node this process rarely talks to: there a listing sees
        that node's new run_id and backfills (see :meth:`_complete_registry`)."""
        self._registered.clear()

    async def _register(self) -> None:
        """Add the namespace to the registry (and lift any suspicion of it being empty), before
        a write that may create its first entry. Idempotent, so retried like a read."""
        name = self._namespace
        if name.startswith(RESERVED_NAMESPACE_PREFIX):
            return
        sent = _trust_clock()
        await self._connector.call(_NS_REGISTER, (_REGISTRY,), name, write=False)
        self._registered[name] = sent

    async def _register_after(self) -> None:
        """Register the namespace after a write that was applied (its trust ran out while the
        write was in flight, or a restart made this process forget it). The write stands
        whatever happens here: a failure is logged, not raised, because an error would tell
        the caller that a write which Redis applied and acknowledged may not have been (and an
        ``incr`` retried on that word counts twice). The namespace stays untrusted, so this
        process's next write to it registers it before going out; until then, or until a
        backfill (see :meth:`_complete_registry`), a listing may leave it out. Only when the
        registry was lost and the registration after the write failed: a namespace whose
        registration before the write was sent is in the registry already."""
        try:
            await self._register()
        except FleetmemError as exc:
            _log.warning(
                "Redis (%s): the write to namespace %r was applied, but registering the "
                "namespace after it failed (%s); namespaces() may leave it out until the next "
                "write to it from this process",
                self._connector.where,
                self._namespace,
                exc,
            )

    async def _holds_live(self, name: str) -> bool:
        """Whether namespace ``name`` holds a live entry: its counts and expiry index answer
        (one call); a namespace whose TTL'd entries are due is pruned first, as ``stats``
        would (that frees what it walks)."""
        keys = (f"fm:{{{name}}}:".encode(),)
        flag = await self._connector.call(_NS_LIVE, keys, write=False)
        if flag != 2:
            return bool(flag == 1)
        flat = (await self.view(name)._prune("stats"))[2]
        return any(int(flat[i + 1]) > 0 for i in range(0, len(flat), 2))

    async def _forget_if_empty(self, name: str) -> None:
        """Suspect namespace ``name`` (found or made empty) or, when the suspicion is old
        enough, look at it again: drop it from the registry if it is still empty, else lift
        the suspicion (a writer that trusted its registration wrote there meanwhile). Best
        effort: a failure leaves it listed in the registry, which costs a later listing one
        more check and nothing else."""
        try:
            reg = (_REGISTRY,)
            mark = await self._connector.call(_NS_SUSPECT, reg, name, FORGET_AFTER_MS, write=True)
            if mark:
                drop = b"0" if await self._holds_live(name) else b"1"
                await self._connector.call(_NS_FORGET, reg, name, mark, drop, write=True)
        except FleetmemError:
            pass

    async def _complete_registry(self) -> None:
        """Make the registry hold every namespace that holds an entry, if it may not (one
        ``ns_ready`` call otherwise).

        The registry is complete once a listing has backfilled it on the server run that holds
        it: its marker ``fm:{_fleetmem}:nsm`` holds that server's ``run_id``. A missing marker
        means data written before the registry existed (or by an older fleetmem in a rolling
        deploy), a restart without persistence, or a ``FLUSHDB``; another run_id means a
        restart or a failover of the registry's server, which may have lost registrations that
        the entries' servers kept (on a Cluster they are different nodes). Then ``SCAN`` finds
        the counts key ``fm:{<ns>}:c`` that every namespace holding an indexed entry has (on
        every primary), the names are registered, and only then is the marker set: a
        concurrent listing that sees the marker sees those names; one that does not backfills
        too (the calls are idempotent). A namespace emptied meanwhile is pruned as usual. The
        cost is one walk of the keyspace per server run (about a second per million keys),
        paid by the first listing after it.

        Left open: a namespace whose first entry is written during the walk, after the cursor
        passed its slot, by a process that still trusts a registration the registry lost. On a
        standalone server that is only a ``FLUSHDB`` (a restart makes the writer forget its
        registrations, see :meth:`_forget_registrations`); the namespace is listed once that
        process writes to it again after its trust ran out, or at the next backfill.
        """
        connector = self._connector
        run = await connector.call(_NS_READY, (_REGISTRY,), write=False)
        if not run:
            return
        reserved = RESERVED_NAMESPACE_PREFIX.encode()
        names: list[bytes] = []
        try:
            async for page in connector.scan_keys(_COUNTS_PATTERN):
                for key in page:
                    found = _COUNTS_KEY.fullmatch(key)
                    if found is not None and not found.group(1).startswith(reserved):
                        names.append(found.group(1))
                if len(names) >= _BACKFILL_BATCH:
                    await connector.call(_NS_BACKFILL, (_REGISTRY,), b"", *names, write=False)
                    names = []
        except BackendUnavailableError:
            raise
        except FleetmemError as exc:
            # Refused (SCAN not allowed for this user): list what the registry holds, as
            # before the backfill existed, and say so; the next listing tries again.
            _log.warning(
                "Redis (%s): could not backfill the namespace registry (%s); namespaces() "
                "lists the registered names only",
                connector.where,
                exc,
            )
            return
        await connector.call(_NS_BACKFILL, (_REGISTRY,), run, *names, write=False)

    async def _settle_suspicions(self) -> None:
        """After a ``clear()`` emptied the namespace: suspect it of being empty (or drop it,
        if an aged suspicion of it stands and it is still empty), then settle up to
        ``_NS_SETTLE`` other suspicions older than ``FORGET_AFTER_MS`` the same way. Listings
        are then not the only pruning: a deployment that makes a namespace per run, clears it
        and never lists keeps a registry of the namespaces that hold entries plus those
        cleared in the last ``FORGET_AFTER_MS`` or so. Best effort, like every pruning step (a
        failure leaves names registered, which costs a listing a check, nothing else): the
        clear has happened whatever this does. A few round trips per ``clear()``, none on any
        other write."""
        name = self._namespace
        if name.startswith(RESERVED_NAMESPACE_PREFIX):
            return
        await self._forget_if_empty(name)
        try:
            due = await self._connector.call(
                _NS_DUE, (_REGISTRY,), FORGET_AFTER_MS, _NS_SETTLE, write=False
            )
        except FleetmemError:
            return
        others = [n.decode() for n in due if n.decode() != name]
        if others:
            await asyncio.gather(*map(self._forget_if_empty, others))

    async def namespaces(self, prefix: str, limit: int | None, after: str | None) -> list[str]:
        """Names from the registry (``ZRANGE BYLEX``, a page at a time), each kept if it holds
        a live entry (checked concurrently, one script call each).

        The registry: a process adds a namespace (``ns_register``) before its first write to
        it, and again before and after any write once its last registration is older than
        ``REGISTRATION_TRUST``; so a namespace is in the registry by the time a write to it
        returns. Pruning: a listing that finds a registered namespace empty marks it suspected
        (the registry server's time); a later listing, once the mark is ``FORGET_AFTER_MS``
        old, checks the namespace again and drops it unless a registration lifted the mark in
        between. A writer trusting a registration older than the mark would have to have
        made it over ``FORGET_AFTER_MS`` ago, past its trust: it registers again before its
        write returns. Names missing from the registry (data older than it, a registry lost
        with a restart, a flush or a failover) are added first, once per server run: see
        :meth:`_complete_registry`. See docs/backends/redis.md.
        """
        await self._complete_registry()
        lo = b"[" + prefix.encode() if prefix else b"-"
        if after is not None and after >= prefix:
            lo = b"(" + after.encode()
        hi = b"(" + prefix_upper_bound(prefix).encode() if prefix else b"+"
        out: list[str] = []
        while True:
            raw = await self._exec(
                False, "ZRANGE", _REGISTRY_SET, lo, hi, "BYLEX", "LIMIT", 0, _NS_PAGE
            )
            names = [
                n.decode() for n in raw if not n.startswith(RESERVED_NAMESPACE_PREFIX.encode())
            ]
            empty: list[str] = []
            for start in range(0, len(names), _NS_CONCURRENCY):
                chunk = names[start : start + _NS_CONCURRENCY]
                flags = await asyncio.gather(*map(self._holds_live, chunk))
                for name, live in zip(chunk, flags, strict=True):
                    if live:
                        out.append(name)
                        if limit is not None and len(out) >= limit:
                            break
                    else:
                        empty.append(name)
                if limit is not None and len(out) >= limit:
                    break
            if empty:
                await asyncio.gather(*map(self._forget_if_empty, empty))
            if len(raw) < _NS_PAGE or (limit is not None and len(out) >= limit):
                return out
            lo = b"(" + raw[-1]

    async def stats(self) -> StoreStats:
        res = await self._prune("stats")
        flat = res[2]
        counts = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        counts = {name: n for name, n in sorted(counts.items()) if n > 0}
        total = sum(counts.values())
        size, sampled = int(res[3]), int(res[4])
        return StoreStats(
            namespace=self._namespace,
            keys=total,
            partitions=counts,
            expired_pending=int(res[5]),
            bytes=(size * total) // sampled if sampled else 0,
            backend=self.backend_name,
        )

    async def health(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._exec(False, "PING")
        return {
            "rtt_ms": round((loop.time() - start) * 1000.0, 3),
            "cluster": self._connector.cluster,
            "url": self._connector.where,
        }

    # ---------------------------------------------------------------- writes

    async def set(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence | None = None,
    ) -> EntryMeta:
        if fence is not None:
            return await self._set_fenced(key, payload, ttl_ms, partition, keep_ttl, fence)
        if not self._trusted():
            await self._register()
        connector = self._connector
        form = connector.form
        if ttl_ms is None and partition is None and not keep_ttl and form >= 0:
            # The common call, with its constant arguments ready.
            res = await connector.execute(True, *self._set_head[form], key, mark_payload(payload))
        else:
            res = await self._script(
                True,
                _SET,
                key,
                mark_payload(payload),
                ttl_ms or 0,
                _part_arg(partition),
                b"1" if keep_ttl else b"0",
            )
        self._changed()
        if not self._trusted():
            await self._register_after()
        return entry_meta(*res)

    async def _set_fenced(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence,
    ) -> EntryMeta:
        """``set`` under ``fence``: one ``fenced_set`` call (a lost lease raises
        ``LeaseLostError`` from the connector, nothing written)."""
        if not self._trusted():
            await self._register()
        connector = self._connector
        form = connector.form
        args = (
            key,
            mark_payload(payload),
            ttl_ms or 0,
            _part_arg(partition),
            b"1" if keep_ttl else b"0",
            fence.name,
            fence.token,
        )
        if form >= 0:
            res = await connector.execute(True, *self._fset_head[form], *args)
        else:
            res = await self._script(True, _F_SET, *args)
        self._changed()
        if not self._trusted():
            await self._register_after()
        return entry_meta(*res)

    async def set_batch(self, ops: list[SetOp]) -> list[EntryMeta | BaseException]:
        if not self._trusted():
            await self._register()
        out: list[EntryMeta | BaseException] = []
        for start in range(0, len(ops), _OPS_BATCH):
            args: list[Any] = []
            for key, payload, ttl_ms, partition, keep_ttl in ops[start : start + _OPS_BATCH]:
                if ttl_ms is None and partition is None and not keep_ttl:
                    args += (key, mark_payload(payload), b"")
                else:
                    opts = f"{ttl_ms or 0} {1 if keep_ttl else 0} {_part_arg(partition)}"
                    args += (key, mark_payload(payload), opts)
            res = await self._script(True, _SET_BATCH, *args)
            now = res[0]
            updated = ms_datetime(now)
            for i in range(1, len(res), 4):
                ver, c, part, exp = res[i : i + 4]
                out.append(
                    EntryMeta(
                        partition_name(part),
                        ver,
                        updated if c == now else ms_datetime(c),
                        updated,
                        None if exp < 0 else ms_datetime(exp),
                    )
                )
        self._changed()
        if not self._trusted():
            await self._register_after()
        return out

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int:
        if not self._trusted():
            await self._register()
        count = 0
        parg = _part_arg(partition)
        mark = mark_payload
        if fence is not None:
            return await self._fenced_set_many(chunks, ttl_ms or 0, parg, fence)
        for chunk in chunks:
            for start in range(0, len(chunk), _SET_MANY_SLICE):
                part = chunk[start : start + _SET_MANY_SLICE]
                args: list[Any] = [x for key, payload in part for x in (key, mark(payload))]
                count += await self._script(True, _SET_MANY, ttl_ms or 0, parg, *args)
                self._changed()
        if not self._trusted():
            await self._register_after()
        return count

    async def _fenced_set_many(
        self, chunks: Iterator[list[tuple[str, bytes]]], ttl_ms: int, parg: str, fence: Fence
    ) -> int:
        """A fenced ``set_many``: one script call per front-end chunk (up to ``SET_MANY_CHUNK``
        = 10,000 items), so each chunk is written whole under its fence check or not at all.
        A refusal after earlier chunks were applied says how many items they wrote."""
        count = 0
        for chunk in chunks:
            args: list[Any] = [x for key, payload in chunk for x in (key, mark_payload(payload))]
            try:
                count += await self._script(True, _F_SET_MANY, ttl_ms, parg, *args, *fence)
                self._changed()
            except LeaseLostError as exc:
                if not count:
                    raise
                if not self._trusted():
                    await self._register_after()
                raise _lost_midway(
                    fence, count, "written by earlier chunks of this set_many"
                ) from exc
        if not self._trusted():
            await self._register_after()
        return count

    async def set_if_absent(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> bool:
        if not self._trusted():
            await self._register()
        script, tail = (_SET_IF_ABSENT, ()) if fence is None else (_F_SET_IF_ABSENT, fence)
        res = await self._script(
            True, script, key, mark_payload(payload), ttl_ms or 0, _part_arg(partition), *tail
        )
        if res:
            self._changed()
        if not self._trusted():
            await self._register_after()
        return bool(res)

    async def compare_and_set(
        self,
        key: str,
        payload: bytes,
        version: int,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> EntryMeta:
        if not self._trusted():
            await self._register()
        script, tail = (_CAS, ()) if fence is None else (_F_CAS, fence)
        res = await self._script(
            True,
            script,
            key,
            mark_payload(payload),
            version,
            ttl_ms or 0,
            _part_arg(partition),
            *tail,
        )
        if res[0]:
            self._changed()
        if not self._trusted():
            await self._register_after()
        if not res[0]:
            raise VersionConflictError(key, version, int(res[1]))
        return entry_meta(*res[1:])

    async def incr(
        self,
        key: str,
        amount: int | float,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int | float:
        if not self._trusted():
            await self._register()
        is_int = isinstance(amount, int)
        text = str(amount) if is_int else repr(float(amount))
        script, tail = (_INCR, ()) if fence is None else (_F_INCR, fence)
        res = await self._script(
            True,
            script,
            key,
            text,
            "i" if is_int else "f",
            ttl_ms or 0,
            _part_arg(partition),
            *tail,
        )
        self._changed()
        if not self._trusted():
            await self._register_after()
        status = res[0]
        if status == b"OK":
            result: bytes = res[1]
            if is_int and result.lstrip(b"-").isdigit():
                return int(result)
            return float(result)
        if status == b"NAN":
            kind = _KIND.get(bytes(res[1]), "value")
            raise NotANumberError(f"key {key!r} holds a {kind}, not a number")
        if status == b"FLOAT":
            raise InvalidArgumentError(f"incr of key {key!r} would overflow a float")
        raise InvalidArgumentError(f"incr of key {key!r} would leave the signed 64-bit range")

    async def delete(self, key: str, fence: Fence | None = None) -> bool:
        if fence is None:
            res: list[int] = await self._script(True, _DELETE_MANY, key)
        else:
            res = await self._script(True, _F_DELETE_MANY, key, *fence)
        self._changed()
        return res[0] == 1

    async def delete_many(self, keys: list[str], fence: Fence | None = None) -> int:
        count = 0
        if fence is None:
            for start in range(0, len(keys), _BATCH):
                count += sum(await self._script(True, _DELETE_MANY, *keys[start : start + _BATCH]))
                self._changed()
            return count
        # Fenced: one call per _BATCH (10,000) keys, each atomic with its fence check; a call
        # is made even with no key, so the fence is always checked.
        for start in range(0, max(len(keys), 1), _BATCH):
            chunk = keys[start : start + _BATCH]
            try:
                count += sum(await self._script(True, _F_DELETE_MANY, *chunk, *fence))
                self._changed()
            except LeaseLostError as exc:
                if not start:
                    raise
                raise _lost_midway(
                    fence,
                    count,
                    f"deleted by earlier calls of this delete_many (they covered its first "
                    f"{start:,} of {len(keys):,} keys)",
                ) from exc
        return count

    async def delete_batch(self, keys: list[str]) -> list[bool | BaseException]:
        out: list[bool | BaseException] = []
        for start in range(0, len(keys), _BATCH):
            res = await self._script(True, _DELETE_MANY, *keys[start : start + _BATCH])
            out += [flag == 1 for flag in res]
        self._changed()
        return out

    async def expire(self, key: str, ttl_ms: int | None, version: int | None = None) -> bool:
        live = bool(
            await self._script(True, _EXPIRE, key, ttl_ms or 0, "" if version is None else version)
        )
        self._changed()
        return live

    async def clear(self, partition: str | None) -> int:
        pf = "" if partition is None else _part_arg(partition)
        cursor: bytes | str = "-"
        count = 0
        # The time of the one "clear" change this clear() recorded ("": none yet), handed from
        # call to call: see lua/kv/clear.lua.
        recorded: bytes | int = b""
        for _ in range(10_000_000):
            res = await self._script(True, _CLEAR, pf, cursor, _SCAN_BUDGET, recorded)
            count += int(res[1])
            cursor, recorded = res[0], res[2]
            self._changed()
            if not cursor:
                break
        if partition is None:
            await self._settle_suspicions()
        return count

    async def cleanup_expired(self) -> int:
        return int((await self._prune("cleanup"))[2])

    # ---------------------------------------------------------------- portability

    #: Each exported entry is exact (read with its metadata in one script call), but the
    #: export is not one point-in-time view: a write made while it runs may or may not be in
    #: it (Redis has no snapshot a reader could hold open; a script holding the whole
    #: namespace would block the server for its length).
    export_consistency: ClassVar[str] = "per-entry"
    #: ``import_replace`` is page by page, not one transaction (see there).
    replace_is_atomic: ClassVar[bool] = False

    async def server_time(self) -> datetime:
        """The server's ``TIME`` (one round trip, a read: retried and translated as every
        call), to the microsecond: the clock that expires this backend's entries and that its
        scripts write by. On a Cluster it is the time of the node the client sends keyless
        commands to; Redis Cluster expects its nodes' clocks to agree (each expires its own
        keys on its own)."""
        seconds, micros = await self._connector.execute(False, "TIME")
        return datetime.fromtimestamp(int(seconds), timezone.utc) + timedelta(
            microseconds=int(micros)
        )

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """Pages of the live entries, ascending: ``scan`` calls in entries mode, each walking
        the key index from where the last one stopped and returning every live key with its
        entry string and expiry (one ``MGET`` in the script, ``PEXPIRETIME`` for the keys of
        the expiry index; at most ``_SCAN_BUDGET`` index members looked at per call),
        dropping the members of natively expired entries as ``keys`` does. ``per-entry``:
        each entry is read whole in one atomic call, the calls one after the other.

        One round trip per page instead of the seam's two (``keys`` then ``get_entries``),
        the entries parsed in one pass (:func:`parse_entries`). (Sending the next call before
        parsing a reply was measured slower, not faster: the parsing and the server compete
        for the same cores.)"""
        lo, hi = self._range(prefix, None)
        pf = "" if partition is None else _part_arg(partition)
        page: list[Entry] = []
        while True:
            want = min(page_size - len(page), 5000)
            res = await self._script(False, _SCAN, lo, hi, want, _SCAN_BUDGET, pf, b"1")
            page += parse_entries(res, 1)
            if len(page) >= page_size or (not res[0] and page):
                yield page
                page = []
            if not res[0]:
                return
            lo = res[0]

    async def export_lines(
        self, prefix: str, partition: str | None, page_size: int, render: Callable[[Entry], bytes]
    ) -> AsyncGenerator[tuple[list[str], bytearray], None]:
        """The pages of :meth:`export_pages` (the same ``scan`` calls, so the same
        ``per-entry`` consistency), each entry's line written straight from the script's reply
        (:func:`~fleetmem.backends.redis.entries.export_lines`): the stored JSON as is, the
        millisecond times formatted from a cache of their seconds, no ``Entry`` or
        ``datetime`` built -- about half of an export's time went to them. An entry whose
        stored JSON orjson might write otherwise (a bare number, a float of 1e16 or more, an
        integer beyond 64 bits) is parsed and ``render``-ed as :meth:`export_pages` would
        have it."""
        lo, hi = self._range(prefix, None)
        pf = "" if partition is None else _part_arg(partition)
        keys: list[str] = []
        blob = bytearray()
        times: dict[int, bytes] = {}
        while True:
            want = min(page_size - len(keys), 5000)
            res = await self._script(False, _SCAN, lo, hi, want, _SCAN_BUDGET, pf, b"1")
            export_lines(res, 1, keys, blob, render, times)
            if len(keys) >= page_size or (not res[0] and keys):
                yield keys, blob
                keys, blob = [], bytearray()
            if not res[0]:
                return
            lo = res[0]

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        """One ``import`` script call per 1,000 ops (``lua/kv/import.lua``): on the server's
        ``TIME``, an op whose expiry has passed is skipped (``expired``); with
        ``missing_only`` an op whose key has a live entry is skipped (``existing``); every
        other op is written as ``set`` writes (version + 1 of a live entry, 1 otherwise;
        created kept, updated now) with its partition and its absolute expiry (``PXAT``: the
        remaining life is measured on the server's clock, to the millisecond, rounded down),
        index, counts and expiry index kept, and a "set" recorded in the namespace's change
        feed when it is enabled, all in the script. A batch of more calls is not atomic as a
        whole: a failure leaves the calls before it written."""
        return await self._import(ops, _MISSING if missing_only else _MERGE)

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        """The seam's merge-delete, not atomic (:attr:`replace_is_atomic` False): each page is
        written by ``import`` script calls (as :meth:`import_batch`), then the keys between
        the previous page's last key and this page's last key that are not in the page are
        deleted (``delete_batch``: one ``delete_many`` call per 10,000 keys, each recording a
        "delete" change), then every key after the last page. Readers meanwhile see a
        namespace partly replaced; a failure leaves it so (the pages before it written, the
        keys before it deleted); all of it lives in the namespace's slot, so it runs on a
        Cluster as on one server.

        An op whose expiry has passed on the server's clock is skipped, and the script deletes
        its key's live entry (recording a "delete") in the same call: that the file's entry
        expired is decided once, on the clock that decides everything else here.

        Keys must ascend strictly within and across pages (the deletes between pages rely on
        it): a page that does not is refused with ``InvalidArgumentError`` before anything of
        it is written."""
        total = ImportTally(0, 0, 0)
        previous: str | None = None
        async for page in pages:
            if not page:
                continue
            last = previous
            for op in page:
                if last is not None and op.key <= last:
                    raise InvalidArgumentError(
                        "import_replace needs keys strictly ascending across pages: "
                        f"{op.key!r} after {last!r}"
                    )
                last = op.key
            tally = await self._import(page, _REPLACE)
            total = ImportTally(total.written + tally.written, total.expired + tally.expired, 0)
            await self._delete_between(previous, page[-1].key, {op.key for op in page})
            previous = page[-1].key
        await self._delete_between(previous, None, ())
        return total

    async def _import(self, ops: list[ImportOp], mode: bytes) -> ImportTally:
        """``ops`` through the ``import`` script in ``mode``: calls of at most
        ``_IMPORT_OPS`` ops and (past the first op) ``_IMPORT_BYTES`` stored bytes."""
        if not ops:
            return ImportTally(0, 0, 0)
        if not self._trusted():
            await self._register()
        written = expired = existing = 0
        args: list[Any] = []
        size = 0
        last = len(ops) - 1
        for i, (key, payload, partition, expires_at) in enumerate(ops):
            args += (
                key,
                mark_payload(payload),
                "" if partition == DEFAULT_PARTITION else partition,
                b"" if expires_at is None else b"%d" % datetime_ms(expires_at),
            )
            size += len(payload)
            if i == last or len(args) >= 4 * _IMPORT_OPS or size >= _IMPORT_BYTES:
                res = await self._script(True, _IMPORT, mode, *args)
                self._changed()
                written, expired, existing = (
                    written + int(res[0]),
                    expired + int(res[1]),
                    existing + int(res[2]),
                )
                args, size = [], 0
        if not self._trusted():
            await self._register_after()
        return ImportTally(written, expired, existing)
