"""``InMemoryKV``: the key-value primitive held in this process's memory.

Entries live in a dict per namespace, values kept as encoded JSON so that a read never returns
an object the caller can mutate in place. Every operation runs without awaiting anything between
its read and its write, so each one is atomic with respect to other coroutines. Expiry uses the
process's wall clock (there is no server clock).
"""

from __future__ import annotations

import bisect
import operator
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, MutableSet
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from fleetmem._codec import decode_value, encode_value, incremented
from fleetmem._validate import DEFAULT_PARTITION, GlobPattern
from fleetmem.backends.memory.changes import FeedSpace, MemoryChanges
from fleetmem.backends.memory.leases import Coordination, MemoryAgents, MemoryLeases, check_fence
from fleetmem.backends.memory.queues import MemoryQueues, QueueSpace
from fleetmem.backends.memory.snapshots import MemorySnapshots, SnapshotSpace
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
    SnapshotBackend,
)
from fleetmem.errors import (
    KeyNotFoundError,
    VersionConflictError,
)
from fleetmem.protocol import Entry, StoreStats

__all__ = ["InMemoryKV"]


@dataclass(slots=True)
class _Record:
    payload: bytes
    partition: str
    version: int
    created_at: float
    updated_at: float
    expires_at: float | None  # epoch seconds


def _dt(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


_DIGITS = b"0123456789"

#: A record's fields as an export's snapshot copies them.
_Row = tuple[str, bytes, str, int, float, float, float | None]


def _entries(rows: list[_Row]) -> list[Entry]:
    """``rows`` as entries. Entries written by one batch share their timestamps: the last
    conversion of each is reused."""
    out: list[Entry] = []
    append = out.append
    utc = timezone.utc
    stamp = datetime.fromtimestamp
    last_c = last_u = -1.0
    c_dt = u_dt = _EPOCH
    for key, payload, partition, version, created, updated, expires in rows:
        if created != last_c:
            last_c, c_dt = created, stamp(created, utc)
        if updated == created:
            u = c_dt
        else:
            if updated != last_u:
                last_u, u_dt = updated, stamp(updated, utc)
            u = u_dt
        # A value holding 19 digits or more may hold an integer beyond 64 bits: the codec.
        if len(payload) - len(payload.translate(None, _DIGITS)) < 19:
            value = orjson.loads(payload)
        else:
            value = decode_value(payload)
        append(
            Entry(
                key,
                value,
                partition,
                version,
                c_dt,
                u,
                None if expires is None else stamp(expires, utc),
            )
        )
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_first = operator.itemgetter(0)


class InMemoryKV(KVBackend):
    """Entries in a dict per namespace; views share the dicts, nothing survives the process."""

    backend_name = "memory"

    def __init__(self, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._spaces: dict[str, dict[str, _Record]] = {}
        self._coord = Coordination()
        self._queue_space = QueueSpace()
        self._feeds = FeedSpace()
        self._snapshot_space = SnapshotSpace()
        self._bind_namespace()

    def _bind_namespace(self) -> None:
        self._data = self._spaces.setdefault(self._namespace, {})

    # ------------------------------------------------------------------ helpers

    def _live(self, key: str, now: float) -> _Record | None:
        record = self._data.get(key)
        if record is None:
            return None
        if record.expires_at is not None and record.expires_at <= now:
            del self._data[key]
            return None
        return record

    def _iter_live(self, now: float) -> Iterator[tuple[str, _Record]]:
        for key, record in self._data.items():
            if record.expires_at is None or record.expires_at > now:
                yield key, record

    def _entry(self, key: str, record: _Record) -> Entry:
        return Entry(
            key,
            decode_value(record.payload),
            record.partition,
            record.version,
            _dt(record.created_at),  # type: ignore[arg-type]
            _dt(record.updated_at),  # type: ignore[arg-type]
            _dt(record.expires_at),
        )

    @staticmethod
    def _meta(record: _Record) -> EntryMeta:
        return EntryMeta(
            record.partition,
            record.version,
            _dt(record.created_at),
            _dt(record.updated_at),
            _dt(record.expires_at),
        )

    def _write(
        self,
        key: str,
        payload: bytes,
        now: float,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        current: _Record | None,
    ) -> _Record:
        if current is None:
            expires = None if ttl_ms is None else now + ttl_ms / 1000.0
            record = _Record(payload, partition or DEFAULT_PARTITION, 1, now, now, expires)
            self._data[key] = record
            return record
        current.payload = payload
        current.version += 1
        current.updated_at = now
        if partition is not None:
            current.partition = partition
        if ttl_ms is not None:
            current.expires_at = now + ttl_ms / 1000.0
        elif not keep_ttl:
            current.expires_at = None
        return current

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Any:
        record = self._live(key, time.time())
        return MISSING if record is None else decode_value(record.payload)

    async def get_entry(self, key: str) -> Entry | None:
        record = self._live(key, time.time())
        return None if record is None else self._entry(key, record)

    async def get_many(self, keys: list[str]) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for key in keys:
            record = self._live(key, now)
            if record is not None:
                out[key] = decode_value(record.payload)
        return out

    async def exists(self, key: str) -> bool:
        return self._live(key, time.time()) is not None

    async def ttl(self, key: str) -> float | None:
        now = time.time()
        record = self._live(key, now)
        if record is None:
            raise KeyNotFoundError(f"key {key!r} does not exist")
        return None if record.expires_at is None else max(0.0, record.expires_at - now)

    def _sorted_live(self, partition: str | None, start: str, now: float) -> list[str]:
        keys = sorted(
            k
            for k, r in self._iter_live(now)
            if k >= start and (partition is None or r.partition == partition)
        )
        return keys

    async def keys(
        self, prefix: str, partition: str | None, limit: int | None, after: str | None
    ) -> list[str]:
        now = time.time()
        keys = self._sorted_live(partition, prefix, now)
        if after is not None:
            keys = keys[bisect.bisect_right(keys, after) :]
        out: list[str] = []
        for key in keys:
            if not key.startswith(prefix):
                break
            out.append(key)
            if limit is not None and len(out) >= limit:
                break
        return out

    async def search(
        self, pattern: GlobPattern, partition: str | None, limit: int | None
    ) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        prefix = pattern.prefix
        for key in self._sorted_live(partition, prefix, now):
            if not key.startswith(prefix):
                break
            if pattern.matches(key):
                out[key] = decode_value(self._data[key].payload)
                if limit is not None and len(out) >= limit:
                    break
        return out

    async def partitions(self) -> list[str]:
        return sorted({r.partition for _, r in self._iter_live(time.time())})

    async def namespaces(self, prefix: str, limit: int | None, after: str | None) -> list[str]:
        # The dict of namespaces is the index. A namespace is live once one of its entries is:
        # the scan of one stops at its first live entry and frees the expired ones before it,
        # so each expired entry is looked at once.
        now = time.time()
        out: list[str] = []
        for name in sorted(n for n in self._spaces if n.startswith(prefix)):
            if (after is not None and name <= after) or name.startswith(RESERVED_NAMESPACE_PREFIX):
                continue
            data = self._spaces[name]
            expired: list[str] = []
            live = False
            for key, record in data.items():
                if record.expires_at is None or record.expires_at > now:
                    live = True
                    break
                expired.append(key)
            for key in expired:
                del data[key]
            if live:
                out.append(name)
                if limit is not None and len(out) >= limit:
                    break
        return out

    async def stats(self) -> StoreStats:
        now = time.time()
        counts: dict[str, int] = {}
        live = size = 0
        for _, record in self._iter_live(now):
            live += 1
            size += len(record.payload)
            counts[record.partition] = counts.get(record.partition, 0) + 1
        return StoreStats(
            namespace=self._namespace,
            keys=live,
            partitions=dict(sorted(counts.items())),
            expired_pending=len(self._data) - live,
            bytes=size,
            backend=self.backend_name,
        )

    async def health(self) -> dict[str, Any]:
        return {"namespaces": len(self._spaces), "entries": len(self._data)}

    # ------------------------------------------------------------------ writes

    def leases(self) -> LeaseBackend:
        return MemoryLeases(namespace=self._namespace, coord=self._coord, clock=time.time)

    def agents(self) -> AgentBackend:
        return MemoryAgents(namespace=self._namespace, coord=self._coord, clock=time.time)

    def queues(self) -> QueueBackend:
        return MemoryQueues(namespace=self._namespace, space=self._queue_space, clock=time.time)

    def changes(self) -> ChangeBackend:
        return MemoryChanges(namespace=self._namespace, space=self._feeds, clock=time.time)

    def snapshots(self) -> SnapshotBackend:
        return MemorySnapshots(
            namespace=self._namespace,
            space=self._snapshot_space,
            data=self._data,
            clock=time.time,
            entries=_entries,
        )

    def _recorded_set(self, key: str, record: _Record, now: float) -> None:
        """Record a ``set`` change of ``key`` when the namespace has a feed."""
        if self._namespace in self._feeds.feeds:
            self._feeds.record(
                self._namespace,
                "set",
                key,
                record.partition,
                record.version,
                record.payload,
                record.expires_at,
                now,
            )

    def _recorded(
        self,
        op: str,
        key: str | None,
        partition: str | None,
        version: int | None,
        expires_at: float | None,
        now: float,
    ) -> None:
        """Record a ``delete``, ``ttl`` or ``clear`` change when the namespace has a feed."""
        if self._namespace in self._feeds.feeds:
            self._feeds.record(self._namespace, op, key, partition, version, None, expires_at, now)

    def _fence(self, fence: Fence | None, now: float) -> None:
        if fence is not None:
            check_fence(self._coord, self._namespace, fence, now)

    async def set(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        keep_ttl: bool,
        fence: Fence | None = None,
    ) -> EntryMeta:
        now = time.time()
        self._fence(fence, now)
        record = self._write(key, payload, now, ttl_ms, partition, keep_ttl, self._live(key, now))
        self._recorded_set(key, record, now)
        return self._meta(record)

    async def set_many(
        self,
        chunks: Iterator[list[tuple[str, bytes]]],
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int:
        # No await in here: the whole call is atomic for other coroutines, so one fence check
        # covers every chunk (as one transaction does on SQLite and PostgreSQL).
        self._fence(fence, time.time())
        # Whether the feed is on, looked up once: nothing in here awaits, so it cannot change.
        recording = self._namespace in self._feeds.feeds
        count = 0
        for chunk in chunks:
            now = time.time()
            for key, payload in chunk:
                record = self._write(
                    key, payload, now, ttl_ms, partition, False, self._live(key, now)
                )
                if recording:
                    self._recorded_set(key, record, now)
            count += len(chunk)
        return count

    async def set_if_absent(
        self,
        key: str,
        payload: bytes,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> bool:
        now = time.time()
        self._fence(fence, now)
        if self._live(key, now) is not None:
            return False
        self._recorded_set(key, self._write(key, payload, now, ttl_ms, partition, False, None), now)
        return True

    async def compare_and_set(
        self,
        key: str,
        payload: bytes,
        version: int,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> EntryMeta:
        now = time.time()
        self._fence(fence, now)
        current = self._live(key, now)
        current_version = 0 if current is None else current.version
        if current_version != version:
            raise VersionConflictError(key, version, current_version)
        record = self._write(key, payload, now, ttl_ms, partition, True, current)
        self._recorded_set(key, record, now)
        return self._meta(record)

    async def incr(
        self,
        key: str,
        amount: int | float,
        ttl_ms: int | None,
        partition: str | None,
        fence: Fence | None = None,
    ) -> int | float:
        now = time.time()
        self._fence(fence, now)
        current = self._live(key, now)
        base: Any = 0 if current is None else decode_value(current.payload)
        result = incremented(key, base, amount)
        record = self._write(key, encode_value(result), now, ttl_ms, partition, True, current)
        self._recorded_set(key, record, now)
        return result

    async def delete(self, key: str, fence: Fence | None = None) -> bool:
        now = time.time()
        self._fence(fence, now)
        record = self._live(key, now)
        if record is None:
            return False
        del self._data[key]
        self._recorded("delete", key, record.partition, None, None, now)
        return True

    async def delete_many(self, keys: list[str], fence: Fence | None = None) -> int:
        now = time.time()
        self._fence(fence, now)
        count = 0
        for key in keys:
            record = self._live(key, now)
            if record is not None:
                del self._data[key]
                self._recorded("delete", key, record.partition, None, None, now)
                count += 1
        return count

    async def expire(self, key: str, ttl_ms: int | None, version: int | None = None) -> bool:
        now = time.time()
        record = self._live(key, now)
        if record is None or (version is not None and record.version != version):
            return False
        record.expires_at = None if ttl_ms is None else now + ttl_ms / 1000.0
        self._recorded("ttl", key, record.partition, record.version, record.expires_at, now)
        return True

    async def clear(self, partition: str | None) -> int:
        now = time.time()
        doomed = [k for k, r in self._data.items() if partition is None or r.partition == partition]
        live = 0
        for key in doomed:
            record = self._data.pop(key)
            if record.expires_at is None or record.expires_at > now:
                live += 1
        if live:
            self._recorded("clear", None, partition, None, None, now)
        return live

    async def cleanup_expired(self) -> int:
        now = time.time()
        doomed = [
            k for k, r in self._data.items() if r.expires_at is not None and r.expires_at <= now
        ]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    # ------------------------------------------------------------------ portability

    #: The export is a sorted copy of the live records taken in one synchronous step.
    export_consistency = "snapshot"
    #: A replace is applied in one synchronous step once every page has arrived.
    replace_is_atomic = True

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        """A snapshot: the matching live records are copied (their fields, not the mutable
        records; payloads are shared, being immutable) and sorted without awaiting, so the
        pages show one instant whatever is written while they are read."""
        now = time.time()
        snapshot = sorted(
            [
                (key, r.payload, r.partition, r.version, r.created_at, r.updated_at, r.expires_at)
                for key, r in self._data.items()
                if (r.expires_at is None or r.expires_at > now)
                and key.startswith(prefix)
                and (partition is None or r.partition == partition)
            ],
            key=_first,
        )
        for start in range(0, len(snapshot), page_size):
            yield _entries(snapshot[start : start + page_size])

    def _apply_import(
        self, ops: list[ImportOp], missing_only: bool, now: float, keep: MutableSet[str] | None
    ) -> ImportTally:
        """Write ``ops`` without awaiting (as ``set`` with the op's absolute expiry), recording
        a ``set`` change per write; with ``keep``, add each written key to it."""
        data = self._data
        recording = self._namespace in self._feeds.feeds
        written = expired = existing = 0
        for key, payload, partition, expires_dt in ops:
            expires = None if expires_dt is None else expires_dt.timestamp()
            if expires is not None and expires <= now:
                expired += 1
                continue
            record = data.get(key)
            if record is not None and record.expires_at is not None and record.expires_at <= now:
                record = None
            if record is None:
                record = _Record(payload, partition, 1, now, now, expires)
                data[key] = record
            elif missing_only:
                existing += 1
                continue
            else:
                record.payload = payload
                record.version += 1
                record.updated_at = now
                record.partition = partition
                record.expires_at = expires
            if recording:
                self._recorded_set(key, record, now)
            if keep is not None:
                keep.add(key)
            written += 1
        return ImportTally(written, expired, existing)

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        """One synchronous pass: atomic for other coroutines, expiry on one clock reading."""
        return self._apply_import(ops, missing_only, time.time(), None)

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        """Atomic: the pages are gathered first (the ops share their payloads with the records
        they become), then written and the other keys deleted in one synchronous step, so no
        coroutine sees a half-replaced namespace and a failure while reading the pages changes
        nothing.

        Memory: unlike every other import path, this holds *all* the pages of the input at
        once (not one page), briefly next to the namespace's old records. A decision, not an
        oversight: the memory backend holds the whole namespace in memory anyway, and the
        payloads gathered are the very objects the new records keep, so the peak is about the
        old namespace plus the new one -- what atomicity costs here."""
        gathered: list[list[ImportOp]] = [page async for page in pages]
        now = time.time()
        keep: set[str] = set()
        written = expired = 0
        for page in gathered:
            tally = self._apply_import(page, False, now, keep)
            written += tally.written
            expired += tally.expired
        data = self._data
        for key in [k for k in data if k not in keep]:
            record = data.pop(key)
            if record.expires_at is None or record.expires_at > now:
                self._recorded("delete", key, record.partition, None, None, now)
        return ImportTally(written, expired, 0)

    async def aclose(self) -> None:
        self._spaces.clear()
        self._coord.leases.clear()
        self._coord.agents.clear()
        self._coord.notifier.notify_all()  # waiting acquires see the store closed
        self._queue_space.queues.clear()
        self._queue_space.notifier.notify_all()
        self._feeds.close()
