"""Change-feed routes: the feed as Server-Sent Events, paged reads, enable and disable.

``GET changes/watch`` is ``store.changes.watch`` as an ``text/event-stream``. Each change is one
event::

    id: <cursor>
    event: change
    data: {"cursor", "op", "key", "partition", "version", "value", "expires_at", "at"}

The ``id`` is the change's cursor, so an ``EventSource`` that reconnects sends it back as
``Last-Event-ID`` and resumes exactly after the last change it received: nothing missed, nothing
repeated. ``Last-Event-ID`` wins over ``since``; with neither, the stream starts at the head
(only changes made from now on).

Decisions where the contract is silent:

* The stream opens with an ``event: ready`` whose ``id`` and ``data`` (``{"cursor"}``) are the
  cursor it starts from, so a client that loses the connection before the first change still
  resumes without a gap (an ``EventSource`` takes the ``id`` as its ``lastEventId``; it
  dispatches the event only to a listener of ``ready``). Every change is an ``event: change``
  (its ``op`` is in the data), so one listener sees them all.
* Everything that can be refused is checked before the stream starts, and answered as a
  problem: a bad pattern, partition or cursor ``400``, a feed not enabled ``409``, a cursor
  whose successors were trimmed ``410`` (with ``oldest``), too many streams for the token
  ``429``. A failure once the stream has started (the watcher fell behind the retention, the
  feed was disabled meanwhile, the backend stayed unreachable past the watch's reconnect
  budget) ends the stream with one ``event: error`` whose data is the problem's JSON; a client
  resumes from its last ``id`` (and gets the ``410`` itself if that cursor has expired).
* When idle, a comment line (``: keepalive``) goes out every ``sse_heartbeat`` seconds so that
  proxies keep the connection. ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` keep
  caches and nginx from holding events back.
* The stream counts against the token's ``max_streams_per_token`` for its whole life, and ends
  (normally, with no error event) when the server shuts down or the store closes; a client
  reconnects with ``Last-Event-ID`` as after any drop. A watcher that reads slower than the
  namespace is written does not buffer without bound: at most 1,000 changes wait for the
  client, then the watch pauses (and resumes from its cursor, so nothing is lost).
* ``GET changes`` without ``since`` reads from the oldest change retained (the library's
  ``read(since=None)``); ``limit`` is 1 to 10,000 (default 1,000).
* ``POST changes/enable`` takes ``{"retention"?}`` (seconds, default 3600) and answers
  ``{"enabled": true}``; ``POST changes/disable`` answers ``{"enabled": false}`` (also when the
  feed was not enabled). ``GET changes/cursor`` gives the head cursor (``{"cursor"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get, post
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream
from litestar.response.base import ASGIResponse

from fleetmem.changes import DEFAULT_RETENTION, MAX_READ_LIMIT, Changes
from fleetmem.errors import FleetmemError
from fleetmem.protocol import Change
from fleetmem.service.auth import Scope
from fleetmem.service.context import ServiceState, access, principal_of, state_of
from fleetmem.service.problems import Problem, problem_for

__all__ = ["ROUTES", "ChangeOut", "ClosingStream"]

log = logging.getLogger("fleetmem.service")

_NS = "/v1/ns/{namespace:str}"
_TAGS = ["changes"]
EVENT_STREAM = "text/event-stream"
#: Changes read ahead of a slow client before the watch pauses.
_QUEUE = 1000
#: Changes written to the client in one chunk at most.
_BATCH = 256
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChangeOut(msgspec.Struct):
    """One change of the feed (the ``data`` of an SSE ``change`` event). Times are RFC 3339
    UTC; ``key`` is ``null`` for a ``clear``, ``version`` and ``value`` for a ``delete``."""

    cursor: str
    op: str
    key: str | None
    partition: str | None
    version: int | None
    value: Any
    expires_at: datetime | None
    at: datetime


class ChangesOut(msgspec.Struct):
    """The changes after ``since``, in feed order; ``cursor`` is the next ``since`` (an empty
    ``changes`` means the reader is at the head)."""

    changes: list[ChangeOut]
    cursor: str


class CursorOut(msgspec.Struct):
    cursor: str


class EnableIn(msgspec.Struct, forbid_unknown_fields=True):
    """``retention``: seconds each change is kept at least (> 0)."""

    retention: float = DEFAULT_RETENTION


class EnabledOut(msgspec.Struct):
    enabled: bool


def _out(change: Change) -> ChangeOut:
    return ChangeOut(
        change.cursor,
        change.op,
        change.key,
        change.partition,
        change.version,
        change.value,
        change.expires_at,
        change.at,
    )


_encode = msgspec.json.Encoder().encode


def change_event(change: Change) -> bytes:
    """The SSE event of ``change`` (JSON has no raw line break, so ``data`` is one line)."""
    return (
        b"id: "
        + change.cursor.encode("ascii")
        + b"\nevent: change\ndata: "
        + _encode(_out(change))
        + b"\n\n"
    )


def _ready_event(cursor: str) -> bytes:
    data = _encode(CursorOut(cursor))
    return b"id: " + cursor.encode("ascii") + b"\nevent: ready\ndata: " + data + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    """The ``event: error`` that ends a stream, its data the problem's JSON."""
    if isinstance(exc, FleetmemError):
        problem = problem_for(exc)
    else:
        log.error("change stream failed: %s", type(exc).__name__)
        problem = Problem(500, "internal-error", "internal error")
    return b"event: error\ndata: " + _encode(problem.body()) + b"\n\n"


_KEEPALIVE = b": keepalive\n\n"


# ------------------------------------------------------------------ a stream that always closes


class _Closing:
    """The ASGI response of a :class:`ClosingStream`: after the response -- sent, failed, or
    cut short by the client going away -- ``close`` runs, whether or not the body's iterator
    was ever started (the iterator's own ``finally`` would not run if it never was)."""

    def __init__(self, inner: ASGIResponse, close: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self._inner(scope, receive, send)
        finally:
            await self._close()


class ClosingStream(Stream):
    """A streamed response that awaits ``close()`` once it is over, however it ends."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        *,
        close: Callable[[], Awaitable[None]],
        media_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._on_close = close

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        inner = super().to_asgi_response(*args, **kwargs)
        closing: Any = _Closing(inner, self._on_close)
        return closing  # type: ignore[no-any-return]


async def finish(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancel ``tasks`` and wait until they are done (their outcome retrieved)."""
    pending = [t for t in tasks if t is not None]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for task in pending:
        if not task.cancelled():
            task.exception()


# ------------------------------------------------------------------ the event stream


class _End:
    pass


_END = _End()


class _EventStream:
    """One client's watch: a task reads the watch into a bounded queue; the body generator
    writes what the queue holds, a heartbeat when idle, and stops at shutdown."""

    def __init__(
        self,
        watch: AsyncIterator[Change],
        start: str,
        state: ServiceState,
        release: contextlib.AsyncExitStack,
    ) -> None:
        self._watch = watch
        self._start = start
        self._state = state
        self._release = release
        self._queue: asyncio.Queue[Change | BaseException | _End] = asyncio.Queue(_QUEUE)
        self._pump: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        item: BaseException | _End = _END
        try:
            async with contextlib.aclosing(self._watch) as watch:  # type: ignore[type-var]
                async for change in watch:
                    await self._queue.put(change)
        except Exception as exc:  # reported to the client as the stream's last event
            item = exc
        await self._queue.put(item)

    async def body(self) -> AsyncIterator[bytes]:
        shutting_down = self._state.shutting_down
        heartbeat = self._state.settings.sse_heartbeat
        queue = self._queue
        self._pump = asyncio.ensure_future(self._read())
        stop: asyncio.Future[Any] = asyncio.ensure_future(shutting_down.wait())
        getter: asyncio.Future[Any] | None = None
        try:
            yield _ready_event(self._start)
            while not shutting_down.is_set():
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                await asyncio.wait(
                    (getter, stop), timeout=heartbeat, return_when=asyncio.FIRST_COMPLETED
                )
                if not getter.done():
                    if stop.done():
                        return
                    yield _KEEPALIVE
                    continue
                items = [getter.result()]
                getter = None
                while len(items) < _BATCH:
                    try:
                        items.append(queue.get_nowait())
                    except asyncio.QueueEmpty:
                        break
                chunk = bytearray()
                for item in items:
                    if isinstance(item, Change):
                        chunk += change_event(item)
                        continue
                    if isinstance(item, BaseException):
                        chunk += error_event(item)
                    if chunk:
                        yield bytes(chunk)
                    return
                yield bytes(chunk)
        finally:
            # No await here: the generator may be closing inside a cancelled scope.
            stop.cancel()
            if getter is not None:
                getter.cancel()
            self._pump.cancel()

    async def close(self) -> None:
        try:
            await finish([self._pump])
        finally:
            await self._release.aclose()


_SINCE_DOC = "the cursor to start after (a cursor of this namespace); absent: from now"


@get(
    f"{_NS}/changes/watch",
    tags=_TAGS,
    summary="Watch the change feed (Server-Sent Events)",
    media_type=EVENT_STREAM,
    response_description="an event stream: 'ready', then one 'change' event per change "
    "(id = its cursor), ': keepalive' comments when idle, an 'error' event if it fails",
)
async def watch(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    pattern: Annotated[
        str, QueryParameter(description="a glob on keys ('clear' always passes)")
    ] = "*",
    partition: Annotated[str | None, QueryParameter()] = None,
    since: Annotated[str | None, QueryParameter(description=_SINCE_DOC)] = None,
    last_event_id: Annotated[
        str | None,
        HeaderParameter(
            name="Last-Event-ID",
            description="sent by a reconnecting EventSource; wins over since",
        ),
    ] = None,
) -> Stream:
    """``store.changes.watch`` as Server-Sent Events; ``409`` when the feed is not enabled,
    ``410`` (with ``oldest``) when ``since`` has expired, ``429`` over the token's stream cap."""
    store = access(request, namespace, Scope.READ)
    state = state_of(request)
    changes: Changes = store.changes
    start = last_event_id.strip() if last_event_id is not None else since
    # Checks the pattern, the partition and the cursor before anything else (no I/O yet).
    feed = changes.watch(pattern, partition, start)
    release = contextlib.AsyncExitStack()
    await release.enter_async_context(state.hold(principal_of(request), "stream"))
    try:
        if start is None:
            start = await changes.cursor()
            feed = changes.watch(pattern, partition, start)
        else:
            await changes.read(since=start, limit=1)  # not enabled / expired: refused here
    except BaseException:
        await release.aclose()
        raise
    stream = _EventStream(feed, start, state, release)
    return ClosingStream(
        stream.body(), close=stream.close, media_type=EVENT_STREAM, headers=_STREAM_HEADERS
    )


@get(f"{_NS}/changes", tags=_TAGS, summary="Read the change feed")
async def read_changes(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    since: Annotated[
        str | None,
        QueryParameter(description="the cursor to read after; absent: the oldest retained"),
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_READ_LIMIT)] = 1000,
    pattern: Annotated[str | None, QueryParameter(description="a glob on keys")] = None,
    partition: Annotated[str | None, QueryParameter()] = None,
) -> ChangesOut:
    """``store.changes.read``: up to ``limit`` changes after ``since`` matching ``pattern``
    and ``partition``; pass ``cursor`` as the next ``since``."""
    store = access(request, namespace, Scope.READ)
    batch = await store.changes.read(since=since, limit=limit, pattern=pattern, partition=partition)
    return ChangesOut([_out(c) for c in batch.changes], batch.cursor)


@get(f"{_NS}/changes/cursor", tags=_TAGS, summary="The head cursor of the change feed")
async def head_cursor(request: Request[Any, Any, Any], namespace: FromPath[str]) -> CursorOut:
    """The cursor just after the newest change (read or watch from it for what comes next)."""
    store = access(request, namespace, Scope.READ)
    return CursorOut(await store.changes.cursor())


@post(f"{_NS}/changes/enable", tags=_TAGS, summary="Enable the change feed", status_code=200)
async def enable(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    data: JSONBody[EnableIn | None] = None,
) -> EnabledOut:
    """``store.changes.enable`` (admin): record every write of the namespace from now on;
    on an enabled feed, only sets the retention."""
    store = access(request, namespace, Scope.ADMIN)
    retention = DEFAULT_RETENTION if data is None else data.retention
    await store.changes.enable(retention=retention)
    return EnabledOut(True)


@post(f"{_NS}/changes/disable", tags=_TAGS, summary="Disable the change feed", status_code=200)
async def disable(request: Request[Any, Any, Any], namespace: FromPath[str]) -> EnabledOut:
    """``store.changes.disable`` (admin): stop recording and drop the log; every cursor given
    so far expires."""
    store = access(request, namespace, Scope.ADMIN)
    await store.changes.disable()
    return EnabledOut(False)


ROUTES = [watch, read_changes, head_cursor, enable, disable]
