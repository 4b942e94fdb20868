"""Export, import and copy of a namespace: one portable file format (see ``docs/portability.md``).

``store.export_to(dest)`` writes the namespace's live entries, ``store.import_from(src)`` checks a
whole export and only then writes it, and :func:`copy_namespace` moves a namespace between any
two stores and proves the destination holds what the source exported.

The format (version 1)
    UTF-8 JSON Lines, every line ended by ``\\n``, compact JSON (no spaces, non-ASCII written as
    is), gzip-compressed when a *path* ends in ``.gz`` (a binary file object is read and written
    uncompressed)::

        {"format":"fleetmem-export","version":1,"namespace":NS,"backend":NAME,"exported_at":T}
        {"key":K,"value":V,"partition":P,"version":N,"created_at":T,"updated_at":T,"expires_at":T}
        ...
        {"end":true,"count":N,"sha256":H}

    Entry lines are strictly ascending by key (code-point order: Python ``str`` order, which is
    PostgreSQL's ``"C"`` collation and SQLite's ``BINARY`` on UTF-8). ``V`` is the stored value,
    big integers written exactly. Datetimes are ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC,
    microseconds); ``expires_at`` is absolute, ``null`` for a persistent entry. The trailer holds
    the number of entry lines and the SHA-256 (lowercase hex) of the entry lines' bytes exactly as
    written, each with its ``\\n``.

Reading
    Unknown fields are ignored (forward compatible within version 1). In an entry, ``key`` and
    ``value`` are required, ``partition`` defaults to ``"default"`` and ``expires_at`` to
    ``null`` (an absent or ``null`` field counts as not given); ``version``, ``created_at`` and
    ``updated_at`` are informative (the target's write rules decide them) but must be valid when
    given: a version an ``int`` from 1 to ``2**63 - 1``, a datetime any ISO 8601 text *with* an
    offset (``datetime.fromisoformat``; ``Z`` accepted). A line longer than
    ``2 * max_value_bytes + 64 KiB`` (the target's ``max_value_bytes``), an empty line, a BOM,
    invalid UTF-8, a duplicate field name anywhere in a line, ``NaN``/``Infinity`` literals or a
    number too large for a float are errors naming the line, as is an ``expires_at`` more than
    100 years ahead (no write could give one). A line is an entry unless it has an ``end``
    field: then it is the trailer, and nothing may follow it.

Decisions
    * **Export** asks the backend for pages of 10,000 entries as lines
      (``KVBackend.export_lines``: by default :meth:`~fleetmem.backends.seam.KVBackend.export_pages`
      rendered here; Redis writes the lines from its scan replies, byte for byte the same),
      closed with ``contextlib.aclosing`` however the export ends, and holds one page and its
      lines at a time; a backend returning keys out of order fails the export rather than
      write a file its own import would refuse. gzip uses level 1: JSON lines still shrink
      several times, at a fraction of the CPU of the default level 9.
    * **Import reads its input once.** The checking pass keeps each entry it will write,
      encoded under the target's rules, in a spool (``tempfile.SpooledTemporaryFile``: memory
      up to 16 MiB, then a temporary file); the writing pass reads the spool in pages of 1,000
      (``import_batch``, or one ``import_replace`` call). So a pipe works like a file, what is
      written is exactly what was checked even if the file changes meanwhile, and nothing is
      decoded twice.
    * **Expiry is judged on the target's clock, never this process's.** The checking pass
      skips no entry for its ``expires_at`` (it only refuses one more than 100 years ahead,
      which no write could give, with a day's slack for this process's clock); every entry
      goes to the backend, which skips one whose expiry has passed on *its* clock when it
      writes it (the server's ``now()`` / ``TIME``; the local clock for memory and SQLite),
      counts it in ``skipped_expired``, and in a replace deletes its key like any key not in
      the file. So an application host whose clock is off neither drops live entries nor
      writes expired ones. A copy's verification likewise excuses an entry whose expiry has
      passed on the destination's clock (:meth:`KVBackend.server_time
      <fleetmem.backends.seam.KVBackend.server_time>`).
    * **The checking pass runs in a worker thread**, a page of 1,000 entry lines per step, so
      the event loop keeps running while a large input (or a slow pipe) is read and checked;
      ``progress`` is still called in the caller's task, between the steps. A cancelled import
      waits for the step in flight (a page: milliseconds) before it closes the input.
    * Values are stored as the codec would store them (a float of 1e16 or more keeps its
      ``.0``; a big integer stays exact), whatever the form in the file.
    * Errors: a problem in the input is :class:`~fleetmem.errors.InvalidExportError`; a
      missing file or an unreadable one raises the ``OSError`` of reading it; an exception
      raised by a ``progress`` callback propagates unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import marshal
import os
import pickle
import secrets
import tempfile
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

import orjson

from fleetmem._codec import encode_value, needs_exact_decoder
from fleetmem._validate import (
    DEFAULT_PARTITION,
    INT64_MAX,
    MAX_KEY_BYTES,
    MAX_TTL_SECONDS,
    validate_key,
    validate_partition,
)
from fleetmem.backends.seam import ImportOp, ImportTally, KVBackend, rendered_pages
from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    InvalidExportError,
    InvalidKeyError,
    StoreClosedError,
    VerificationError,
)
from fleetmem.protocol import Entry

if TYPE_CHECKING:
    from fleetmem.store import Store

__all__ = [
    "EXPORT_PAGE",
    "FORMAT",
    "FORMAT_VERSION",
    "IMPORT_MODES",
    "IMPORT_PAGE",
    "CopyReport",
    "ExportReport",
    "ImportReport",
    "Progress",
    "copy_namespace",
    "export_entries",
    "import_entries",
    "same_json",
]

#: The header's ``format``.
FORMAT = "fleetmem-export"
#: The format version this fleetmem writes and reads.
FORMAT_VERSION = 1
#: Entries an export asks its backend for at a time (what it holds in memory at most).
EXPORT_PAGE = 10_000
#: Entries an import hands its backend per call.
IMPORT_PAGE = 1_000
#: The modes of ``import_from`` and ``copy_namespace``.
IMPORT_MODES = ("merge", "missing", "replace")

#: ``progress(phase, done)``: called with the phase -- ``"export"``, ``"check"`` (an import's
#: checking pass), ``"import"`` (its writing pass) or ``"verify"`` (a copy's verification) -- and
#: the number of entries that phase has handled so far; after every page and once at the end of
#: each phase with its total. It runs in the caller's task; an exception it raises aborts the
#: operation (an export then leaves no file at a path; an import raising during ``"check"`` has
#: written nothing).
Progress = Callable[[str, int], None]

#: An ``expires_at`` further ahead than this (100 years, and a day of clock skew) is refused.
_MAX_AHEAD = timedelta(seconds=MAX_TTL_SECONDS, days=1)
#: Bytes a line may hold beyond twice the largest value (key, partition, timestamps, escapes).
_LINE_SLACK = 64 * 1024
#: A spool of checked entries stays in memory up to this size, then moves to a temporary file.
_SPOOL_MEMORY = 16 * 1024 * 1024
_GZIP_LEVEL = 1
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_NEWLINE = orjson.OPT_APPEND_NEWLINE
_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z
_UTC = timezone.utc
_SORTED = orjson.OPT_SORT_KEYS
_T = TypeVar("_T")


# ------------------------------------------------------------------------------------ reports


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What ``export_to`` wrote.

    ``count`` entry lines whose SHA-256 is ``sha256`` (lowercase hex, as in the trailer);
    ``exported_at`` is the header's time (tz-aware UTC, taken when the export started);
    ``consistency`` is the backend's :attr:`~fleetmem.backends.seam.KVBackend.export_consistency`:
    ``"snapshot"`` (one point-in-time view) or ``"per-entry"`` (each entry exact, writes made
    during the export may or may not be in it)."""

    namespace: str
    count: int
    sha256: str
    exported_at: datetime
    consistency: str


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What ``import_from`` did: entries ``written``; ``skipped_expired`` (their expiry had
    passed on the target's clock when the backend wrote them -- also when the key existed);
    ``skipped_existing`` (``"missing"`` mode: the key had a live entry)."""

    written: int
    skipped_expired: int
    skipped_existing: int


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What ``copy_namespace`` did: ``copied`` entries written to the destination,
    ``skipped_expired`` ones not written because their expiry passed during the copy, and
    ``verified`` -- True when the destination was checked against the export (``verify=True``),
    False when it was not."""

    copied: int
    skipped_expired: int
    verified: bool


# ------------------------------------------------------------------------------------ arguments


def check_mode(mode: object) -> str:
    """``mode`` if it is an import mode; ``InvalidArgumentError`` otherwise."""
    if not isinstance(mode, str) or mode not in IMPORT_MODES:
        raise InvalidArgumentError(
            f"mode must be one of 'merge', 'missing', 'replace', not {mode!r}"
        )
    return mode


def check_progress(progress: object) -> Progress | None:
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(
            f"progress must be a callable (phase, done) or None, not {type(progress).__name__}"
        )
    return progress


def check_target(target: object, writing: bool) -> Path | BinaryIO:
    """A path as a :class:`Path`, or the binary file object; ``InvalidArgumentError`` for
    anything else (a text file object too), before any I/O."""
    if isinstance(target, (str, os.PathLike)):
        name = os.fspath(target)
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"expected a non-empty str path, not {target!r}")
        return Path(name)
    needed = "write" if writing else "read"
    purpose = "writing" if writing else "reading"
    method = getattr(target, needed, None)
    if isinstance(target, io.TextIOBase) or not callable(method):
        raise InvalidArgumentError(
            f"expected a path or a binary file object open for {purpose} (with .{needed}()), "
            f"not {type(target).__name__}"
        )
    # A text-mode object that is not an io.TextIOBase (a SpooledTemporaryFile(mode="w+"), a
    # wrapper) is found by a call that moves no data: read(0) returns str, write(b"") raises.
    try:
        probe = method(b"") if writing else method(0)
    except (TypeError, ValueError) as exc:  # ValueError: closed, or not open for it
        raise InvalidArgumentError(
            f"expected a path or a binary file object open for {purpose}, not "
            f"{type(target).__name__} ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(probe, str):
        raise InvalidArgumentError(
            f"expected a path or a binary file object open for {purpose}, not "
            f"{type(target).__name__} in text mode (it reads str)"
        )
    return target  # type: ignore[return-value]


def _gzipped(path: Path) -> bool:
    return path.name.endswith(".gz")


def _notify(progress: Progress | None, phase: str, done: int) -> None:
    if progress is not None:
        progress(phase, done)


# ------------------------------------------------------------------------------------ writing


def format_time(moment: datetime) -> str:
    """``moment`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC; a naive datetime is taken as UTC)."""
    if moment.tzinfo is not timezone.utc:
        if moment.tzinfo is None or moment.utcoffset() is None:
            moment = moment.replace(tzinfo=timezone.utc)
        else:
            moment = moment.astimezone(timezone.utc)
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def _entry_line(entry: Entry) -> bytes:
    """One entry line (with its ``\\n``).

    orjson writes a UTC datetime as ``...SS.ffffffZ`` (``OPT_UTC_Z``), an order of magnitude
    faster than ``isoformat``, but leaves the fraction out when it is zero: such a datetime,
    or one in another zone, is formatted by :func:`format_time` instead."""
    created, updated, expires = entry.created_at, entry.updated_at, entry.expires_at
    record = {
        "key": entry.key,
        "value": entry.value,
        "partition": entry.partition,
        "version": entry.version,
        "created_at": created
        if created.tzinfo is _UTC and created.microsecond
        else format_time(created),
        "updated_at": updated
        if updated.tzinfo is _UTC and updated.microsecond
        else format_time(updated),
        "expires_at": expires
        if expires is None or (expires.tzinfo is _UTC and expires.microsecond)
        else format_time(expires),
    }
    try:
        return orjson.dumps(record, option=_LINE)
    except TypeError:  # an integer beyond 64 bits: the codec writes it exactly
        value = encode_value(record.pop("value"), 1 << 62)
        key = orjson.dumps(record.pop("key"))
        rest = orjson.dumps(record, option=_LINE)
        return b'{"key":' + key + b',"value":' + value + b"," + rest[1:]


async def _write_export(
    kv: KVBackend,
    write: Callable[[bytes | bytearray], object],
    prefix: str,
    partition: str | None,
    progress: Progress | None,
    snapshot: str | None,
) -> ExportReport:
    started = datetime.now(timezone.utc)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "namespace": kv.namespace,
        "backend": kv.backend_name,
        "exported_at": format_time(started),
    }
    source: AsyncGenerator[tuple[list[str], bytearray], None]
    if snapshot is not None:
        header["snapshot"] = snapshot
        pages = kv.snapshots().pages(snapshot, prefix, partition, EXPORT_PAGE)
        source = rendered_pages(pages, _entry_line)
        consistency = "snapshot"
    else:
        # The backend's own lines where it has a faster way to them (Redis: from the scan
        # script's replies), byte for byte those of _entry_line.
        source = kv.export_lines(prefix, partition, EXPORT_PAGE, _entry_line)
        consistency = kv.export_consistency
    write(orjson.dumps(header, option=_NEWLINE))
    digest = hashlib.sha256()
    count = 0
    last: str | None = None
    async with contextlib.aclosing(source) as lines:
        async for keys, blob in lines:
            if not keys:
                continue
            if (last is not None and keys[0] <= last) or any(map(str.__ge__, keys, keys[1:])):
                raise FleetmemError(
                    f"the {kv.backend_name} backend returned the keys of an export out of "
                    "ascending order; nothing usable was written"
                )
            last = keys[-1]
            digest.update(blob)
            write(blob)
            count += len(keys)
            _notify(progress, "export", count)
    sha256 = digest.hexdigest()
    write(orjson.dumps({"end": True, "count": count, "sha256": sha256}, option=_NEWLINE))
    _notify(progress, "export", count)
    return ExportReport(kv.namespace, count, sha256, started, consistency)


async def export_entries(
    kv: KVBackend,
    dest: Path | BinaryIO,
    prefix: str,
    partition: str | None,
    progress: Progress | None,
    snapshot: str | None = None,
) -> ExportReport:
    """Export ``kv``'s live entries -- or, with ``snapshot``, every entry that snapshot holds
    (also one whose expiry has passed since; an import skips it), with ``"snapshot": NAME`` in
    the header -- (arguments already checked) to ``dest``.

    A path is written through a temporary file in the same directory (``.NAME.<8 hex digits>.tmp``),
    flushed to disk and renamed over ``dest`` when the export succeeded: an export that fails or
    is cancelled removes it, so no file -- and never a partial one -- appears under the target
    name (an existing file there is replaced only by a complete export). A file object is
    written as is, flushed, and left open; an export that fails leaves in it what was written
    so far, which has no trailer (``import_from`` refuses it: "no trailer")."""
    if not isinstance(dest, Path):
        report = await _write_export(kv, dest.write, prefix, partition, progress, snapshot)
        flush = getattr(dest, "flush", None)
        if flush is not None:
            flush()
        return report
    tmp = _temporary_sibling(dest)
    try:
        with os.fdopen(tmp[1], "wb") as raw:
            if _gzipped(dest):
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL
                ) as packed:
                    report = await _write_export(
                        kv, packed.write, prefix, partition, progress, snapshot
                    )
            else:
                report = await _write_export(kv, raw.write, prefix, partition, progress, snapshot)
            raw.flush()
            os.fsync(raw.fileno())
        tmp[0].replace(dest)
    except BaseException:
        tmp[0].unlink(missing_ok=True)
        raise
    return report


def _temporary_sibling(dest: Path) -> tuple[Path, int]:
    """A new file next to ``dest`` (created exclusively, mode 0o666 less the umask): its path
    and an open descriptor. An ``OSError`` names ``dest`` (the caller's name), not the
    temporary file (a missing directory, no permission to write there)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            return path, os.open(path, flags, 0o666)
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror, str(dest)) from None


# ------------------------------------------------------------------------------------ reading


class _Problem(Exception):
    """A problem with the line being read (its number is added where it is caught)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Problem(f"duplicate field name {name!r}")
            seen.add(name)
    return found


def _no_constant(name: str) -> Any:
    raise _Problem(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if number - number != 0.0:
        raise _Problem(f"the number {text[:40]} is too large for a float")
    return number


def _strict_loads(raw: bytes) -> Any:
    """``raw`` decoded by the standard library, exactly (big integers), refusing duplicate
    field names, ``NaN``/``Infinity`` and numbers beyond a float."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Problem(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite,
        )
    except ValueError as exc:
        raise _Problem(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise _Problem("nested too deeply to be read") from None


#: How orjson writes a float of 1e16 or more (``1e+16``) -- also an integer beyond 64 bits that
#: it read as a float: a value holding it is decoded again, exactly.
_BIG_NUMBER = b"e+"


def _fromisoformat(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        if text[-1:] not in ("Z", "z"):  # Python 3.10 reads no "Z"
            raise
        return datetime.fromisoformat(text[:-1] + "+00:00")


def parse_time(value: object, what: str) -> datetime:
    """An ISO 8601 datetime with an offset, as UTC; ``_Problem`` otherwise."""
    if type(value) is not str:
        raise _Problem(f"{what} must be an ISO 8601 datetime string, not {type(value).__name__}")
    try:
        moment = _fromisoformat(value)
    except ValueError:
        raise _Problem(f"{what} {value[:64]!r} is not an ISO 8601 datetime") from None
    zone = moment.tzinfo
    if zone is _UTC:
        return moment
    if zone is None or moment.utcoffset() is None:
        raise _Problem(f"{what} {value[:64]!r} has no UTC offset")
    return moment.astimezone(_UTC)


class _Lines:
    """The numbered lines of an input, each checked for its length and its newline."""

    __slots__ = ("cap", "number", "readline")

    def __init__(self, stream: IO[bytes], cap: int) -> None:
        self.readline = stream.readline
        self.cap = cap
        self.number = 0

    def next(self) -> bytes | None:
        """The next line (ending with ``\\n``), ``None`` at the end of the input."""
        self.number += 1
        raw = self.readline(self.cap + 2)
        if not raw:
            return None
        self.check(raw)
        return raw

    def check(self, raw: bytes) -> None:
        """Raise the problem of a line read by ``readline(cap + 2)``, if it has one."""
        if raw[-1] != 10:
            if len(raw) > self.cap:
                raise _Problem(f"the line is longer than {self.cap} bytes")
            raise _Problem("truncated: the input ends in the middle of a line")
        if len(raw) > self.cap + 1:
            raise _Problem(f"the line is longer than {self.cap} bytes")
        if len(raw) == 1:
            raise _Problem("empty line")


def _check_start(raw: bytes) -> None:
    """The first bytes of an input: neither a BOM nor gzip."""
    if raw.startswith(_BOM):
        raise _Problem("begins with a byte order mark (BOM): an export is UTF-8 without one")
    if raw.startswith(_GZIP_MAGIC):
        raise _Problem(
            "the input is gzip-compressed: only a path ending in .gz is read as gzip "
            "(decompress a file object first)"
        )


def _check_header(raw: bytes) -> dict[str, Any]:
    header = _strict_loads(raw)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _Problem('no header: the first line of an export is {"format":"fleetmem-export",...}')
    version = header.get("version")
    if type(version) is not int:
        raise _Problem("the header's version must be an int")
    if version != FORMAT_VERSION:
        raise _Problem(
            f"export format version {version} is not supported (this fleetmem reads version "
            f"{FORMAT_VERSION})"
        )
    for name in ("namespace", "backend"):
        if name in header and not isinstance(header[name], str):
            raise _Problem(f"the header's {name} must be a str")
    if header.get("exported_at") is not None:
        parse_time(header["exported_at"], "exported_at")
    return header


def _check_trailer(raw: bytes, count: int, digest: str) -> None:
    trailer = _strict_loads(raw)  # exact: a duplicate field is named
    if trailer.get("end") is not True:
        raise _Problem('a trailer is {"end":true,"count":N,"sha256":H}')
    stated = trailer.get("count")
    if type(stated) is not int or stated < 0:
        raise _Problem("the trailer's count must be an int >= 0")
    if stated != count:
        raise _Problem(
            f"count mismatch: the trailer says {stated} entries, {count} entry lines precede it"
        )
    checksum = trailer.get("sha256")
    if not isinstance(checksum, str):
        raise _Problem("the trailer's sha256 must be a str")
    if checksum.lower() != digest:
        raise _Problem(
            f"checksum mismatch: the trailer says sha256 {checksum[:64]!r}, the entry lines "
            f"hash to {digest!r}"
        )


def _check_input(
    stream: IO[bytes], max_value_bytes: int, spool: IO[bytes] | None
) -> Generator[int, None, None]:
    """Read and check a whole export, writing every entry to ``spool`` in pages (expired or
    not: the backend judges expiry on its own clock). A generator: it checks a page of
    :data:`IMPORT_PAGE` entry lines per step and yields the number of entry lines checked so
    far, then the total once more at the end (so a caller can run each step in a worker
    thread and report progress between them). ``InvalidExportError`` on the first problem."""
    lines = _Lines(stream, 2 * max_value_bytes + _LINE_SLACK)
    try:
        yield from _check_lines(lines, max_value_bytes, spool)
    except _Problem as exc:
        raise InvalidExportError(f"line {lines.number}: {exc}", lines.number) from None
    except InvalidKeyError as exc:  # a key or partition refused by the key rules
        raise InvalidExportError(f"line {lines.number}: {exc}", lines.number) from None
    except EOFError:
        raise InvalidExportError(
            f"line {lines.number}: truncated: the compressed input ends early", lines.number
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise InvalidExportError(
            f"line {lines.number}: not a valid gzip stream ({exc})", lines.number
        ) from None


def _encoded(key: str, value: Any, max_value_bytes: int) -> bytes:
    try:
        return encode_value(value, max_value_bytes)
    except FleetmemError as exc:
        if _holds_surrogate(value):
            raise _Problem(
                f"the value of key {key!r} holds a lone surrogate (a \\ud800-\\udfff escape "
                "that is not half of a pair): strings holding lone surrogates cannot be stored"
            ) from None
        raise _Problem(f"the value of key {key!r}: {exc}") from None


def _holds_surrogate(value: Any) -> bool:
    """Whether a decoded value holds a lone surrogate (in a string or a field name)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (TypeError, ValueError, RecursionError):
        return False
    return False


def _check_lines(
    lines: _Lines, max_value_bytes: int, spool: IO[bytes] | None
) -> Generator[int, None, None]:
    """The check pass (see :func:`_check_input` for what it yields). Each entry line is
    decoded by orjson and written again: unless the line is what orjson writes (then it holds
    no duplicate field name), the colons of the two are counted -- when they differ a
    duplicate field name was dropped, and the line is decoded again by the exact, strict
    decoder, which names it; so is a line holding an escaped colon, and one whose value may
    hold a number orjson does not read exactly. The value is encoded by orjson when a few
    scans show the codec's rules hold (no U+0000, not too deep, not too large, no big
    number); otherwise by the codec, which decides and words the error."""
    lines.number = 1
    raw = lines.readline(lines.cap + 2)
    if not raw:
        raise _Problem("the input is empty: no header")
    _check_start(raw)
    lines.check(raw)
    _check_header(raw)
    digest = hashlib.sha256()
    update = digest.update
    loads = orjson.loads
    dumps = orjson.dumps
    join = b"".join
    page: list[tuple[str, bytes, str, datetime | None]] = []
    previous: str | None = None
    previous_line = 0
    count = 0
    # A sanity bound only (no write gives an expiry this far ahead), on this process's clock
    # with a day's slack; whether an entry has expired is the backend's to judge.
    horizon = datetime.now(_UTC) + _MAX_AHEAD
    known_partition = DEFAULT_PARTITION
    known_time = ""
    readline = lines.readline
    limit = lines.cap + 2
    longest = lines.cap + 1
    append = page.append
    number = lines.number
    try:
        while True:
            # lines.next(), inline
            number += 1
            raw = readline(limit)
            if not raw:
                raise _Problem(f"no trailer: the input ends after line {number - 1}")
            if raw[-1] != 10 or len(raw) > longest or len(raw) == 1:
                lines.check(raw)
            obj: Any = None
            if b"\\" not in raw or b"\\u003" not in raw:
                try:
                    obj = loads(raw)
                except orjson.JSONDecodeError:  # (a try costs nothing; a with statement does)
                    obj = None
            exact = obj is None
            if exact:
                obj = _strict_loads(raw)
            elif type(obj) is dict:
                try:
                    whole = dumps(obj, option=_NEWLINE)
                except orjson.JSONEncodeError:  # nested deeper than orjson writes
                    whole = b""
                if whole != raw and raw.count(b":") != whole.count(b":"):
                    obj = _strict_loads(raw)  # a duplicate field name: named there
                    exact = True
            if type(obj) is not dict:
                raise _Problem("not a JSON object")
            if "end" in obj:
                lines.number = number
                _check_trailer(raw, count, digest.hexdigest())
                break
            key = obj.get("key")
            if key is None:
                raise _Problem("an entry needs a key")
            # validate_key's fast path, inline: short printable ASCII.
            if not (
                type(key) is str
                and key.isascii()
                and 0 < len(key) <= MAX_KEY_BYTES
                and key.isprintable()
            ):
                validate_key(key)
            if "value" not in obj:
                raise _Problem(f"entry {key!r} has no value")
            value = obj["value"]
            if not exact:
                # Copied (joined with b""): an orjson result keeps its whole output buffer, and
                # a page holds a thousand of them.
                payload = join((dumps(value), b""))
                if _BIG_NUMBER in payload:
                    # A float of 1e16 or more, or an integer beyond 64 bits read as one: decode
                    # the line again exactly (the codec then writes such a float as it stores
                    # it).
                    obj = _strict_loads(raw)
                    value = obj["value"]
                    exact = True
                elif (
                    len(payload) > max_value_bytes
                    or (b"\\" in payload and b"\\u0000" in payload)
                    or (len(payload) > 128 and payload.count(b"[") + payload.count(b"{") > 64)
                ):
                    exact = True  # the codec decides, and words the error
            if exact:
                payload = _encoded(key, value, max_value_bytes)
            partition = obj.get("partition")
            if partition is None:
                partition = DEFAULT_PARTITION
            elif partition != known_partition:
                known_partition = validate_partition(partition)
            version = obj.get("version")
            if version is not None and (type(version) is not int or not 1 <= version <= INT64_MAX):
                raise _Problem(f"the version of key {key!r} must be an int from 1 to 2**63 - 1")
            moment = obj.get("created_at")
            if moment is not None and moment != known_time:
                parse_time(moment, "created_at")
                known_time = moment
            moment = obj.get("updated_at")
            if moment is not None and moment != known_time:
                parse_time(moment, "updated_at")
                known_time = moment
            if previous is not None and key <= previous:
                if key == previous:
                    raise _Problem(f"duplicate key {key!r} (also on line {previous_line})")
                raise _Problem(
                    f"keys are not ascending: {key!r} follows {previous!r} (line {previous_line})"
                )
            previous = key
            previous_line = number
            update(raw)
            count += 1
            expires = obj.get("expires_at")
            if expires is None:
                append((key, payload, partition, None))
            else:
                moment = parse_time(expires, "expires_at")
                if moment > horizon:
                    raise _Problem(f"the expires_at of key {key!r} is more than 100 years ahead")
                append((key, payload, partition, moment))
            if count % IMPORT_PAGE == 0:
                if spool is not None and page:
                    spool_page(spool, page)
                page.clear()
                horizon = datetime.now(_UTC) + _MAX_AHEAD
                lines.number = number
                yield count
    except BaseException:
        lines.number = number
        raise
    if lines.next() is not None:
        raise _Problem("something follows the trailer")
    if spool is not None and page:
        spool_page(spool, page)
    yield count


def spool_page(spool: IO[bytes], page: list[tuple[str, bytes, str, datetime | None]]) -> None:
    """Append ``page`` -- (key, compact JSON value, partition, absolute expiry) per entry -- to
    ``spool``, to be read back in order by :func:`spooled_pages` (the import's spool, and a
    snapshot's diff and restore)."""
    data = pickle.dumps(page, protocol=pickle.HIGHEST_PROTOCOL)
    spool.write(len(data).to_bytes(8, "little"))
    spool.write(data)


def spooled_pages(spool: IO[bytes]) -> Iterator[list[ImportOp]]:
    """The pages :func:`spool_page` wrote (this process's own data, so unpickling is safe)."""
    make = ImportOp._make
    while True:
        size = spool.read(8)
        if not size:
            return
        page = pickle.loads(spool.read(int.from_bytes(size, "little")))  # noqa: S301
        yield list(map(make, page))


@contextlib.contextmanager
def _opened(src: Path | BinaryIO) -> Iterator[IO[bytes]]:
    """``src`` ready to read lines from: a path opened (gzip by its suffix), a file object as
    is (buffered when it has no ``readline``)."""
    if isinstance(src, Path):
        if _gzipped(src):
            with gzip.open(src, "rb") as packed:
                yield packed  # type: ignore[misc]
        else:
            with src.open("rb") as plain:
                yield plain
    elif isinstance(src, io.RawIOBase):
        yield io.BufferedReader(src)  # its own readline reads a byte at a time
    elif callable(getattr(src, "readline", None)):
        yield src
    else:
        yield io.BufferedReader(_RawReader(src))


class _RawReader(io.RawIOBase):
    """A file object with only ``read`` as a raw stream (for ``io.BufferedReader``)."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


async def import_entries(
    kv: KVBackend,
    src: Path | BinaryIO,
    mode: str,
    max_value_bytes: int,
    progress: Progress | None,
) -> ImportReport:
    """Check the whole of ``src``, then write it to ``kv`` (arguments already checked).

    The input is read once, from the current position of a file object to the end of the input
    (a path is opened once): the checking pass keeps each entry it will write, encoded, in a
    temporary spool (in memory up to 16 MiB, then a temporary file), which the writing pass
    reads -- so what is written is exactly what was checked, and a file changed meanwhile or a
    pipe cannot make them differ.

    The checking pass runs in a worker thread a page at a time (:func:`_off_loop`), so the
    event loop is not held for the length of the input; ``progress`` runs in this task.
    Expiry is the backend's to judge, on its clock (``skipped_expired`` is its count)."""
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
        with _opened(src) as stream:
            steps = _check_input(stream, max_value_bytes, spool)
            try:
                while (done := await _off_loop(next, steps, None)) is not None:
                    _notify(progress, "check", done)
            finally:
                steps.close()
        spool.seek(0)
        tally = await _write_pages(kv, spooled_pages(spool), mode, progress)
    return ImportReport(tally.written, tally.expired, tally.existing)


async def _off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in the loop's default executor (a worker thread). A cancelled caller
    first waits for the call to finish -- it may be reading the input or writing the spool,
    which the caller closes next -- then the cancellation propagates."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller sees
        raise


async def _write_pages(
    kv: KVBackend, pages: Iterator[list[ImportOp]], mode: str, progress: Progress | None
) -> ImportTally:
    done = 0
    if mode == "replace":

        async def feed() -> AsyncIterator[list[ImportOp]]:
            nonlocal done
            for page in pages:
                yield page
                done += len(page)  # the backend asks for the next page: this one is written
                _notify(progress, "import", done)

        tally = await kv.import_replace(feed())
        _notify(progress, "import", done)
        return tally
    missing_only = mode == "missing"
    written = expired = existing = 0
    for page in pages:
        tally = await kv.import_batch(page, missing_only)
        written += tally.written
        expired += tally.expired
        existing += tally.existing
        done += len(page)
        _notify(progress, "import", done)
    _notify(progress, "import", done)
    return ImportTally(written, expired, existing)


# ------------------------------------------------------------------------------------ copy


async def copy_namespace(
    src: Store[Any],
    dst: Store[Any],
    *,
    mode: str = "merge",
    verify: bool = True,
    progress: Progress | None = None,
) -> CopyReport:
    """Copy the live entries of ``src``'s namespace into ``dst``'s, then prove it.

    Works between any two stores -- any two backends, or two namespaces of one backend (two
    views of one store) -- and is ``src.export_to`` into a temporary spool (in memory up to
    16 MiB, then a temporary file) followed by ``dst.import_from`` of it (the same checks:
    ``dst``'s value rules and ``max_value_bytes``; any problem raises ``InvalidExportError``
    before anything is written), with ``mode`` as for ``import_from`` (``"merge"``,
    ``"missing"``, ``"replace"``; anything else raises ``InvalidArgumentError`` before any
    I/O). ``src`` is read with its backend's export consistency (``ExportReport.consistency``).

    Verification (``verify=True``) reads the export again, a page of 1,000 entries at a time,
    and compares each entry with ``dst``'s live entry:

    * the value as JSON -- ``1`` equals ``1.0``, but ``true`` is not ``1``;
    * the partition;
    * ``expires_at`` to the millisecond (within 1 ms: backends keep milliseconds or finer);
    * an entry whose expiry has passed by the time it is compared is skipped (it may be gone)
      -- passed on ``dst``'s clock (:meth:`KVBackend.server_time
      <fleetmem.backends.seam.KVBackend.server_time>`, read after the page's entries, with a
      millisecond's slack for backends that keep milliseconds), not this process's;
    * ``"replace"``: ``dst`` must also hold no key that is not in the export;
    * ``"missing"``: a key ``dst`` already had before the import (looked up in a pass before
      it) keeps its own value, partition and expiry by design, so only its presence is
      checked; every other key is compared in full.

    A difference raises ``VerificationError`` naming the first (at most 10) keys that differ.
    Verification assumes nobody else writes ``dst``'s namespace during the copy: a concurrent
    write shows as a difference.

    ``progress`` sees the phases ``"export"``, ``"check"``, ``"import"`` and ``"verify"``.
    Returns ``CopyReport(copied=entries written, skipped_expired, verified=verify)``."""
    mode = check_mode(mode)
    if not isinstance(verify, bool):
        raise InvalidArgumentError(f"verify must be a bool, not {type(verify).__name__}")
    check_progress(progress)
    for store in (src, dst):
        if store.closed:
            raise StoreClosedError(
                f"{type(store).__name__} for namespace {store.namespace!r} is closed"
            )
    with contextlib.ExitStack() as files:
        spool = files.enter_context(tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY))
        await src.export_to(cast(BinaryIO, spool), progress=progress)
        had: IO[bytes] | None = None
        if verify and mode == "missing":
            spool.seek(0)
            had = files.enter_context(tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY))
            await _record_existing(dst.kv, spool, had)
        spool.seek(0)
        report = await dst.import_from(cast(BinaryIO, spool), mode=mode, progress=progress)
        if verify:
            spool.seek(0)
            if had is not None:
                had.seek(0)
            await _verify(dst.kv, spool, mode, had, progress)
    return CopyReport(report.written, report.skipped_expired, verify)


class _FileEntry:
    """An entry of an export as verification compares it."""

    __slots__ = ("expires_at", "key", "partition", "value")

    def __init__(self, key: str, value: Any, partition: str, expires_at: datetime | None) -> None:
        self.key = key
        self.value = value
        self.partition = partition
        self.expires_at = expires_at


def _file_pages(stream: IO[bytes]) -> Iterator[list[_FileEntry]]:
    """The entries of a checked export (header and trailer skipped), a page at a time."""
    stream.readline()
    page: list[_FileEntry] = []
    for raw in stream:
        obj = orjson.loads(raw) if not needs_exact_decoder(raw) else json.loads(raw)
        if "end" in obj:
            break
        expires = obj.get("expires_at")
        partition = obj.get("partition")
        page.append(
            _FileEntry(
                obj["key"],
                obj["value"],
                DEFAULT_PARTITION if partition is None else partition,
                None if expires is None else parse_time(expires, "expires_at"),
            )
        )
        if len(page) == IMPORT_PAGE:
            yield page
            page = []
    if page:
        yield page


async def _record_existing(kv: KVBackend, export: IO[bytes], had: IO[bytes]) -> None:
    """Write to ``had``, page by page of ``export``, the keys ``kv`` holds live now."""
    for page in _file_pages(export):
        found = await kv.get_entries([entry.key for entry in page])
        data = marshal.dumps([entry.key for entry in page if entry.key in found])
        had.write(len(data).to_bytes(8, "little"))
        had.write(data)


def same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value: numbers by value (``1 == 1.0``),
    ``true``/``false`` only equal to themselves, objects whatever their key order."""
    try:
        if orjson.dumps(a, option=_SORTED) == orjson.dumps(b, option=_SORTED):
            return True
    except TypeError:  # a big integer: compared below
        pass
    return _same(a, b)


def _same(a: Any, b: Any) -> bool:
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if ta in (int, float) and tb in (int, float):
        return bool(a == b)
    if ta is not tb:
        return False
    if ta is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if ta is list:
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


_MS = timedelta(milliseconds=1)


def _difference(entry: _FileEntry, found: Entry | None) -> str | None:
    if found is None:
        return "missing"
    if found.partition != entry.partition:
        return f"partition {found.partition!r}, not {entry.partition!r}"
    a, b = entry.expires_at, found.expires_at
    if (a is None) != (b is None) or (a is not None and b is not None and abs(a - b) > _MS):
        return f"expires_at {b}, not {a}"
    if not same_json(entry.value, found.value):
        return "another value"
    return None


async def _verify(
    kv: KVBackend,
    export: IO[bytes],
    mode: str,
    had: IO[bytes] | None,
    progress: Progress | None,
) -> None:
    differing: list[tuple[str, str]] = []
    extra = _KeyCursor(kv) if mode == "replace" else None
    done = 0
    for page in _file_pages(export):
        existed: set[str] = set()
        if had is not None:
            size = had.read(8)
            existed = set(marshal.loads(had.read(int.from_bytes(size, "little"))))  # noqa: S302
        found = await kv.get_entries([entry.key for entry in page])
        # Read after the entries, on the destination's clock: an entry it no longer holds
        # because its expiry passed there is excused. An entry that expires at ``e`` may be
        # gone at ``e`` rounded down to the millisecond. Pages without an expiry need no time.
        now = (
            await kv.server_time() + _MS
            if any(entry.expires_at is not None for entry in page)
            else None
        )
        for entry in page:
            if extra is not None:
                for key in await extra.before(entry.key):
                    differing.append((key, "not in the source"))
            if entry.expires_at is not None and now is not None and entry.expires_at <= now:
                continue
            current = found.get(entry.key)
            if entry.key in existed:
                problem = None if current is not None else "missing"
            else:
                problem = _difference(entry, current)
            if problem is not None:
                differing.append((entry.key, problem))
            if len(differing) >= 10:
                break
        if len(differing) >= 10:
            break
        done += len(page)
        _notify(progress, "verify", done)
    if extra is not None and len(differing) < 10:
        for key in await extra.before(None):
            differing.append((key, "not in the source"))
            if len(differing) >= 10:
                break
    if differing:
        differing = sorted(differing)[:10]
        listing = ", ".join(f"{key!r} ({why})" for key, why in differing)
        raise VerificationError(
            f"the destination namespace {kv.namespace!r} differs from the source export: {listing}",
            [key for key, _ in differing],
        )
    _notify(progress, "verify", done)


class _KeyCursor:
    """The live keys of a backend, ascending, read a page at a time."""

    def __init__(self, kv: KVBackend) -> None:
        self._kv = kv
        self._page: list[str] = []
        self._index = 0
        self._after: str | None = None
        self._done = False

    async def before(self, key: str | None) -> list[str]:
        """The keys below ``key`` (all that are left for ``None``) not yet returned; skips
        ``key`` itself."""
        out: list[str] = []
        while True:
            if self._index >= len(self._page):
                if self._done:
                    return out
                self._page = await self._kv.keys("", None, IMPORT_PAGE, self._after)
                self._index = 0
                if len(self._page) < IMPORT_PAGE:
                    self._done = True
                if not self._page:
                    return out
                self._after = self._page[-1]
            current = self._page[self._index]
            if key is not None and current >= key:
                if current == key:
                    self._index += 1
                return out
            out.append(current)
            self._index += 1
            if len(out) >= 10:
                return out
