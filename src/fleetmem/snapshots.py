"""``store.snapshots``: named, incremental snapshots of a store's namespace (see
``docs/snapshots.md``).

A snapshot holds the namespace's live entries at one instant -- the consistency of an export
-- and is stored in the backend itself, beside the namespace's entries but never among them: no
``keys``, ``search``, ``stats``, ``namespaces``, export (unless by name), ``clear`` or change
feed sees it. Storage is incremental: a snapshot stores only the entries that changed since the
namespace's previous snapshot (:class:`fleetmem.backends.seam.SnapshotBackend` describes the
record model every technology shares), and deleting one frees only what no other snapshot
holds.

The front end checks every name before any I/O and builds :meth:`Snapshots.diff` (a merge of
two key-ordered streams) and :meth:`Snapshots.restore` (the backend's ``import_replace``: one
transaction on memory, SQLite, PostgreSQL and the hybrid; recorded in the change feed; versions
keep growing) on the backend's :meth:`~fleetmem.backends.seam.SnapshotBackend.pages`.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import IO

from fleetmem._codec import decode_value, encode_value
from fleetmem._validate import validate_name
from fleetmem.backends.seam import (
    ImportOp,
    KVBackend,
    SnapshotBackend,
    SnapshotRow,
    snapshot_not_found,
)
from fleetmem.portability import same_json, spool_page, spooled_pages
from fleetmem.protocol import Snapshot, SnapshotDiff

__all__ = ["MAX_SNAPSHOT_NAME_BYTES", "Snapshots", "check_snapshot_name"]

#: The longest snapshot name, in UTF-8 bytes.
MAX_SNAPSHOT_NAME_BYTES = 255
#: Entries per page read from a snapshot (diff, restore).
_PAGE = 5000
#: Bytes of a diff's or a restore's spool held in memory before it moves to a temporary file.
_SPOOL_MEMORY = 16 * 1024 * 1024
#: The largest value a restore re-encodes: the snapshot's values were checked when written.
_UNBOUNDED = 1 << 62


def check_snapshot_name(name: object) -> str:
    """``name`` if it is a valid snapshot name (the key rules, at most 255 UTF-8 bytes), else
    :class:`~fleetmem.errors.InvalidKeyError`."""
    return validate_name(name, "snapshot name", MAX_SNAPSHOT_NAME_BYTES)


def _public(row: SnapshotRow) -> Snapshot:
    return Snapshot(row.name, row.created_at, row.keys, row.bytes)


async def _spool_snapshot(snaps: SnapshotBackend, name: str, spool: IO[bytes]) -> None:
    """Write snapshot ``name``'s entries to ``spool`` as the import's spool pages (key, compact
    JSON value, partition, absolute expiry), ascending by key."""
    async with contextlib.aclosing(snaps.pages(name, "", None, _PAGE)) as pages:
        async for page in pages:
            spool_page(
                spool,
                [
                    (e.key, encode_value(e.value, _UNBOUNDED), e.partition, e.expires_at)
                    for e in page
                ],
            )


def _spooled_ops(spool: IO[bytes]) -> Iterator[ImportOp]:
    for page in spooled_pages(spool):
        yield from page


class Snapshots:
    """The named snapshots of a store's namespace: ``store.snapshots``.

    Every name is checked before any I/O (the key rules, at most 255 UTF-8 bytes; a bad name
    raises :class:`~fleetmem.errors.InvalidKeyError`). Creates and deletes of one namespace are
    serialised by the backend (across processes on durable backends).
    """

    __slots__ = ("_check_open", "_kv", "_snapshots")

    def __init__(self, kv: KVBackend, check_open: Callable[[], None]) -> None:
        self._kv = kv
        self._snapshots: SnapshotBackend | None = None
        self._check_open = check_open

    def __repr__(self) -> str:
        return f"<Snapshots namespace={self._kv.namespace!r}>"

    @property
    def namespace(self) -> str:
        return self._kv.namespace

    @property
    def backend(self) -> SnapshotBackend:
        """The technology's :class:`~fleetmem.backends.seam.SnapshotBackend` (built on first
        use)."""
        if self._snapshots is None:
            self._snapshots = self._kv.snapshots()
        return self._snapshots

    async def create(self, name: str) -> Snapshot:
        """Take a snapshot of the namespace's live entries, named ``name``.

        It holds each live entry's value, partition, absolute expiry, version and timestamps
        at one instant (the consistency of ``export_to``: one point-in-time view on memory,
        SQLite, PostgreSQL and the hybrid, per-entry exact on Redis). It stores only what
        changed since the namespace's previous snapshot (``Snapshot.bytes``). Raises
        :class:`~fleetmem.errors.SnapshotExistsError` when the namespace already has a
        snapshot of that name, having changed nothing."""
        checked = check_snapshot_name(name)
        self._check_open()
        return _public(await self.backend.create(checked))

    async def list(self) -> list[Snapshot]:
        """The namespace's snapshots, ascending by ``created_at``."""
        self._check_open()
        return [_public(row) for row in await self.backend.list()]

    async def get(self, name: str) -> Snapshot | None:
        """The snapshot named ``name``, or ``None``."""
        checked = check_snapshot_name(name)
        self._check_open()
        row = await self.backend.get(checked)
        return None if row is None else _public(row)

    async def delete(self, name: str) -> bool:
        """Delete the snapshot named ``name``: True if it existed. Frees what no other
        snapshot of the namespace holds; the others are unchanged."""
        checked = check_snapshot_name(name)
        self._check_open()
        return await self.backend.delete(checked)

    async def require(self, name: str) -> SnapshotRow:
        """The catalog row of snapshot ``name`` (already checked), or
        :class:`~fleetmem.errors.SnapshotNotFoundError`."""
        row = await self.backend.get(name)
        if row is None:
            raise snapshot_not_found(self._kv.namespace, name)
        return row

    async def diff(self, a: str, b: str | None = None) -> SnapshotDiff:
        """The keys that differ between snapshot ``a`` and snapshot ``b`` -- or, when ``b`` is
        ``None``, the live namespace -- each list ascending: ``added`` (in ``b``/live, not in
        ``a``), ``removed`` (in ``a``, not in ``b``/live), ``changed`` (in both, with another
        value, compared as JSON, or partition).

        A snapshot's entries count as they were taken, also those whose expiry has passed
        since; the live namespace counts its live entries. An unknown name raises
        :class:`~fleetmem.errors.SnapshotNotFoundError`."""
        first = check_snapshot_name(a)
        second = None if b is None else check_snapshot_name(b)
        self._check_open()
        await self.require(first)
        if second is not None:
            await self.require(second)
        snaps = self.backend
        added: list[str] = []
        removed: list[str] = []
        changed: list[str] = []
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
            # ``a`` is read whole first, into a spool (in memory up to 16 MiB), and the other
            # side after it: one connection at a time, so a pool of one serves a diff too.
            await _spool_snapshot(snaps, first, spool)
            spool.seek(0)
            lefts = _spooled_ops(spool)
            right = (
                self._kv.export_pages("", None, _PAGE)
                if second is None
                else snaps.pages(second, "", None, _PAGE)
            )
            left = next(lefts, None)
            async with contextlib.aclosing(right) as right_pages:
                async for page in right_pages:
                    for entry in page:
                        key = entry.key
                        while left is not None and left.key < key:
                            removed.append(left.key)
                            left = next(lefts, None)
                        if left is not None and left.key == key:
                            if left.partition != entry.partition or not same_json(
                                decode_value(left.payload), entry.value
                            ):
                                changed.append(key)
                            left = next(lefts, None)
                        else:
                            added.append(key)
            while left is not None:
                removed.append(left.key)
                left = next(lefts, None)
        return SnapshotDiff(added, removed, changed)

    async def restore(self, name: str) -> int:
        """Make the namespace hold exactly snapshot ``name``'s entries whose expiry has not
        passed (each with its value, partition and absolute expiry) and delete every other key;
        returns the number of entries restored.

        Versions keep growing: a restored key that exists gets its version + 1 (a new key gets
        1), so a ``compare_and_set`` against a version read before the restore fails;
        timestamps follow the write rules (``updated_at`` is the restore's). One transaction on
        memory, SQLite, PostgreSQL and the hybrid (nobody sees a half-restored namespace, and a
        failure changes nothing); on Redis, key by key (as ``import_from(mode="replace")``).
        The change feed records each write and each deletion. An unknown name raises
        :class:`~fleetmem.errors.SnapshotNotFoundError` before anything is written."""
        checked = check_snapshot_name(name)
        self._check_open()
        await self.require(checked)
        snaps = self.backend
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
            # The snapshot is read whole (one consistent reading) into a spool, then written:
            # reading it while the replace writes would hold two connections at once.
            await _spool_snapshot(snaps, checked, spool)
            spool.seek(0)

            async def ops() -> AsyncGenerator[list[ImportOp], None]:
                for page in spooled_pages(spool):
                    yield page

            async with contextlib.aclosing(ops()) as stream:
                tally = await self._kv.import_replace(stream)
        return tally.written
