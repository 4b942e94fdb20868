"""The change feed's front end (``fleetmem.changes``) on its own: cursors, validation before
any I/O, filtering, and the watch loop's reconnection -- with a scripted ``ChangeBackend``
(the backends themselves are tested by the conformance suite and the integration tests)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest

from fleetmem import InMemoryStore
from fleetmem._notify import Notifier, Watch
from fleetmem.backends.seam import (
    ChangeBackend,
    ChangeEvent,
    ChangePage,
    decode_cursor,
    encode_cursor,
)
from fleetmem.changes import Changes
from fleetmem.errors import (
    BackendUnavailableError,
    ChangesExpiredError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidPatternError,
)

_AT = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _event(pos: int, key: str = "k", op: str = "set", partition: str = "default") -> ChangeEvent:
    return ChangeEvent(pos, op, key, partition, pos, pos, None, _AT)


class _Scripted(ChangeBackend):
    """A feed of ``events`` (epoch 1) whose ``read`` fails as ``failures`` says, counting I/O."""

    poll_interval = 0.01

    def __init__(self, events: list[ChangeEvent], failures: Callable[[int], bool]) -> None:
        super().__init__(namespace="ns", notifier=Notifier())
        self.events = events
        self.failures = failures
        self.calls = 0

    async def enable(self, retention_ms: int) -> None:
        self.calls += 1

    async def disable(self) -> None:
        self.calls += 1

    async def enabled(self) -> bool:
        self.calls += 1
        return True

    async def head(self) -> tuple[int, int]:
        self.calls += 1
        return 1, 0

    async def read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        self.calls += 1
        if self.failures(self.calls):
            raise BackendUnavailableError("connection cut")
        start = after or 0
        page = [e for e in self.events if e.pos > start][:limit]
        return ChangePage(1, page, page[-1].pos if page else start)

    async def wait(self, watch: Watch, epoch: int, after: int, timeout: float) -> None:
        await asyncio.sleep(0)


def _changes(backend: ChangeBackend, closed: Callable[[], bool] = lambda: False) -> Changes:
    return Changes(backend, lambda: None, closed)


def test_cursors_sort_in_feed_order_and_round_trip() -> None:
    cursors = [encode_cursor("ns", e, p) for e, p in [(1, 0), (1, 1), (1, 2**40), (2, 0), (2, 5)]]
    assert cursors == sorted(cursors)
    assert [decode_cursor("ns", c) for c in cursors] == [
        (1, 0),
        (1, 1),
        (1, 2**40),
        (2, 0),
        (2, 5),
    ]


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "garbage",
        encode_cursor("ns", 1, 1).upper(),
        encode_cursor("ns", 1, 1)[:-1],
        encode_cursor("ns", 1, 1) + "0",
        encode_cursor("ns", 1, 1).replace("-", "_"),
        encode_cursor("other", 1, 1),
        1,
        b"x",
    ],
)
def test_bad_cursors_are_refused_before_any_io(cursor: Any) -> None:
    backend = _Scripted([], lambda _: False)
    with pytest.raises(InvalidArgumentError):
        asyncio.run(_changes(backend).read(since=cursor))
    with pytest.raises(InvalidArgumentError):
        _changes(backend).watch(since=cursor)
    assert backend.calls == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.enable(0), InvalidArgumentError),
        (lambda c: c.enable(-1), InvalidArgumentError),
        (lambda c: c.enable(math.nan), InvalidArgumentError),
        (lambda c: c.enable(math.inf), InvalidArgumentError),
        (lambda c: c.enable(True), InvalidArgumentError),
        (lambda c: c.enable("60"), InvalidArgumentError),
        (lambda c: c.enable(None), InvalidArgumentError),
        (lambda c: c.read(limit=0), InvalidArgumentError),
        (lambda c: c.read(limit=10_001), InvalidArgumentError),
        (lambda c: c.read(limit=True), InvalidArgumentError),
        (lambda c: c.read(limit=1.0), InvalidArgumentError),
        (lambda c: c.read(pattern="[a"), InvalidPatternError),
        (lambda c: c.read(pattern=1), InvalidPatternError),
        (lambda c: c.read(partition=""), InvalidKeyError),
        (lambda c: c.read(partition="p" * 256), InvalidKeyError),
    ],
)
def test_bad_arguments_are_refused_before_any_io(
    call: Callable[[Changes], Any], error: type[Exception]
) -> None:
    backend = _Scripted([], lambda _: False)
    with pytest.raises(error):
        asyncio.run(call(_changes(backend)))
    assert backend.calls == 0


@pytest.mark.parametrize("timeout", [-1, math.nan, True, "1"])
def test_bad_reconnect_timeout_is_refused(timeout: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        _changes(_Scripted([], lambda _: False)).watch(reconnect_timeout=timeout)


def test_filtered_read_scans_to_the_limit_or_the_head() -> None:
    events = [_event(i, key=f"{'a' if i % 3 == 0 else 'b'}{i}") for i in range(1, 2500)]
    events.append(_event(2500, key=None, op="clear"))  # type: ignore[arg-type]
    backend = _Scripted(events, lambda _: False)
    changes = _changes(backend)
    batch = asyncio.run(changes.read(pattern="a*", limit=5))
    assert [c.key for c in batch.changes] == ["a3", "a6", "a9", "a12", "a15"]
    assert batch.cursor == batch.changes[-1].cursor
    rest = asyncio.run(changes.read(since=batch.cursor, pattern="a*", limit=10_000))
    keys = [c.key for c in rest.changes]
    # Every later 'a' key once, then the clear (which always passes), and the cursor at the end.
    assert keys == [f"a{i}" for i in range(18, 2500, 3)] + [None]
    assert decode_cursor("ns", rest.cursor) == (1, 2500)
    empty = asyncio.run(changes.read(since=rest.cursor, pattern="a*"))
    assert empty.changes == [] and empty.cursor == rest.cursor


def test_watch_resumes_after_failures_without_gap_or_duplicate() -> None:
    events = [_event(i, key=f"k{i}") for i in range(1, 3001)]
    # Every third read fails: the loop retries from the last position it read.
    backend = _Scripted(events, lambda n: n % 3 == 0)

    async def run() -> list[int]:
        seen: list[int] = []
        async for change in _changes(backend).watch(since=encode_cursor("ns", 1, 0)):
            seen.append(change.version or 0)
            if len(seen) == len(events):
                break
        return seen

    assert asyncio.run(run()) == list(range(1, 3001))


def test_watch_gives_up_after_reconnect_timeout() -> None:
    backend = _Scripted([_event(1)], lambda _: True)

    async def run() -> None:
        async for _ in _changes(backend).watch(reconnect_timeout=0.2):
            pass

    with pytest.raises(BackendUnavailableError):
        asyncio.run(asyncio.wait_for(run(), 30))


def test_watch_ends_when_the_store_closes() -> None:
    closed = False
    backend = _Scripted([], lambda _: False)

    async def run() -> str:
        async def close_soon() -> None:
            nonlocal closed
            await asyncio.sleep(0.05)
            closed = True

        task = asyncio.create_task(close_soon())
        async for _ in _changes(backend, lambda: closed).watch():
            pass
        await task
        return "ended"

    assert asyncio.run(asyncio.wait_for(run(), 30)) == "ended"


def test_memory_feed_expires_cursors_of_a_disabled_feed() -> None:
    async def run() -> None:
        store = InMemoryStore(namespace="t")
        await store.changes.enable()
        await store.set("a", 1)
        first = (await store.changes.read()).cursor
        await store.changes.disable()
        await store.changes.enable()
        with pytest.raises(ChangesExpiredError) as info:
            await store.changes.read(since=first)
        assert (await store.changes.read(since=info.value.oldest)).changes == []
        await store.close()

    asyncio.run(run())
