"""``RedisSnapshots``: the named, incremental snapshots of a namespace on Redis (standalone or
Cluster), in the record model of :class:`~fleetmem.backends.seam.SnapshotBackend`.

Layout (see ``lua/snapshots/_lib.lua``): five keys under the namespace's prefix ``fm:{<ns>}:``
-- so in its Cluster slot, next to its entries, and every script call runs there -- named with
an upper-case ``S``, which no key-value, lease, agent, queue or feed key starts with:

* ``fm:{ns}:Sc`` -- the catalog, a hash: snapshot name -> ``{"seq", "at", "keys", "bytes"}``
  (JSON; ``at`` the server's ``TIME`` in microseconds; ``"deleting": true`` while a delete of
  it runs, which hides it);
* ``fm:{ns}:Sk`` -- the keys that have records, a sorted set (score 0, ordered by the key's
  UTF-8 bytes: the order of the key index and of the export);
* ``fm:{ns}:Sh`` -- a hash: key -> its records, newest first, each a 20-byte header
  (``from_seq``, ``to_seq`` -- 0 when open --, the absolute expiry in ms or -1, the length of
  what follows) and the entry string as the key-value scripts wrote it (version, created,
  updated, partition, the stored JSON: see ``entries.py``), so a record keeps every field of
  the entry exactly, big integers and all, and reads back through the same parser;
* ``fm:{ns}:Su`` -- a hash: the number of records and their bytes (as
  :func:`~fleetmem.backends.seam.record_bytes` counts them), changed in the same script call as
  the records: :meth:`RedisSnapshots.usage` reads it, walking nothing;
* ``fm:{ns}:Sl`` -- the lock of creates and deletes (below).

None of these is a key the key-value backend reads, counts or deletes: ``keys``/``search`` walk
the ``b:`` index buckets, ``stats`` and ``namespaces()`` the ``c`` counts hash (and the
``fm:{*}:c`` pattern, which no snapshot key matches), ``clear()`` deletes entries, buckets and
the ``d``, ``x``, ``c``, ``g`` keys by name; the change feed records key-value writes only. So
snapshots survive ``clear()`` and ``clear_partition()``, and a namespace that holds only
snapshots is not listed by ``namespaces()``. They are as durable as the server's persistence
makes its other keys.

**Serialised.** A create or a delete first takes the lock: ``SET NX PX`` of a random token
(:attr:`RedisSnapshots.lock_ttl_ms`, 30 s), extended every third of that by a task of the
process while it runs, released by compare-and-delete. Every script that changes snapshot data
takes the token and changes nothing unless the lock still holds it (a holder that stalled past
its TTL and lost the lock to another process raises instead of writing on what it read).
Another create or delete waits, polling, up to :attr:`RedisSnapshots.lock_wait` (600 s) and
then raises :class:`~fleetmem.errors.BackendUnavailableError`; a process killed while holding
the lock holds it up for at most its TTL.

**Create** (``seq`` = newest catalog seq + 1) merges two ascending streams a page at a time:
the live entries, read by the key-value ``scan`` script in entries mode exactly as
:meth:`RedisKV.export_pages <fleetmem.backends.redis.kv.RedisKV.export_pages>` reads them (the
same script and reply, kept as the raw entry strings rather than decoded, so records are
compared and stored byte for byte), and the keys that have records (``read``: keys and records
in one call). For each key it closes the open record that is gone or differs (entry string or
expiry: every field), adds a record for a live entry without an equal open one, and writes the
keys that changed, a batch per ``write`` call (records, index and usage together) before the
next page is read. The catalog row comes last (``finish``: ``TIME`` of the server). Memory
stays bounded by a page of each stream and a batch of writes. Consistency is the export's,
**per-entry**: each entry is read whole in one atomic call, but a write made while the create
runs may or may not be in it (Redis has no point-in-time view a reader can hold open); ``keys``
counts the entries it read. A seq freed by deleting the newest snapshot is taken again by the
next create: that delete left no record from it and reopened those closed at it.

**Not atomic, repaired.** A create is many calls; nothing it writes before its catalog row is
visible (records from ``seq`` on, and closings at ``seq``, change no existing snapshot). A
create that dies midway (process killed, connection lost, lock lost) leaves them behind, and
every later create or delete repairs them as the seam says while it walks the keys with records
(each walks all of them): records with ``from_seq`` above the newest catalog seq are dropped,
``to_seq`` above it reset to open. Records are kept newest first, so those are always at the
head of a key's records.

**Delete** marks the row ``deleting`` (hidden from ``list``, ``get`` and ``pages`` from then
on, its name free), walks every key applying the seam's rule (and the repair), a batch per
``shrink`` call, then removes the row. A delete that dies midway leaves the row marked: the
rule is idempotent for an unchanged catalog, so the next create or delete runs it again before
anything else, and no record another snapshot holds is ever dropped. ``shrink`` and the
catalog and lock scripts run on a server at ``maxmemory`` (``allow-oom``): deleting snapshots
frees memory there; a create's ``write`` and ``finish`` are refused there before they run.

**Pages** read the snapshot's records (``read``, a page of keys per call) with no lock: a
snapshot's records change only when it is deleted, so the pages are exact; a snapshot whose
delete began while they were read (its row marked or gone at the end) raises
:class:`~fleetmem.errors.SnapshotNotFoundError` at the end instead of ending quietly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import orjson

from fleetmem._validate import DEFAULT_PARTITION
from fleetmem.backends.redis.connector import RedisConnector
from fleetmem.backends.redis.entries import parse_entry, partition_name
from fleetmem.backends.redis.scripts import SCRIPTS, SNAPSHOT_SCRIPTS, Script
from fleetmem.backends.seam import (
    SnapshotBackend,
    SnapshotRow,
    record_bytes,
    snapshot_exists,
    snapshot_not_found,
)
from fleetmem.errors import BackendUnavailableError, FleetmemError
from fleetmem.protocol import Entry

__all__ = ["RedisSnapshots"]

_log = logging.getLogger("fleetmem.redis")

_LOCK, _RENEW, _UNLOCK = (
    SNAPSHOT_SCRIPTS["lock"],
    SNAPSHOT_SCRIPTS["renew"],
    SNAPSHOT_SCRIPTS["unlock"],
)
_READ, _WRITE, _SHRINK = (
    SNAPSHOT_SCRIPTS["read"],
    SNAPSHOT_SCRIPTS["write"],
    SNAPSHOT_SCRIPTS["shrink"],
)
_FINISH, _CATALOG = SNAPSHOT_SCRIPTS["finish"], SNAPSHOT_SCRIPTS["catalog"]
#: The key-value index walk that reads the export's pages (``lua/kv/scan.lua``).
_SCAN = SCRIPTS["scan"]

#: A record's header: from_seq, to_seq (0: open), expires ms (-1: none), length of the entry
#: string that follows.
_REC = struct.Struct(">IIqI")
_HEAD = _REC.size
#: Keys per read (live entries or records) and per write call, and the bytes of records after
#: which a read or a write batch stops early (values may be large).
_PAGE = 500
_PAGE_BYTES = 4 * 1024 * 1024
#: Index members a ``scan`` call looks at before handing back a cursor (as the export).
_SCAN_BUDGET = 5000
_EXACT = 33  # "!": the stored JSON carries a marker byte (see entries.py)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_T = TypeVar("_T")
#: A page of live entries ``(key, entry string, expiry ms or -1)``, of keys with their records
#: ``(key, records)``, of a snapshot's entries (module names: ``list`` is a method below).
_LivePage = list[tuple[bytes, bytes, int]]
_HistoryPage = list[tuple[bytes, bytes]]
_EntryPage = list[Entry]


class _Row(NamedTuple):
    """A catalog row as stored (``at``: microseconds since the epoch)."""

    name: str
    seq: int
    at: int
    keys: int
    bytes: int
    deleting: bool

    def public(self) -> SnapshotRow:
        created = _EPOCH + timedelta(microseconds=self.at)
        return SnapshotRow(self.name, self.seq, created, self.keys, self.bytes)


def _stored(row: _Row) -> bytes:
    """``row`` as the catalog stores it."""
    fields: dict[str, Any] = {
        "seq": row.seq,
        "at": row.at,
        "keys": row.keys,
        "bytes": row.bytes,
    }
    if row.deleting:
        fields["deleting"] = True
    return orjson.dumps(fields)


def _row(name: bytes | str, stored: bytes) -> _Row:
    fields = orjson.loads(stored)
    return _Row(
        name.decode() if isinstance(name, bytes) else name,
        int(fields["seq"]),
        int(fields["at"]),
        int(fields["keys"]),
        int(fields["bytes"]),
        bool(fields.get("deleting", False)),
    )


def _size(key: bytes, raw: bytes) -> int:
    """:func:`record_bytes` of a record of ``key`` holding entry string ``raw``: the payload is
    the stored JSON without its marker byte, the partition its name (``default`` for "")."""
    plen = raw[0]
    at = 19 + plen
    payload = len(raw) - at - (1 if raw[at] == _EXACT else 0)
    return record_bytes(key.decode(), payload, partition_name(raw[19:at]))


def _records(blob: bytes) -> list[tuple[int, int, int, bytes]]:
    """The records of a key, newest first: ``(from_seq, to_seq, expires, entry string)``."""
    out: list[tuple[int, int, int, bytes]] = []
    at, end = 0, len(blob)
    while at < end:
        first, last, expires, size = _REC.unpack_from(blob, at)
        start = at + _HEAD
        out.append((first, last, expires, blob[start : start + size]))
        at = start + size
    return out


def _blob(records: Iterable[tuple[int, int, int, bytes]]) -> bytes:
    return b"".join(_REC.pack(f, t, e, len(raw)) + raw for f, t, e, raw in records)


def _held(blob: bytes, seq: int) -> tuple[bytes, int] | None:
    """The entry string and expiry of the record that snapshot ``seq`` holds, if any: the first
    record (newest first) with ``from_seq <= seq``; every older one ended before it."""
    at, end = 0, len(blob)
    while at < end:
        first, last, expires, size = _REC.unpack_from(blob, at)
        start = at + _HEAD
        if first <= seq:
            if last == 0 or seq < last:
                return blob[start : start + size], expires
            return None
        at = start + size
    return None


class _Merged(NamedTuple):
    """What a create does to one key: its new records (None: unchanged; b"": none left), the
    change of the record count and bytes, and the bytes of the record it added."""

    blob: bytes | None
    records: int
    bytes: int
    added: int


def _merge(key: bytes, blob: bytes, live: tuple[bytes, int] | None, seq: int) -> _Merged:
    """A create of snapshot ``seq`` on one key with records ``blob`` (b"": none) and live
    entry ``live`` (entry string, expiry; None: no live entry). First the repair of what a
    crashed create left (records from ``seq`` on dropped, closings at ``seq`` or later undone:
    the newest catalog seq is ``seq - 1``); they are always at the head."""
    d_records = d_bytes = 0
    at, end = 0, len(blob)
    repaired = False
    head: tuple[int, int, int, int] | None = None
    while at < end:
        first, last, expires, size = _REC.unpack_from(blob, at)
        if first >= seq:
            d_records -= 1
            d_bytes -= _size(key, blob[at + _HEAD : at + _HEAD + size])
            at += _HEAD + size
            repaired = True
            continue
        if last >= seq:
            last = 0
            repaired = True
        head = (first, last, expires, size)
        break
    rest = blob[at:]
    if repaired and head is not None:
        rest = _REC.pack(*head) + rest[_HEAD:]
    is_open = head is not None and head[1] == 0
    if live is not None:
        raw, exp = live
        if is_open and head is not None and head[2] == exp and rest[_HEAD : _HEAD + head[3]] == raw:
            return _Merged(rest if repaired else None, d_records, d_bytes, 0)
        if is_open and head is not None:
            rest = _REC.pack(head[0], seq, head[2], head[3]) + rest[_HEAD:]
        size = _size(key, raw)
        rest = _REC.pack(seq, 0, exp, len(raw)) + raw + rest
        return _Merged(rest, d_records + 1, d_bytes + size, size)
    if is_open and head is not None:
        rest = _REC.pack(head[0], seq, head[2], head[3]) + rest[_HEAD:]
        return _Merged(rest, d_records, d_bytes, 0)
    return _Merged(rest if repaired else None, d_records, d_bytes, 0)


def _drop(key: bytes, blob: bytes, seq: int, below: int, above: int | None, newest: int) -> _Merged:
    """The delete of snapshot ``seq`` on one key (``below``: the greatest remaining seq under
    it, 0 if none; ``above``: the least over it, None if it is the newest; ``newest``: the
    newest catalog seq, ``seq`` included): the repair first, then the seam's rule -- drop the
    records ``seq`` holds that neither ``below`` nor ``above`` holds, reopen those closed at
    ``seq`` when it was the newest."""
    kept: list[tuple[int, int, int, bytes]] = []
    d_records = d_bytes = 0
    for first, last, expires, raw in _records(blob):
        if first > newest:
            d_records -= 1
            d_bytes -= _size(key, raw)
            continue
        if last > newest:
            last = 0
        held = first <= seq and (last == 0 or seq < last)
        if held and first > below and (above is None or (last != 0 and last <= above)):
            d_records -= 1
            d_bytes -= _size(key, raw)
            continue
        if above is None and last == seq:
            last = 0
        kept.append((first, last, expires, raw))
    new = _blob(kept)
    return _Merged(None if new == blob else new, d_records, d_bytes, 0)


class _Stream(Generic[_T]):
    """Items of an async iterator of pages, one at a time with a look at the next."""

    __slots__ = ("_at", "_done", "_page", "_pages")

    def __init__(self, pages: AsyncIterator[list[_T]]) -> None:
        self._pages = pages
        self._page: list[_T] = []
        self._at = 0
        self._done = False

    async def head(self) -> _T | None:
        while self._at >= len(self._page):
            if self._done:
                return None
            try:
                self._page = await self._pages.__anext__()
            except StopAsyncIteration:
                self._done = True
                self._page = []
            self._at = 0
        return self._page[self._at]

    def advance(self) -> None:
        self._at += 1

    @property
    def drained(self) -> bool:
        """Whether the next :meth:`head` reads another page."""
        return self._at >= len(self._page) and not self._done


class _Batch:
    """Keys whose records changed, written by one script call when full."""

    __slots__ = ("args", "bytes", "records", "size")

    def __init__(self) -> None:
        self.args: list[bytes] = []
        self.records = self.bytes = self.size = 0

    def add(self, key: bytes, change: _Merged) -> bool:
        """Add a key; True when the batch is full."""
        assert change.blob is not None
        self.args += (key, change.blob)
        self.records += change.records
        self.bytes += change.bytes
        self.size += len(key) + len(change.blob)
        return len(self.args) >= 2 * _PAGE or self.size >= _PAGE_BYTES


class RedisSnapshots(SnapshotBackend):
    """The snapshots of one namespace on Redis (see the module docstring)."""

    #: Milliseconds the lock of a create or delete lives without being extended; the process
    #: holding it extends it every third of that while it runs.
    lock_ttl_ms: ClassVar[int] = 30_000
    #: Seconds a create or delete waits for another one of the namespace to finish.
    lock_wait: ClassVar[float] = 600.0

    def __init__(self, connector: RedisConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._connector = connector
        prefix = f"fm:{{{namespace}}}:".encode()
        self._keys = (prefix,)
        self._catalog_key = prefix + b"Sc"
        self._usage_key = prefix + b"Su"

    # ---------------------------------------------------------------- reading

    async def _catalog(self) -> dict[str, _Row]:
        raw = await self._connector.execute(False, "HGETALL", self._catalog_key)
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        rows = (_row(name, stored) for name, stored in pairs)
        return {row.name: row for row in rows}

    async def _get(self, name: str) -> _Row | None:
        stored = await self._connector.execute(False, "HGET", self._catalog_key, name)
        return None if stored is None else _row(name, stored)

    async def list(self) -> list[SnapshotRow]:
        rows = [row for row in (await self._catalog()).values() if not row.deleting]
        rows.sort(key=lambda row: (row.at, row.seq))
        return [row.public() for row in rows]

    async def get(self, name: str) -> SnapshotRow | None:
        row = await self._get(name)
        return None if row is None or row.deleting else row.public()

    async def usage(self) -> tuple[int, int]:
        records, size = await self._connector.execute(
            False, "HMGET", self._usage_key, "records", "bytes"
        )
        return int(records or 0), int(size or 0)

    async def _history(self, lo: bytes, hi: bytes) -> AsyncGenerator[_HistoryPage, None]:
        """Pages of ``(key, records)`` of the keys with records between two ``BYLEX`` bounds,
        ascending (each page read in one call)."""
        while True:
            res = await self._connector.call(
                _READ, self._keys, lo, hi, _PAGE, _PAGE_BYTES, write=False
            )
            if len(res) > 1:
                yield [(res[i], res[i + 1]) for i in range(1, len(res), 2)]
            if not res[0]:
                return
            lo = res[0]

    async def _live(self) -> AsyncGenerator[_LivePage, None]:
        """Pages of the live entries, ascending: ``(key, entry string, expiry ms or -1)``, read
        by the export's ``scan`` calls."""
        lo = b"-"
        while True:
            res = await self._connector.call(
                _SCAN, self._keys, lo, b"+", _PAGE, _SCAN_BUDGET, "", b"1", write=False
            )
            if len(res) > 1:
                yield [(res[i], res[i + 1], int(res[i + 2])) for i in range(1, len(res), 3)]
            if not res[0]:
                return
            lo = res[0]

    async def pages(
        self, name: str, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[_EntryPage, None]:
        row = await self._get(name)
        if row is None or row.deleting:
            raise snapshot_not_found(self._namespace, name)
        seq = row.seq
        encoded = prefix.encode()
        lo = b"[" + encoded if prefix else b"-"
        hi = b"(" + encoded + b"\xff" if prefix else b"+"  # UTF-8 never holds 0xff
        wanted = None
        if partition is not None:
            wanted = b"" if partition == DEFAULT_PARTITION else partition.encode()
        page: _EntryPage = []
        async with contextlib.aclosing(self._history(lo, hi)) as pages:
            async for items in pages:
                for key, blob in items:
                    found = _held(blob, seq)
                    if found is None:
                        continue
                    raw, expires = found
                    if wanted is not None and raw[19 : 19 + raw[0]] != wanted:
                        continue
                    page.append(parse_entry(key.decode(), raw, expires))
                    if len(page) >= page_size:
                        yield page
                        page = []
        # A delete of this snapshot that began meanwhile may have dropped records read here.
        now = await self._get(name)
        if now is None or now.deleting or now.seq != seq:
            raise snapshot_not_found(self._namespace, name)
        if page:
            yield page

    # ---------------------------------------------------------------- the lock

    def _lost(self, what: str) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"Redis ({self._connector.where}): the snapshot {what} of namespace "
            f"{self._namespace!r} lost its lock (not extended within {self.lock_ttl_ms} ms) "
            "and stopped; what it wrote is invisible and the next create or delete repairs it"
        )

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[bytes]:
        """Hold the namespace's snapshot lock (waiting up to :attr:`lock_wait` for it), extended
        by a task while the body runs; yields its token."""
        token = os.urandom(16).hex().encode()
        ttl = self.lock_ttl_ms
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lock_wait
        pause = 0.01
        # Sent again after a lost reply, the call finds its own token: retried like a read.
        while not await self._connector.call(_LOCK, self._keys, token, ttl, write=False):
            if loop.time() >= deadline:
                raise BackendUnavailableError(
                    f"Redis ({self._connector.where}): the snapshots of namespace "
                    f"{self._namespace!r} stayed locked by another create or delete for "
                    f"{self.lock_wait:g} s"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.2)
        keeper = asyncio.create_task(self._keep(token, ttl))
        try:
            yield token
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            try:
                await self._connector.call(_UNLOCK, self._keys, token, write=False)
            except FleetmemError as exc:  # it expires by itself within its TTL
                _log.warning(
                    "Redis (%s): could not release the snapshot lock of namespace %r (%s); "
                    "it expires within %d ms",
                    self._connector.where,
                    self._namespace,
                    exc,
                    ttl,
                )

    async def _keep(self, token: bytes, ttl: int) -> None:
        """Extend the lock every third of its TTL until cancelled or lost (then the next
        write script refuses, and the create or delete raises)."""
        while True:
            await asyncio.sleep(ttl / 3000)
            try:
                if not await self._connector.call(_RENEW, self._keys, token, ttl, write=False):
                    return
            except FleetmemError as exc:  # try again at the next turn, while it lives
                _log.warning(
                    "Redis (%s): could not extend the snapshot lock of namespace %r: %s",
                    self._connector.where,
                    self._namespace,
                    exc,
                )

    async def _flush(self, script: Script, token: bytes, batch: _Batch, what: str) -> None:
        if not batch.args:
            return
        done = await self._connector.call(
            script, self._keys, token, batch.records, batch.bytes, *batch.args, write=True
        )
        if not done:
            raise self._lost(what)
        batch.args = []
        batch.records = batch.bytes = batch.size = 0

    async def _set_row(self, token: bytes, name: str, stored: bytes, what: str) -> None:
        done = await self._connector.call(_CATALOG, self._keys, token, name, stored, write=True)
        if not done:
            raise self._lost(what)

    # ---------------------------------------------------------------- create and delete

    async def create(self, name: str) -> SnapshotRow:
        async with self._locked() as token:
            catalog = await self._catalog()
            taken = catalog.get(name)
            if taken is not None and not taken.deleting:
                raise snapshot_exists(self._namespace, name)
            await self._finish_deletes(token, catalog)
            seq = max((row.seq for row in catalog.values()), default=0) + 1
            async with (
                contextlib.aclosing(self._live()) as live_pages,
                contextlib.aclosing(self._history(b"-", b"+")) as history_pages,
            ):
                keys, added = await self._merge_all(token, seq, live_pages, history_pages)
            at = await self._connector.call(
                _FINISH, self._keys, token, name, seq, keys, added, write=True
            )
            if not at:
                raise self._lost("create")
            return _Row(name, seq, int(at), keys, added, False).public()

    async def _merge_all(
        self,
        token: bytes,
        seq: int,
        live_pages: AsyncIterator[_LivePage],
        history_pages: AsyncIterator[_HistoryPage],
    ) -> tuple[int, int]:
        """The body of a create of ``seq``: the live entries merged with the keys that have
        records, in key order; returns the live entries read and the bytes of the records
        added."""
        live, history = _Stream(live_pages), _Stream(history_pages)
        batch = _Batch()
        keys = added = 0
        while True:
            if batch.args and (live.drained or history.drained):
                # Written before the next read: memory holds a page of each stream, and a
                # create cut short leaves what it did so far (repaired by the next one).
                await self._flush(_WRITE, token, batch, "create")
            entry = await live.head()
            held = await history.head()
            if entry is None and held is None:
                break
            if held is None or (entry is not None and entry[0] < held[0]):
                assert entry is not None
                key, blob, found = entry[0], b"", (entry[1], entry[2])
                live.advance()
            elif entry is None or held[0] < entry[0]:
                key, blob, found = held[0], held[1], None
                history.advance()
            else:
                key, blob, found = entry[0], held[1], (entry[1], entry[2])
                live.advance()
                history.advance()
            if found is not None:
                keys += 1
            change = _merge(key, blob, found, seq)
            added += change.added
            if change.blob is not None and batch.add(key, change):
                await self._flush(_WRITE, token, batch, "create")
        await self._flush(_WRITE, token, batch, "create")
        return keys, added

    async def delete(self, name: str) -> bool:
        async with self._locked() as token:
            catalog = await self._catalog()
            row = catalog.get(name)
            found = row is not None and not row.deleting
            if row is not None and found:
                # From here on it is hidden and its name free; the walk below, or the next
                # create or delete if this one dies, finishes it.
                row = catalog[name] = row._replace(deleting=True)
                await self._set_row(token, name, _stored(row), "delete")
            await self._finish_deletes(token, catalog)
            return found

    async def _finish_deletes(self, token: bytes, catalog: dict[str, _Row]) -> None:
        """Run the delete of every row marked ``deleting`` (oldest first), then remove the row
        from the catalog (and from ``catalog``)."""
        for row in sorted((r for r in catalog.values() if r.deleting), key=lambda r: r.seq):
            others = [r.seq for r in catalog.values() if r.name != row.name]
            below = max((s for s in others if s < row.seq), default=0)
            above = min((s for s in others if s > row.seq), default=None)
            newest = max([row.seq, *others])
            batch = _Batch()
            async with contextlib.aclosing(self._history(b"-", b"+")) as pages:
                async for items in pages:
                    for key, blob in items:
                        change = _drop(key, blob, row.seq, below, above, newest)
                        if change.blob is not None and batch.add(key, change):
                            await self._flush(_SHRINK, token, batch, "delete")
                    await self._flush(_SHRINK, token, batch, "delete")  # before the next read
            await self._set_row(token, row.name, b"", "delete")
            del catalog[row.name]
