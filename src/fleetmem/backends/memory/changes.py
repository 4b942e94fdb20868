"""The change feed held in this process's memory: the reference implementation.

Each namespace with a feed has a deque of its changes; a write appends its changes before it
returns (no ``await`` between the write and its record, so they are atomic for every other
coroutine). Positions count up from 1 per epoch, epochs count up per store, and trimming
pops from the left: the floor is the last position popped.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fleetmem._codec import decode_value
from fleetmem._notify import Notifier
from fleetmem.backends.seam import ChangeBackend, ChangeEvent, ChangePage

__all__ = ["FeedSpace", "MemoryChanges"]


def _dt(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


#: One recorded change: (pos, op, key, partition, version, payload, expires_at, at).
_Row = tuple[int, str, str | None, str | None, int | None, bytes | None, float | None, float]


@dataclass(slots=True)
class _Feed:
    epoch: int
    retention: float  # seconds
    rows: collections.deque[_Row] = field(default_factory=collections.deque)
    head: int = 0
    floor: int = 0


class FeedSpace:
    """The feeds of every namespace of one in-memory store (shared by its views)."""

    def __init__(self) -> None:
        self.feeds: dict[str, _Feed] = {}
        self.epochs = 0
        self.notifier = Notifier()

    def record(
        self,
        namespace: str,
        op: str,
        key: str | None,
        partition: str | None,
        version: int | None,
        payload: bytes | None,
        expires_at: float | None,
        now: float,
    ) -> None:
        """Append a change to ``namespace``'s feed, if it has one (the caller checked)."""
        feed = self.feeds[namespace]
        feed.head += 1
        feed.rows.append((feed.head, op, key, partition, version, payload, expires_at, now))
        self.notifier.notify_every(("changes", namespace))

    def close(self) -> None:
        self.feeds.clear()
        self.notifier.notify_all()


class MemoryChanges(ChangeBackend):
    """The feed of one namespace of an in-memory store."""

    def __init__(
        self, *, namespace: str, space: FeedSpace, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(namespace=namespace, notifier=space.notifier)
        self._space = space
        self._clock = clock

    def _feed(self) -> _Feed:
        feed = self._space.feeds.get(self._namespace)
        if feed is None:
            raise self.not_enabled()
        return feed

    async def enable(self, retention_ms: int) -> None:
        feed = self._space.feeds.get(self._namespace)
        if feed is not None:
            feed.retention = retention_ms / 1000.0
            return
        self._space.epochs += 1
        self._space.feeds[self._namespace] = _Feed(self._space.epochs, retention_ms / 1000.0)

    async def disable(self) -> None:
        if self._space.feeds.pop(self._namespace, None) is not None:
            self._notifier.notify_every(self.wake_key())  # watchers see the feed gone

    async def enabled(self) -> bool:
        return self._namespace in self._space.feeds

    async def head(self) -> tuple[int, int]:
        feed = self._feed()
        return feed.epoch, feed.head

    def _trim(self, feed: _Feed) -> None:
        cutoff = self._clock() - feed.retention
        rows = feed.rows
        while rows and rows[0][7] < cutoff:
            feed.floor = rows.popleft()[0]

    async def read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        feed = self._feed()
        self._trim(feed)
        if after is None:
            after = feed.floor
        else:
            assert epoch is not None
            self.check_after(epoch, after, feed.epoch, feed.floor, feed.head)
        rows = feed.rows
        # Positions are gapless from floor + 1: the first row after ``after`` is at this index.
        start = after - feed.floor
        events = [
            ChangeEvent(
                pos,
                op,
                key,
                partition,
                version,
                None if payload is None else decode_value(payload),
                _dt(expires_at),
                _dt(at),  # type: ignore[arg-type]
            )
            for pos, op, key, partition, version, payload, expires_at, at in (
                rows[i] for i in range(start, min(len(rows), start + limit))
            )
        ]
        return ChangePage(feed.epoch, events, events[-1].pos if events else after)
