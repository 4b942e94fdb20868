"""Portability routes: streamed export and import, named snapshots, diff and restore.

``GET export`` streams ``store.export_to`` as ``application/jsonl`` (the fleetmem export format,
uncompressed); ``POST import?mode`` takes such a file as the request body and answers
``store.import_from``'s report. Snapshot names follow the key rules and may contain ``/``: the
name is the rest of the path after ``snapshots/``, taken from the raw path and percent-decoded
once, like a key under ``kv/``; the verbs are a last segment ``/restore`` (``POST``) and
``/diff`` (``GET``).

Decisions where the contract is silent:

* **Export streams without holding the export in memory, and without holding the backend.**
  The export runs as fast as the backend delivers it into a buffer that keeps up to 8 MiB in
  memory and spills the rest to an unnamed temporary file, which the response drains. So a
  slow client costs temporary disk, not memory, and never keeps the backend's consistent
  view (a PostgreSQL transaction) open for as long as it takes to download. Everything that
  can be refused (a bad prefix, partition or snapshot name, an unknown snapshot) is checked
  before the response starts and is a problem (``400``, ``404``). A failure after the stream
  started cannot change the status: the body then ends without its trailer line, and an
  import of it is refused ("no trailer"). A client that keeps the body must check the trailer
  (``fleetmem import`` and ``POST import`` do).
* **Import** reads the body as it arrives into a spool (``tempfile.SpooledTemporaryFile``: 16
  MiB in memory, then a temporary file) -- the body cap is ``max_import_bytes`` (``413``) --
  then checks it whole and writes it (``import_from``: nothing is written unless every line is
  valid). An invalid file is ``400`` with ``line`` (the line at fault; ``null`` for a problem
  of no line). An unknown ``mode`` is ``400`` before the body is read. Any content type is
  accepted; the body is the file's bytes, uncompressed.
* ``POST snapshots`` answers ``201`` with the snapshot (``409`` if the name exists);
  ``GET snapshots/{name}`` is ``404`` for an unknown name; ``DELETE`` answers
  ``{"deleted": true}`` or ``404``; ``restore`` answers ``{"restored": n}``; ``diff`` takes
  ``against`` (another snapshot; absent: the live namespace).
* A snapshot whose name ends in ``/diff`` cannot be read alone with ``GET snapshots/{name}``
  (that is the diff of the name before it): it is in ``GET snapshots``. One whose name ends
  in ``/restore`` is restored with ``POST snapshots/{name}/restore`` as any other.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Annotated, Any, BinaryIO, Literal, cast

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, JSONBody, PathParameter, QueryParameter
from litestar.response import Stream

from fleetmem.errors import KeyNotFoundError, SnapshotNotFoundError
from fleetmem.portability import check_mode
from fleetmem.protocol import Snapshot
from fleetmem.service.auth import Scope
from fleetmem.service.changes import ClosingStream, finish
from fleetmem.service.context import access, path_rest, principal_of, state_of

__all__ = ["ROUTES", "SnapshotOut"]

log = logging.getLogger("fleetmem.service")

_NS = "/v1/ns/{namespace:str}"
EXPORT_MEDIA_TYPE = "application/jsonl"
#: Bytes of an export held in memory for a slow client before the rest goes to a file.
SPILL_MEMORY = 8 * 1024 * 1024
#: Bytes of an import body held in memory before the spool moves to a temporary file.
IMPORT_SPOOL_MEMORY = 16 * 1024 * 1024
#: The largest chunk the response reads back from the spill file.
_READ_BACK = 1024 * 1024


class SnapshotOut(msgspec.Struct):
    """A snapshot: ``keys`` entries held when taken, ``bytes`` stored beyond what it shared
    with earlier snapshots when it was taken."""

    name: str
    created_at: datetime
    keys: int
    bytes: int


class SnapshotsOut(msgspec.Struct):
    """Ascending by ``created_at``."""

    snapshots: list[SnapshotOut]


class SnapshotIn(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class DiffOut(msgspec.Struct):
    """Keys, each list ascending: ``added`` (in ``against`` or the live namespace, not in the
    snapshot), ``removed`` (in the snapshot only), ``changed`` (another value or partition)."""

    added: list[str]
    removed: list[str]
    changed: list[str]


class RestoredOut(msgspec.Struct):
    restored: int


class DeletedOut(msgspec.Struct):
    deleted: bool


class ImportOut(msgspec.Struct):
    """``written`` entries; ``skipped_expired`` (their expiry had passed when written);
    ``skipped_existing`` (``missing`` mode: the key had a live entry)."""

    written: int
    skipped_expired: int
    skipped_existing: int


def _snapshot_out(snap: Snapshot) -> SnapshotOut:
    return SnapshotOut(snap.name, snap.created_at, snap.keys, snap.bytes)


# ------------------------------------------------------------------ export


class SpillBuffer:
    """A first-in first-out byte buffer, written synchronously (it is ``export_to``'s binary
    file object), read by the response: up to ``memory`` bytes wait in memory, beyond that in
    an unnamed temporary file until the reader has caught up."""

    def __init__(self, memory: int = SPILL_MEMORY) -> None:
        self._memory = memory
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._file: IO[bytes] | None = None
        self._written = 0  # bytes written to the file
        self._read = 0  # bytes of the file read back
        self.ready = asyncio.Event()
        self.total = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        size = len(data)
        if size:
            if self._file is None and self._held + size <= self._memory:
                self._chunks.append(bytes(data))
                self._held += size
            else:
                if self._file is None:
                    self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
                self._file.seek(self._written)
                self._file.write(data)
                self._written += size
            self.total += size
            self.ready.set()
        return size

    def flush(self) -> None:
        return None

    def read(self) -> bytes:
        """The next bytes written (in order), or ``b""`` when it holds none."""
        if self._chunks:
            chunk = self._chunks.popleft()
            self._held -= len(chunk)
            return chunk
        spill = self._file
        if spill is None or self._read == self._written:
            return b""
        spill.seek(self._read)
        chunk = spill.read(min(_READ_BACK, self._written - self._read))
        self._read += len(chunk)
        if self._read == self._written:  # caught up: back to memory
            self.close()
        return chunk

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._written = self._read = 0


class _Export:
    def __init__(self, task: asyncio.Task[Any], buffer: SpillBuffer) -> None:
        self._task = task
        self._buffer = buffer
        task.add_done_callback(lambda _: buffer.ready.set())

    async def started(self) -> None:
        """Wait until the export wrote its header (or ended); raise what it raised."""
        await self._buffer.ready.wait()
        task = self._task
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def body(self) -> AsyncIterator[bytes]:
        buffer = self._buffer
        task = self._task
        try:
            while True:
                chunk = buffer.read()
                if chunk:
                    yield chunk
                    continue
                if task.done():
                    if not task.cancelled() and task.exception() is not None:
                        log.warning(
                            "export failed after %d bytes were sent: %s (the body has no trailer)",
                            buffer.total,
                            type(task.exception()).__name__,
                        )
                    return
                buffer.ready.clear()
                await buffer.ready.wait()
        finally:
            task.cancel()

    async def close(self) -> None:
        try:
            await finish([self._task])
        finally:
            self._buffer.close()


@get(
    f"{_NS}/export",
    tags=["portability"],
    summary="Export the namespace (JSON Lines)",
    media_type=EXPORT_MEDIA_TYPE,
    response_description="the fleetmem export format: a header line, one line per live "
    "entry ascending by key, a trailer line with the count and SHA-256",
)
async def export(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    prefix: Annotated[str, QueryParameter(description="only keys starting with this")] = "",
    partition: Annotated[str | None, QueryParameter()] = None,
    snapshot: Annotated[
        str | None, QueryParameter(description="export what this snapshot holds instead")
    ] = None,
) -> Stream:
    """``store.export_to``, streamed: the live entries (of ``prefix`` and ``partition``), or
    those snapshot ``snapshot`` holds (``404`` if unknown). A body without its trailer line
    means the export failed after it started (an import refuses it)."""
    store = access(request, namespace, Scope.READ)
    # An export counts as a stream of its token while it runs (a read token cannot open any
    # number of them), and the app bounds it by transfer_timeout.
    release = contextlib.AsyncExitStack()
    await release.enter_async_context(state_of(request).hold(principal_of(request), "stream"))
    buffer = SpillBuffer()
    task = asyncio.ensure_future(
        store.export_to(
            cast(BinaryIO, buffer), prefix=prefix, partition=partition, snapshot=snapshot
        )
    )
    running = _Export(task, buffer)

    async def close() -> None:
        try:
            await running.close()
        finally:
            await release.aclose()

    try:
        await running.started()
    except BaseException:
        await close()
        raise
    return ClosingStream(
        running.body(),
        close=close,
        media_type=EXPORT_MEDIA_TYPE,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# ------------------------------------------------------------------ import


@dataclass
class _ImportOperation(Operation):
    """The import's request body in the OpenAPI document (the route reads it as a stream)."""

    def __post_init__(self) -> None:
        schema = Schema(type=OpenAPIType.STRING, description="a fleetmem export, uncompressed")
        self.request_body = RequestBody(
            content={
                EXPORT_MEDIA_TYPE: OpenAPIMediaType(schema=schema),
                "application/octet-stream": OpenAPIMediaType(
                    schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
                ),
            },
            required=True,
            description="the export file's bytes (JSON Lines)",
        )


@post(
    f"{_NS}/import",
    tags=["portability"],
    summary="Import an export (JSON Lines)",
    status_code=200,
    operation_class=_ImportOperation,
)
async def import_(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    mode: Annotated[
        Literal["merge", "missing", "replace"],
        QueryParameter(
            description="merge: write every entry; missing: only absent keys; replace: the "
            "namespace holds exactly the file's entries",
        ),
    ] = "merge",
) -> ImportOut:
    """``store.import_from`` (admin): the whole body is checked before the first write;
    an invalid file is ``400`` with ``line`` and nothing is written."""
    store = access(request, namespace, Scope.ADMIN)
    checked = check_mode(mode)
    # An import counts as a stream of its token while it runs; transfer_timeout bounds it.
    async with state_of(request).hold(principal_of(request), "stream"):
        with tempfile.SpooledTemporaryFile(max_size=IMPORT_SPOOL_MEMORY) as spool:
            async for chunk in request.stream():
                if chunk:
                    spool.write(chunk)
            spool.seek(0)
            report = await store.import_from(cast(BinaryIO, spool), mode=checked)
    return ImportOut(report.written, report.skipped_expired, report.skipped_existing)


# ------------------------------------------------------------------ snapshots


@get(f"{_NS}/snapshots", tags=["snapshots"], summary="List snapshots")
async def list_snapshots(request: Request[Any, Any, Any], namespace: FromPath[str]) -> SnapshotsOut:
    store = access(request, namespace, Scope.READ)
    return SnapshotsOut([_snapshot_out(s) for s in await store.snapshots.list()])


@post(f"{_NS}/snapshots", tags=["snapshots"], summary="Create a snapshot", status_code=201)
async def create_snapshot(
    request: Request[Any, Any, Any], namespace: FromPath[str], data: JSONBody[SnapshotIn]
) -> SnapshotOut:
    """``snapshots.create`` (admin): ``201`` with the snapshot; ``409`` if the name exists."""
    store = access(request, namespace, Scope.ADMIN)
    return _snapshot_out(await store.snapshots.create(data.name))


_NAME_DOC = "the snapshot name: the rest of the path, percent-decoded once"


def _name(request: Request[Any, Any, Any], suffix: str = "") -> str:
    name = path_rest(request, "/snapshots/")
    return name[: -len(suffix)] if suffix else name


def _missing(name: str) -> SnapshotNotFoundError:
    return SnapshotNotFoundError(f"no snapshot {name!r}")


@get(f"{_NS}/snapshots/{{rest:path}}", tags=["snapshots"], summary="Read a snapshot, or diff it")
async def get_snapshot(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: Annotated[str, PathParameter(description=_NAME_DOC + "; followed by /diff for a diff")],
    against: Annotated[
        str | None,
        QueryParameter(description="(diff) the other snapshot; absent: the live namespace"),
    ] = None,
) -> Response[SnapshotOut | DiffOut]:
    """``snapshots/{name}``: the snapshot (``404`` if unknown). ``snapshots/{name}/diff``:
    ``snapshots.diff(name, against)``."""
    store = access(request, namespace, Scope.READ)
    raw = _name(request)
    if raw.endswith("/diff"):
        diff = await store.snapshots.diff(raw[: -len("/diff")], against)
        return Response(DiffOut(diff.added, diff.removed, diff.changed))
    snap = await store.snapshots.get(raw)
    if snap is None:
        raise _missing(raw)
    return Response(_snapshot_out(snap))


@delete(
    f"{_NS}/snapshots/{{rest:path}}",
    tags=["snapshots"],
    summary="Delete a snapshot",
    status_code=200,
)
async def delete_snapshot(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: Annotated[str, PathParameter(description=_NAME_DOC)],
) -> DeletedOut:
    """``snapshots.delete`` (admin): ``{"deleted": true}``; ``404`` if there was none."""
    store = access(request, namespace, Scope.ADMIN)
    name = _name(request)
    if not await store.snapshots.delete(name):
        raise _missing(name)
    return DeletedOut(True)


@post(
    f"{_NS}/snapshots/{{rest:path}}",
    tags=["snapshots"],
    summary="Restore a snapshot",
    status_code=200,
)
async def restore_snapshot(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: Annotated[
        str,
        PathParameter(description=_NAME_DOC + ", followed by /restore", pattern=r"^.+/restore$"),
    ],
) -> RestoredOut:
    """``snapshots/{name}/restore`` (admin): the namespace holds exactly the snapshot's
    entries whose expiry has not passed; ``{"restored": n}``."""
    store = access(request, namespace, Scope.ADMIN)
    raw = _name(request)
    if not raw.endswith("/restore"):
        raise KeyNotFoundError("POST under snapshots/ takes …/restore")
    return RestoredOut(await store.snapshots.restore(raw[: -len("/restore")]))


ROUTES = [
    export,
    import_,
    list_snapshots,
    create_snapshot,
    get_snapshot,
    delete_snapshot,
    restore_snapshot,
]
