"""``MemorySnapshots``: named, incremental snapshots held in this process's memory.

The record model of :class:`fleetmem.backends.seam.SnapshotBackend`, kept per namespace in a
:class:`SnapshotSpace` that every view of one store shares: each key with records has a list of
them, ascending by ``from_seq``, whose last one is *open* (``to_seq`` ``None``) when the newest
snapshot holds the key. Every method runs without awaiting between its reads and writes, so
each is atomic with respect to other coroutines and one instant of the namespace.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from fleetmem.backends.seam import (
    SnapshotBackend,
    SnapshotRow,
    record_bytes,
    snapshot_exists,
    snapshot_not_found,
)
from fleetmem.protocol import Entry

__all__ = ["MemorySnapshots", "SnapshotSpace"]

#: A record's fields as an entry row: key, payload, partition, version, created, updated,
#: expires (epoch seconds).
Row = tuple[str, bytes, str, int, float, float, float | None]


class LiveRecord(Protocol):
    """What the memory key-value backend keeps per entry."""

    payload: bytes
    partition: str
    version: int
    created_at: float
    updated_at: float
    expires_at: float | None


@dataclass(slots=True)
class _SnapRecord:
    from_seq: int
    to_seq: int | None
    payload: bytes
    partition: str
    version: int
    created_at: float
    updated_at: float
    expires_at: float | None
    bytes: int

    def same(self, live: LiveRecord) -> bool:
        return (
            self.version == live.version
            and self.created_at == live.created_at
            and self.updated_at == live.updated_at
            and self.expires_at == live.expires_at
            and self.partition == live.partition
            and self.payload == live.payload
        )

    def holds(self, seq: int) -> bool:
        return self.from_seq <= seq and (self.to_seq is None or seq < self.to_seq)


@dataclass(slots=True)
class _Namespace:
    catalog: dict[str, SnapshotRow] = field(default_factory=dict)
    records: dict[str, list[_SnapRecord]] = field(default_factory=dict)


class SnapshotSpace:
    """The snapshots of every namespace of one memory store (shared by its views)."""

    __slots__ = ("spaces",)

    def __init__(self) -> None:
        self.spaces: dict[str, _Namespace] = {}


_first = operator.itemgetter(0)


class MemorySnapshots(SnapshotBackend):
    """Snapshots of one namespace of a memory store."""

    def __init__(
        self,
        *,
        namespace: str,
        space: SnapshotSpace,
        data: dict[str, Any],
        clock: Callable[[], float],
        entries: Callable[[list[Row]], list[Entry]],
    ) -> None:
        super().__init__(namespace=namespace)
        self._ns = space.spaces.setdefault(namespace, _Namespace())
        self._data: dict[str, LiveRecord] = data
        self._clock = clock
        self._entries = entries

    async def create(self, name: str) -> SnapshotRow:
        ns = self._ns
        if name in ns.catalog:
            raise snapshot_exists(self._namespace, name)
        seq = max((row.seq for row in ns.catalog.values()), default=0) + 1
        now = self._clock()
        live = {
            key: r for key, r in self._data.items() if r.expires_at is None or r.expires_at > now
        }
        records = ns.records
        for key, history in records.items():
            last = history[-1]
            if last.to_seq is None:
                entry = live.get(key)
                if entry is None or not last.same(entry):
                    last.to_seq = seq
        added = 0
        for key, r in live.items():
            history = records.setdefault(key, [])
            if history and history[-1].to_seq is None:
                continue  # the newest snapshot's record is this entry, unchanged
            size = record_bytes(key, len(r.payload), r.partition)
            history.append(
                _SnapRecord(
                    seq,
                    None,
                    r.payload,
                    r.partition,
                    r.version,
                    r.created_at,
                    r.updated_at,
                    r.expires_at,
                    size,
                )
            )
            added += size
        row = SnapshotRow(name, seq, datetime.fromtimestamp(now, timezone.utc), len(live), added)
        ns.catalog[name] = row
        return row

    async def get(self, name: str) -> SnapshotRow | None:
        return self._ns.catalog.get(name)

    async def delete(self, name: str) -> bool:
        ns = self._ns
        row = ns.catalog.pop(name, None)
        if row is None:
            return False
        seq = row.seq
        below = max((r.seq for r in ns.catalog.values() if r.seq < seq), default=0)
        above = min((r.seq for r in ns.catalog.values() if r.seq > seq), default=None)
        emptied: list[str] = []
        for key, history in ns.records.items():
            kept: list[_SnapRecord] = []
            for record in history:
                if record.holds(seq) and record.from_seq > below:
                    held_above = above is not None and (
                        record.to_seq is None or record.to_seq > above
                    )
                    if not held_above:
                        continue  # no remaining snapshot holds it: freed
                if above is None and record.to_seq is not None and record.to_seq > below:
                    # Held by a remaining snapshot, so by ``below``, the newest one now: open
                    # again (closed at ``seq``, or at a seq deleted earlier and reused next).
                    record.to_seq = None
                kept.append(record)
            if not kept:
                emptied.append(key)
            elif len(kept) != len(history):
                history[:] = kept
        for key in emptied:
            del ns.records[key]
        return True

    async def pages(
        self, name: str, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        row = self._ns.catalog.get(name)
        if row is None:
            raise snapshot_not_found(self._namespace, name)
        seq = row.seq
        rows: list[Row] = []
        for key, history in self._ns.records.items():
            if not key.startswith(prefix):
                continue
            for r in history:
                if r.holds(seq):
                    if partition is None or r.partition == partition:
                        rows.append(
                            (
                                key,
                                r.payload,
                                r.partition,
                                r.version,
                                r.created_at,
                                r.updated_at,
                                r.expires_at,
                            )
                        )
                    break
        rows.sort(key=_first)
        for start in range(0, len(rows), page_size):
            yield self._entries(rows[start : start + page_size])

    async def usage(self) -> tuple[int, int]:
        count = size = 0
        for history in self._ns.records.values():
            count += len(history)
            size += sum(r.bytes for r in history)
        return count, size

    async def list(self) -> list[SnapshotRow]:
        return sorted(self._ns.catalog.values(), key=lambda row: (row.created_at, row.seq))
