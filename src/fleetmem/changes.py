"""``store.changes``: the change feed of a store's namespace (see ``docs/changes.md``).

The front end validates every argument before any I/O, turns the backend's positions into
cursors (:func:`fleetmem.backends.seam.encode_cursor`) and filters by pattern and partition;
recording happens in the backends, in the same statement, transaction or script as each write.

:meth:`Changes.watch` is a loop of reads: it reads what follows its cursor, yields what
matches, and when it has caught up waits for a wake-up (a notification from a write in this
process or another, with a poll as the fallback) before it reads again. Because it always
resumes from the last position it *read* -- not from a notification's content -- a lost
notification costs latency, never a change, and a dropped connection costs nothing: the loop
retries the read until the backend answers again or ``reconnect_timeout`` passes.
"""

from __future__ import annotations

import asyncio
import math
import reprlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import ClassVar, Protocol

from fleetmem._validate import GlobPattern, compile_glob, validate_optional_partition
from fleetmem.backends.seam import ChangeBackend, ChangeEvent, decode_cursor
from fleetmem.errors import BackendUnavailableError, InvalidArgumentError, StoreClosedError
from fleetmem.protocol import Change, ChangeBatch

__all__ = ["DEFAULT_RETENTION", "MAX_READ_LIMIT", "Changes"]

#: Seconds a feed keeps its changes when ``enable()`` is not told otherwise.
DEFAULT_RETENTION = 3600.0
#: The largest ``limit`` of one ``read``.
MAX_READ_LIMIT = 10_000
#: Changes a watch reads per round trip, and a filtered read per page.
_PAGE = 1000
#: The longest retention: ten years.
_MAX_RETENTION_SECONDS = 10 * 365 * 86400


def _retention_ms(retention: object) -> int:
    if isinstance(retention, bool) or not isinstance(retention, (int, float, timedelta)):
        raise InvalidArgumentError(
            f"retention must be a number of seconds or a timedelta, not {type(retention).__name__}"
        )
    if isinstance(retention, timedelta):
        seconds = retention.total_seconds()
    elif isinstance(retention, int) and retention > _MAX_RETENTION_SECONDS:
        seconds = math.inf  # may be too large for a float: refused below like any other
    else:
        seconds = float(retention)
    if math.isnan(seconds) or seconds <= 0:
        raise InvalidArgumentError(
            f"retention must be a positive number of seconds, not {retention!r}"
        )
    if seconds > _MAX_RETENTION_SECONDS:
        raise InvalidArgumentError(
            f"retention must be at most {_MAX_RETENTION_SECONDS} seconds (ten years), "
            f"not {reprlib.repr(retention)}"
        )
    return max(1, round(seconds * 1000))


def _limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgumentError(f"limit must be an int, not {type(limit).__name__}")
    if not 1 <= limit <= MAX_READ_LIMIT:
        raise InvalidArgumentError(f"limit must be between 1 and {MAX_READ_LIMIT}, not {limit}")
    return limit


def _reconnect_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentError(
            f"reconnect_timeout must be a number of seconds, not {type(value).__name__}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # a huge int: never give up
        seconds = math.inf
    if math.isnan(seconds) or seconds < 0:
        raise InvalidArgumentError(f"reconnect_timeout must be >= 0 seconds, not {value!r}")
    return seconds


def _check_cancelled() -> None:
    """Raise ``CancelledError`` if this task was asked to stop. Before Python 3.12,
    ``asyncio.wait_for`` (which drivers use inside their calls) swallows a cancellation that
    arrives as the awaited call completes, returning its result instead: the watch loop would
    go on for ever after its task was cancelled."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


class _Filter:
    """A pattern and a partition, as ``read`` and ``watch`` apply them: ``clear`` changes
    always pass (they may remove matching keys)."""

    __slots__ = ("_glob", "_partition")

    def __init__(self, glob: GlobPattern | None, partition: str | None) -> None:
        self._glob = glob
        self._partition = partition

    @property
    def everything(self) -> bool:
        return self._glob is None and self._partition is None

    def passes(self, event: ChangeEvent) -> bool:
        if event.op == "clear":
            return True
        if self._partition is not None and event.partition != self._partition:
            return False
        return self._glob is None or (event.key is not None and self._glob.matches(event.key))


def _filter(pattern: object, partition: object) -> _Filter:
    glob = None if pattern is None else compile_glob(pattern)
    if glob is not None and glob.pattern == "*":
        glob = None  # every key
    return _Filter(glob, validate_optional_partition(partition))


class WatchObserver(Protocol):
    """What :attr:`Changes._watch_observer` is told."""

    def delivered(self, feed: Changes, change: Change) -> None: ...


class Changes:
    """The change feed of one namespace: ``store.changes``.

    Enabling is server-side and per namespace: once :meth:`enable` returned, every write of the
    namespace is recorded, by every process. Reading or watching a feed that is not enabled
    raises ``ChangesNotEnabledError``.
    """

    __slots__ = ("_backend", "_check_open", "_closed")

    #: Told of each change :meth:`watch` delivers (``fleetmem.observability`` sets it on an
    #: instrumented store's feed to measure the watchers' lag); None costs one test.
    _watch_observer: ClassVar[WatchObserver | None] = None

    def __init__(
        self,
        backend: ChangeBackend,
        check_open: Callable[[], None],
        closed: Callable[[], bool],
    ) -> None:
        self._backend = backend
        self._check_open = check_open
        self._closed = closed

    @property
    def namespace(self) -> str:
        return self._backend.namespace

    def _change(self, epoch: int, event: ChangeEvent) -> Change:
        return Change(
            self._backend.cursor(epoch, event.pos),
            event.op,
            event.key,
            event.partition,
            event.version,
            event.value,
            event.expires_at,
            event.at,
        )

    async def enable(self, retention: float | timedelta = DEFAULT_RETENTION) -> None:
        """Record every write of this namespace from now on, keeping each change at least
        ``retention`` seconds (trimmed at most 10 s later). On an enabled feed, only sets the
        retention. Idempotent."""
        ms = _retention_ms(retention)
        self._check_open()
        await self._backend.enable(ms)

    async def disable(self) -> None:
        """Stop recording and drop the log; every cursor given so far is expired. Nothing when
        the feed is not enabled."""
        self._check_open()
        await self._backend.disable()

    async def enabled(self) -> bool:
        self._check_open()
        return await self._backend.enabled()

    async def cursor(self) -> str:
        """The head: the cursor just after the newest change (read or watch from it to get
        only what comes next)."""
        self._check_open()
        epoch, pos = await self._backend.head()
        return self._backend.cursor(epoch, pos)

    async def read(
        self,
        since: str | None = None,
        limit: int = 1000,
        pattern: str | None = None,
        partition: str | None = None,
    ) -> ChangeBatch:
        """Up to ``limit`` changes after ``since`` (``None``: from the oldest retained) that
        match ``pattern`` and ``partition`` (``clear`` changes always match), in feed order;
        pass the batch's ``cursor`` as the next ``since``. An empty batch means the reader is
        at the head."""
        lim = _limit(limit)
        flt = _filter(pattern, partition)
        epoch, after = (None, None) if since is None else decode_cursor(self.namespace, since)
        self._check_open()
        backend = self._backend
        if flt.everything:
            page = await backend.read(epoch, after, lim)
            return ChangeBatch(
                [self._change(page.epoch, e) for e in page.events],
                backend.cursor(page.epoch, page.last),
            )
        out: list[Change] = []
        while True:
            page = await backend.read(epoch, after, _PAGE)
            epoch = page.epoch
            for event in page.events:
                if flt.passes(event):
                    out.append(self._change(epoch, event))
                    if len(out) == lim:
                        return ChangeBatch(out, backend.cursor(epoch, event.pos))
            after = page.last
            if len(page.events) < _PAGE:
                return ChangeBatch(out, backend.cursor(epoch, after))

    def watch(
        self,
        pattern: str = "*",
        partition: str | None = None,
        since: str | None = None,
        *,
        reconnect_timeout: float = 30.0,
    ) -> AsyncIterator[Change]:
        """The changes matching ``pattern`` and ``partition`` (``clear`` changes always), first
        those after ``since`` (``None``: from the head, i.e. only new ones), then live ones as
        they happen.

        The iterator survives the backend dropping its connections: it retries and resumes
        after the last change it read, with no gap and no duplicate. If the backend stays
        unreachable longer than ``reconnect_timeout`` seconds it raises
        ``BackendUnavailableError`` (resume with ``since=`` the last cursor you got). Closing
        the store ends the loop normally. Arguments are checked here, before any I/O."""
        flt = _filter(pattern, partition)
        start = None if since is None else decode_cursor(self.namespace, since)
        timeout = _reconnect_timeout(reconnect_timeout)
        self._check_open()
        return self._watch(flt, start, timeout)

    async def _watch(
        self, flt: _Filter, start: tuple[int, int] | None, reconnect_timeout: float
    ) -> AsyncIterator[Change]:
        backend = self._backend
        failing_since: float | None = None
        delay = 0.05
        position: tuple[int, int] | None = start
        with backend.watch() as watch:
            while not self._closed():
                attempt_started = time.monotonic()
                try:
                    await backend.listen()
                    if position is None:
                        position = await backend.head()
                    epoch, after = position
                    page = await backend.read(epoch, after, _PAGE)
                    _check_cancelled()
                    if not page.events:
                        await backend.wait(watch, epoch, after, backend.poll_interval)
                        _check_cancelled()
                except StoreClosedError:
                    return
                except BackendUnavailableError:
                    if self._closed():
                        return
                    # The budget runs from the start of the first attempt that failed (its
                    # own timeout counts), so a watch gives up near reconnect_timeout.
                    if failing_since is None:
                        failing_since = attempt_started
                    if time.monotonic() - failing_since > reconnect_timeout:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                failing_since = None
                delay = 0.05
                for event in page.events:
                    position = (page.epoch, event.pos)
                    if flt.passes(event):
                        change = self._change(page.epoch, event)
                        if self._watch_observer is not None:
                            self._watch_observer.delivered(self, change)
                        yield change
                if page.events:
                    position = (page.epoch, page.last)
