"""Export, import and copy: ``export_to``, ``import_from`` and ``fleetmem.copy_namespace``.

Every rule of ``PORTABILITY.md`` (phase 1) that one store can show, as tests of the ``store``
fixture through the public API only. The export format is checked line by line by
:func:`read_export` (the header, the entries ascending by code point, the trailer's count and
SHA-256 recomputed here from the raw lines); imports read files this module writes itself
(:func:`export_file`), so the reader is held to the format, not to the writer's habits: any
ISO 8601 offset, minimal entry lines, unknown fields.

Imports write into the fixture's namespace or into siblings of it (cleared afterwards); a
rejected import must leave the whole state of the target -- keys, values, versions, partitions,
expiries -- exactly as it was (:func:`state_of`). Expiry on the file is absolute: an entry whose
``expires_at`` has passed is skipped (and counted), one in the future keeps that instant to the
``portability_slack``. Only one test waits for an entry to expire (``portability_ttl``); every
other expired entry is written into a file with an ``expires_at`` in the past.

Whether an export is a point-in-time view is not observable with one writer; the report's
``consistency`` is checked to be one of the two the contract knows, and the reliability suite
(``tests/reliability/test_portability_faults.py``) checks the claim under concurrent writers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import pytest

import fleetmem
from fleetmem import ExportReport, ImportReport
from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    InvalidExportError,
    VersionConflictError,
)
from fleetmem.portability import Progress
from fleetmem.protocol import Change, Entry, MemoryStore
from fleetmem.testing.conformance._base import (
    ConformanceBase,
    assert_same_json,
    assert_utc,
    nested_list,
    utcnow,
)

#: The fields of each kind of line, in the order the format writes them.
HEADER_FIELDS = ("format", "version", "namespace", "backend", "exported_at")
ENTRY_FIELDS = ("key", "value", "partition", "version", "created_at", "updated_at", "expires_at")
TRAILER_FIELDS = ("end", "count", "sha256")
#: How the format writes a datetime: UTC, microseconds, ``Z``.
MOMENT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
CONSISTENCIES = ("snapshot", "per-entry")
#: Modes that are not modes: ``InvalidArgumentError`` (a ``ValueError``) before anything is read.
BAD_MODES: list[Any] = ["", "upsert", "MERGE", "Replace", " merge", None, 1, b"merge", ["merge"]]
#: Progress phases, in the order a copy goes through them.
PHASES = ("export", "check", "import", "verify")

#: (key, value, partition, ttl) of the entries most tests export: keys whose code point order
#: differs from a locale's (``B`` < ``_`` < ``a``) and from UTF-16's (U+FFFF < U+1F600), a
#: prefix family (``a`` < ``a b`` < ``a/1`` < ``a/10`` < ``a/2``), the longest key; integers
#: beyond 64 bits, non-ASCII text, nesting, partitions of every shape, TTLs far ahead.
SAMPLE: list[tuple[str, Any, str, float | None]] = [
    ("a", {"n": 1, "nested": {"k": [1, "x", None]}}, "default", None),
    ("a b", 2**100, "p", 3600.0),
    ("a/1", -(2**70), "p", None),
    ("a/10", 10**40, "q", 1800.0),
    (
        "a/2",
        {"big": 2**64, "list": [2**65, -(2**65), 1e300], "bool": [True, False]},
        "r/7 {1}",
        None,
    ),
    ("B", [1, 2.5, None, True, "x"], "q", None),
    ("_", None, "default", 3600.0),
    ("\u00e9", "unicode \u00e9 \U0001f600 \u4e2d\u6587 \u2028", "\u00e9" * 127 + "a", None),
    ("\u4e2d\u6587/key", "", "p", None),
    ("\uffff", 0.1, "default", None),
    ("\U0001f600", {"\u00e9\U0001f600": "unicode dict key", "n": -(2**64)}, "p", 7200.0),
    ("z" * 1024, "the longest key", "q", None),
    ("* ? [ ] \\ % _ { } :", True, "default", None),
    ("\u0085\u00a0", 1.7976931348623157e308, "q", None),
]
SAMPLE_KEYS = sorted(key for key, *_ in SAMPLE)


# ---------------------------------------------------------------- the format


def dumps_line(obj: Any) -> bytes:
    """``obj`` as the format writes a line: compact JSON, non-ASCII as is, then ``\\n``."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode() + b"\n"


def format_moment(moment: datetime) -> str:
    """``moment`` as the format writes a datetime (``YYYY-MM-DDTHH:MM:SS.ffffffZ``)."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_moment(text: object, what: str) -> datetime:
    """A datetime of the file (any ISO 8601 with an offset), as a tz-aware ``datetime``."""
    assert isinstance(text, str), f"{what}: not a string: {text!r}"
    # ``Z``: spelled out for Python 3.10's fromisoformat.
    moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    assert moment.tzinfo is not None, f"{what}: no offset: {text!r}"
    return moment


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), f"a field repeats: {names}"
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


def strict_json(line: bytes, what: str) -> Any:
    """One line parsed as strict JSON: UTF-8, no repeated field, no NaN/Infinity."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:  # pragma: no cover - reported as a failure
        raise AssertionError(f"{what} is not UTF-8: {exc}") from exc
    assert not text.startswith("\ufeff"), f"{what} starts with a BOM"
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


@dataclass(frozen=True)
class ExportFile:
    """An export, parsed: its lines (each with its ``\\n``) and what they hold."""

    lines: list[bytes]
    header: dict[str, Any]
    entries: list[dict[str, Any]]
    trailer: dict[str, Any]

    @property
    def keys(self) -> list[str]:
        return [entry["key"] for entry in self.entries]

    @property
    def exported_at(self) -> datetime:
        return parse_moment(self.header["exported_at"], "exported_at")

    def entry(self, key: str) -> dict[str, Any]:
        return next(entry for entry in self.entries if entry["key"] == key)


def read_export(raw: bytes) -> ExportFile:
    """Parse ``raw`` (an uncompressed export) and assert it follows the format exactly."""
    assert raw.endswith(b"\n"), f"an export ends with a newline: {raw[-80:]!r}"
    lines = [part + b"\n" for part in raw.split(b"\n")[:-1]]
    assert len(lines) >= 2, f"an export has a header and a trailer: {raw[:200]!r}"
    parsed = [strict_json(line, f"line {number}") for number, line in enumerate(lines, 1)]
    header, *entries, trailer = parsed

    assert isinstance(header, dict) and tuple(header) == HEADER_FIELDS, f"header: {header!r}"
    assert header["format"] == "fleetmem-export", header
    assert type(header["version"]) is int and header["version"] == 1, header
    assert MOMENT_RE.fullmatch(header["exported_at"]), header
    assert lines[0] == dumps_line(header), f"the header is not compact JSON: {lines[0]!r}"

    for number, entry in enumerate(entries, 2):
        what = f"line {number}"
        assert isinstance(entry, dict) and tuple(entry) == ENTRY_FIELDS, f"{what}: {entry!r}"
        assert isinstance(entry["key"], str) and isinstance(entry["partition"], str), entry
        assert type(entry["version"]) is int and entry["version"] >= 1, f"{what}: {entry!r}"
        for field in ("created_at", "updated_at"):
            assert MOMENT_RE.fullmatch(entry[field]), f"{what}: {field} {entry[field]!r}"
        expires = entry["expires_at"]
        assert expires is None or MOMENT_RE.fullmatch(expires), f"{what}: {expires!r}"
        line = lines[number - 1]
        assert b"\n" not in line[:-1] and not line.startswith(b"{ "), f"{what}: {line[:80]!r}"
    keys = [entry["key"] for entry in entries]
    for before, after in itertools.pairwise(keys):
        assert before < after, f"keys not strictly ascending: {before!r} then {after!r}"

    assert isinstance(trailer, dict) and tuple(trailer) == TRAILER_FIELDS, f"trailer {trailer!r}"
    assert trailer["end"] is True, trailer
    assert type(trailer["count"]) is int and trailer["count"] == len(entries), (
        f"trailer count {trailer['count']!r}, {len(entries)} entry lines"
    )
    digest = hashlib.sha256(b"".join(lines[1:-1])).hexdigest()
    assert trailer["sha256"] == digest, f"trailer sha256 {trailer['sha256']!r}, lines {digest}"
    assert lines[-1] == dumps_line(trailer), f"the trailer is not compact JSON: {lines[-1]!r}"
    return ExportFile(lines, header, entries, trailer)


def export_file(
    entries: Iterable[dict[str, Any] | bytes],
    *,
    namespace: str = "elsewhere",
    backend: str = "memory",
    exported_at: str | None = None,
    header: dict[str, Any] | None = None,
    trailer: dict[str, Any] | None = None,
) -> list[bytes]:
    """The lines of an export holding ``entries`` (dicts, or raw lines with their ``\\n``): a
    header, the entry lines as given, and a trailer counting and hashing them. ``header`` and
    ``trailer`` replace the computed ones' fields."""
    head: dict[str, Any] = {
        "format": "fleetmem-export",
        "version": 1,
        "namespace": namespace,
        "backend": backend,
        "exported_at": exported_at or format_moment(utcnow()),
    }
    head.update(header or {})
    body = [entry if isinstance(entry, bytes) else dumps_line(entry) for entry in entries]
    tail: dict[str, Any] = {
        "end": True,
        "count": len(body),
        "sha256": hashlib.sha256(b"".join(body)).hexdigest(),
    }
    tail.update(trailer or {})
    return [dumps_line(head), *body, dumps_line(tail)]


def file_entry(
    key: Any, value: Any, partition: Any = "default", expires_at: Any = None, **extra: Any
) -> dict[str, Any]:
    """An entry line's fields (``expires_at`` a ``datetime`` is written in the format's way)."""
    if isinstance(expires_at, datetime):
        expires_at = format_moment(expires_at)
    stamp = "2020-02-03T04:05:06.789000Z"  # informative: the target's write rules apply
    return {
        "key": key,
        "value": value,
        "partition": partition,
        "version": 7,
        "created_at": stamp,
        "updated_at": stamp,
        "expires_at": expires_at,
        **extra,
    }


# ---------------------------------------------------------------- state of a namespace

#: A key's whole state: value (as JSON text), partition, version, timestamps, expiry.
State = dict[str, tuple[str, str, int, datetime, datetime, datetime | None]]


async def state_of(store: MemoryStore) -> State:
    """Every live entry of ``store``'s namespace, compared whole by the tests."""
    out: State = {}
    for key in await store.keys():
        entry = await store.get_entry(key)
        if entry is not None:
            value = json.dumps(entry.value, sort_keys=True)
            out[key] = (
                value,
                entry.partition,
                entry.version,
                entry.created_at,
                entry.updated_at,
                entry.expires_at,
            )
    return out


async def write_sample(store: MemoryStore) -> dict[str, Entry]:
    """Write :data:`SAMPLE` into ``store``; the entries as ``get_entry`` returns them."""
    for key, value, partition, ttl in SAMPLE:
        await store.set(key, value, ttl=ttl, partition=partition)
    out: dict[str, Entry] = {}
    for key in SAMPLE_KEYS:
        entry = await store.get_entry(key)
        assert entry is not None, f"{key!r} is missing right after it was set"
        out[key] = entry
    return out


def assert_close(
    actual: datetime | None, expected: datetime | None, slack: float, what: str
) -> None:
    """``actual`` is ``expected`` to ``slack`` seconds (both ``None``, or both set)."""
    if expected is None:
        assert actual is None, f"{what}: expected no expiry, got {actual}"
        return
    assert actual is not None, f"{what}: expected {expected}, got None"
    assert_utc(actual, what)
    gap = abs((actual - expected).total_seconds())
    assert gap <= slack, f"{what}: {actual} is {gap:.6f} s from {expected}"


def assert_file_entry_is(line: dict[str, Any], entry: Entry, what: str) -> None:
    """An exported line shows ``entry`` exactly (datetimes to the millisecond)."""
    assert line["key"] == entry.key, what
    assert_same_json(line["value"], entry.value, f"{what} value")
    assert line["partition"] == entry.partition, f"{what}: {line!r} vs {entry!r}"
    assert line["version"] == entry.version, f"{what}: {line!r} vs {entry!r}"
    for name in ("created_at", "updated_at"):
        moment = parse_moment(line[name], f"{what} {name}")
        assert_close(moment, getattr(entry, name), 0.001, f"{what} {name}")
    expires = line["expires_at"]
    assert_close(
        None if expires is None else parse_moment(expires, f"{what} expires_at"),
        entry.expires_at,
        0.001,
        f"{what} expires_at",
    )


class _Stop(Exception):
    """Raised by a test's progress callback."""


class _Unseekable(io.RawIOBase):
    """A readable binary stream that cannot seek (a pipe, a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 4096))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def files_dir(tmp_path: Path) -> Path:
    """A new, empty directory for a test's files (a store fixture may keep its own files in
    ``tmp_path``, as the SQLite one does)."""
    path = tmp_path / "portability"
    path.mkdir()
    return path


class PortableStore(Protocol):
    """What these tests use of a store beyond ``MemoryStore``: ``export_to``, ``import_from``."""

    async def export_to(
        self,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        prefix: str = "",
        partition: str | None = None,
        progress: Progress | None = None,
    ) -> ExportReport: ...

    async def import_from(
        self,
        src: str | os.PathLike[str] | BinaryIO,
        *,
        mode: str = "merge",
        progress: Progress | None = None,
    ) -> ImportReport: ...


def _portable(store: MemoryStore) -> PortableStore:
    """``store``, for the portability API (``export_to`` and ``import_from``)."""
    for name in ("export_to", "import_from"):
        assert callable(getattr(store, name, None)), f"{type(store).__name__} has no {name}()"
    return cast(PortableStore, store)


def _copy_of(store: MemoryStore) -> Any:
    """``store`` as ``fleetmem.copy_namespace`` takes it (a ``Store``)."""
    return store


async def export_bytes(store: MemoryStore, **options: Any) -> tuple[ExportReport, ExportFile]:
    """Export ``store`` into a binary file object; the report and the parsed, checked file."""
    buffer = io.BytesIO()
    report = await _portable(store).export_to(buffer, **options)
    assert not buffer.closed, "export_to closed the caller's file object"
    return report, read_export(buffer.getvalue())


async def import_lines(store: MemoryStore, lines: list[bytes], mode: str = "merge") -> ImportReport:
    return await _portable(store).import_from(io.BytesIO(b"".join(lines)), mode=mode)


def counts(report: ImportReport) -> tuple[int, int, int]:
    """An ``ImportReport`` as ``(written, skipped_expired, skipped_existing)``."""
    assert isinstance(report, fleetmem.ImportReport), report
    return (report.written, report.skipped_expired, report.skipped_existing)


# ---------------------------------------------------------------- the tests


class PortabilityConformance(ConformanceBase):
    """The rules of ``PORTABILITY.md`` (export, import, copy) on one store.

    ``portability_slack``
        Seconds of tolerance on an imported entry's absolute expiry: the file's instant is
        kept to the millisecond, blurred only by the store's clock and the write's duration.
    ``portability_ttl``
        The TTL (seconds) of the one entry a test lets expire before it exports.
    """

    pytestmark = [pytest.mark.asyncio]

    portability_slack: float = 0.5
    portability_ttl: float = 1.0

    @contextlib.asynccontextmanager
    async def target(self, store: MemoryStore, suffix: str = "i") -> AsyncIterator[MemoryStore]:
        """A sibling namespace of the fixture's, cleared and closed afterwards."""
        async with self.sibling_namespaces(store, suffix) as (view,):
            yield view

    def assert_same_entries(self, got: dict[str, Entry], want: dict[str, Entry], what: str) -> None:
        """The same keys, each with the same value, partition and absolute expiry."""
        assert sorted(got) == sorted(want), f"{what}: keys {sorted(got)} != {sorted(want)}"
        for key, entry in want.items():
            other = got[key]
            assert_same_json(other.value, entry.value, f"{what} {key!r}")
            assert other.partition == entry.partition, f"{what} {key!r}: {other} vs {entry}"
            assert_close(
                other.expires_at, entry.expires_at, self.portability_slack, f"{what} {key!r}"
            )

    async def entries_of(self, store: MemoryStore) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for key in await store.keys():
            entry = await store.get_entry(key)
            if entry is not None:
                out[key] = entry
        return out

    # ------------------------------------------------------------ export: the format

    async def test_export_writes_the_format(self, store: MemoryStore) -> None:
        written = await write_sample(store)
        before = utcnow()
        report, exported = await export_bytes(store)
        after = utcnow()

        assert exported.header["namespace"] == store.namespace
        assert exported.header["backend"] == store.backend
        skew = timedelta(seconds=self.clock_skew)
        assert before - skew <= exported.exported_at <= after + skew, exported.header
        assert exported.keys == SAMPLE_KEYS, exported.keys
        for number, line in enumerate(exported.entries, 2):
            assert_file_entry_is(line, written[line["key"]], f"line {number}")

        assert isinstance(report, fleetmem.ExportReport), report
        assert report.namespace == store.namespace
        assert report.count == len(SAMPLE) == exported.trailer["count"]
        assert report.sha256 == exported.trailer["sha256"]
        assert assert_utc(report.exported_at, "report.exported_at") == exported.exported_at
        assert report.consistency in CONSISTENCIES, report

        raw = b"".join(exported.lines)
        # Integers beyond 64 bits as integer literals; non-ASCII text as is, not escaped.
        for number in (2**100, -(2**70), 10**40, 2**64, -(2**65)):
            assert str(number).encode() in raw, number
        for text in ("\u00e9", "\U0001f600", "\u4e2d\u6587", "\uffff"):
            assert text.encode() in raw, text
        assert b"\\u00e9" not in raw and b"\\ud83d" not in raw.lower()
        assert not raw.startswith(b"\xef\xbb\xbf")

    async def test_export_of_an_empty_namespace(self, store: MemoryStore) -> None:
        report, exported = await export_bytes(store)
        assert exported.entries == [] and report.count == 0
        assert exported.trailer["sha256"] == hashlib.sha256(b"").hexdigest()
        assert exported.header["namespace"] == store.namespace

    async def test_export_to_a_path_a_gz_path_and_a_file_object(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = files_dir(tmp_path)
        await write_sample(store)
        portable = _portable(store)
        plain = folder / "fleet.jsonl"
        packed = folder / "fleet.jsonl.gz"
        reports = [await portable.export_to(str(plain)), await portable.export_to(packed)]
        buffer = io.BytesIO()
        buffer.write(b"kept")  # a file object is written from where it is
        reports.append(await portable.export_to(buffer))

        raw_plain = plain.read_bytes()
        assert not raw_plain.startswith(b"\x1f\x8b"), "a path without .gz is not compressed"
        assert packed.read_bytes().startswith(b"\x1f\x8b"), "a .gz path is gzip-compressed"
        assert not buffer.closed, "export_to closed the caller's file object"
        assert buffer.getvalue().startswith(b"kept{"), "a file object is written raw, in place"
        files = [
            read_export(raw_plain),
            read_export(gzip.decompress(packed.read_bytes())),
            read_export(buffer.getvalue()[len(b"kept") :]),
        ]
        for exported, report in zip(files, reports, strict=True):
            assert exported.lines[1:] == files[0].lines[1:], "the same entries each time"
            assert report.count == len(SAMPLE) and report.sha256 == exported.trailer["sha256"]
        # Nothing else is left in the directory (no temporary file).
        assert sorted(p.name for p in folder.iterdir()) == ["fleet.jsonl", "fleet.jsonl.gz"]

    async def test_export_skips_expired_entries(self, store: MemoryStore) -> None:
        ttl = max(self.portability_ttl, self.expiry_ttl)
        await store.set("gone", 1, ttl=ttl)
        await store.set("gone-too", 2, ttl=ttl, partition="p")
        await store.set("kept", 3)
        await store.set("later", 4, ttl=3600, partition="p")
        await asyncio.sleep(ttl + 0.2 + self.ttl_slack)
        report, exported = await export_bytes(store)
        assert exported.keys == ["kept", "later"] and report.count == 2
        _, only_p = await export_bytes(store, partition="p")
        assert only_p.keys == ["later"]

    async def test_export_filters_by_prefix_and_partition(self, store: MemoryStore) -> None:
        written = await write_sample(store)
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"prefix": "a"}, ["a", "a b", "a/1", "a/10", "a/2"]),
            ({"prefix": "a/"}, ["a/1", "a/10", "a/2"]),
            ({"prefix": "a/1"}, ["a/1", "a/10"]),
            ({"prefix": "nothing"}, []),
            ({"partition": "p"}, ["a b", "a/1", "\u4e2d\u6587/key", "\U0001f600"]),
            ({"partition": "nothing"}, []),
            ({"prefix": "a", "partition": "p"}, ["a b", "a/1"]),
            ({"prefix": "a/", "partition": "q"}, ["a/10"]),
            ({"prefix": "\u4e2d", "partition": "p"}, ["\u4e2d\u6587/key"]),
            ({"prefix": "", "partition": None}, SAMPLE_KEYS),
        ]
        for options, keys in cases:
            report, exported = await export_bytes(store, **options)
            assert exported.keys == keys, f"export_to(**{options!r}): {exported.keys}"
            assert report.count == len(keys)
            for line in exported.entries:
                assert_file_entry_is(line, written[line["key"]], f"{options!r} {line['key']!r}")

    async def test_export_refuses_bad_arguments_before_any_io(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = files_dir(tmp_path)
        await store.set("k", 1)
        portable = _portable(store)
        target = folder / "never.jsonl"
        for options in (
            {"partition": ""},
            {"partition": "p" * 256},
            {"partition": "a\x00b"},
            {"partition": 5},
            {"prefix": "a\x00"},
            {"prefix": "\ud800"},
            {"prefix": 5},
        ):
            with pytest.raises(ValueError) as info:
                await portable.export_to(target, **options)
            assert isinstance(info.value, FleetmemError), repr(info.value)
            assert not target.exists(), f"export_to(**{options!r}) created its file"
        assert list(folder.iterdir()) == []

    async def test_a_failed_export_leaves_no_file(self, store: MemoryStore, tmp_path: Path) -> None:
        folder = files_dir(tmp_path)
        await write_sample(store)
        portable = _portable(store)

        def stop(phase: str, done: int) -> None:
            raise _Stop(phase)

        fresh = folder / "fresh.jsonl.gz"
        with pytest.raises(_Stop):
            await portable.export_to(fresh, progress=stop)
        assert list(folder.iterdir()) == [], "a failed export left a file behind"
        # An existing file of that name is left as it was, never half-written.
        old = folder / "old.jsonl"
        old.write_bytes(b"the previous export\n")
        with pytest.raises(_Stop):
            await portable.export_to(old, progress=stop)
        assert old.read_bytes() == b"the previous export\n"
        assert [p.name for p in folder.iterdir()] == ["old.jsonl"]

    # ------------------------------------------------------------ import: what it writes

    async def test_export_then_import_into_another_namespace(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = files_dir(tmp_path)
        written = await write_sample(store)
        before = await state_of(store)
        path = folder / "ns.jsonl.gz"
        report = await _portable(store).export_to(path)
        assert report.count == len(SAMPLE)
        async with self.target(store) as other:
            started = utcnow()
            got = await _portable(other).import_from(path)
            assert counts(got) == (len(SAMPLE), 0, 0)
            imported = await self.entries_of(other)
            self.assert_same_entries(imported, written, "imported")
            skew = timedelta(seconds=self.clock_skew)
            for key, entry in imported.items():
                # New keys: version 1, timestamps of the write (not the file's).
                assert entry.version == 1, f"{key!r}: {entry}"
                assert entry.created_at >= started - skew, f"{key!r}: {entry}"
                assert entry.updated_at >= started - skew, f"{key!r}: {entry}"
                assert_same_json(await other.get(key), written[key].value, f"get({key!r})")
            # The namespace is the store's, whatever the header says; the source is untouched.
            _, again = await export_bytes(other)
            assert again.header["namespace"] == other.namespace != store.namespace
            assert again.keys == SAMPLE_KEYS
        assert await state_of(store) == before

    async def test_import_restores_an_earlier_export_of_the_namespace(
        self, store: MemoryStore
    ) -> None:
        written = await write_sample(store)
        _, exported = await export_bytes(store)
        await store.set("a", "changed", partition="elsewhere")
        await store.set("new", 1)
        await store.delete("a/1")
        await store.persist("a b")
        report = await import_lines(store, exported.lines, "replace")
        assert counts(report) == (len(SAMPLE), 0, 0)
        restored = await self.entries_of(store)
        self.assert_same_entries(restored, written, "restored")
        assert restored["a"].version == written["a"].version + 2
        assert restored["a/1"].version == 1  # deleted, then written anew
        assert await store.get("new") is None and not await store.exists("new")

    async def test_import_modes(self, store: MemoryStore) -> None:
        now = utcnow()
        ahead = now + timedelta(seconds=1000.5)
        offset = timezone(timedelta(hours=2))
        lines = export_file(
            [
                file_entry("a", {"from": "file", "big": 2**80}, "pa"),
                # Any ISO 8601 offset is read: the same instant, written at +02:00.
                file_entry("b", 2**80, "pb", ahead.astimezone(offset).isoformat()),
                file_entry("c", "file-c", "pc", now - timedelta(seconds=60)),
                {"key": "d", "value": "\u00e9\U0001f600"},  # partition default, persistent
                file_entry("e", "file-e", "pe", now - timedelta(seconds=1)),
            ],
            namespace="some-other-namespace",
        )

        async def prepare() -> State:
            await store.clear()
            await store.set("b", "old-b", partition="q")
            await store.set("b", "old-b", partition="q")  # version 2
            await store.set("c", "old-c", partition="q")
            await store.set("x", "other", partition="q", ttl=3600)
            state = await state_of(store)
            for key in ("a", "b", "c", "d", "e", "x"):
                await store.get(key)  # a cache, where there is one, holds them now
            return state

        def check(entry: Entry | None, value: Any, partition: str, version: int) -> Entry:
            assert entry is not None, f"expected {value!r}"
            assert_same_json(entry.value, value, entry.key)
            assert (entry.partition, entry.version) == (partition, version), entry
            return entry

        # merge: every live entry written; other keys and the expired entries' keys untouched.
        before = await prepare()
        assert counts(await import_lines(store, lines, "merge")) == (3, 2, 0)
        assert await store.keys() == ["a", "b", "c", "d", "x"]
        check(await store.get_entry("a"), {"from": "file", "big": 2**80}, "pa", 1)
        b = check(await store.get_entry("b"), 2**80, "pb", 3)
        assert_close(b.expires_at, ahead, self.portability_slack, "b expires_at")
        d = check(await store.get_entry("d"), "\u00e9\U0001f600", "default", 1)
        assert d.expires_at is None
        assert await store.get("b") == 2**80 and await store.get("e") is None
        after = await state_of(store)
        assert after["c"] == before["c"] and after["x"] == before["x"]
        with pytest.raises(VersionConflictError):
            await store.compare_and_set("b", "stale", version=2)
        assert (await state_of(store))["b"] == after["b"]

        # missing: only keys without a live entry; c is both expired and existing: expired.
        before = await prepare()
        assert counts(await import_lines(store, lines, "missing")) == (2, 2, 1)
        after = await state_of(store)
        assert sorted(after) == ["a", "b", "c", "d", "x"]
        assert {k: after[k] for k in "bcx"} == {k: before[k] for k in "bcx"}
        check(await store.get_entry("a"), {"from": "file", "big": 2**80}, "pa", 1)
        check(await store.get_entry("d"), "\u00e9\U0001f600", "default", 1)
        assert await store.get("b") == "old-b"

        # replace: exactly the file's live entries; c (expired in the file) and x deleted.
        await prepare()
        assert counts(await import_lines(store, lines, "replace")) == (3, 2, 0)
        assert await store.keys() == ["a", "b", "d"]
        for key in ("c", "x", "e"):
            assert await store.get(key) is None and not await store.exists(key), key
        assert await store.get_many(["c", "x"]) == {}
        b = check(await store.get_entry("b"), 2**80, "pb", 3)
        assert_close(b.expires_at, ahead, self.portability_slack, "b expires_at")
        assert await store.get("b") == 2**80
        with pytest.raises(VersionConflictError):
            await store.compare_and_set("b", "stale", version=2)

        # An empty file: replace empties the namespace, merge and missing change nothing.
        empty = export_file([])
        await prepare()
        assert counts(await import_lines(store, empty, "merge")) == (0, 0, 0)
        assert counts(await import_lines(store, empty, "missing")) == (0, 0, 0)
        assert await store.keys() == ["b", "c", "x"]
        assert counts(await import_lines(store, empty, "replace")) == (0, 0, 0)
        assert await store.keys() == [] and await store.get("b") is None

    async def test_import_keeps_the_absolute_expiry(self, store: MemoryStore) -> None:
        now = utcnow()
        in_1000 = now + timedelta(seconds=1000, milliseconds=123)
        in_2000 = now + timedelta(seconds=2000, milliseconds=456)
        in_3000 = now + timedelta(seconds=3000)
        lines = export_file(
            [
                file_entry("k1", 1, "p", in_1000),
                # The created_at of 2020 says nothing of the TTL: the expiry is absolute.
                file_entry("k2", 2, "p", in_2000.astimezone(timezone(timedelta(hours=-7)))),
                file_entry("k3", 3, "p", in_3000.isoformat(timespec="milliseconds")),
                file_entry("k4", 4, "p", None),
                # Unknown fields are ignored (within version 1).
                file_entry("k5", 5, "p", None, future_field={"x": 1}),
            ],
            header={"comment": "unknown header fields are ignored"},
            trailer={"future": True},
        )
        assert counts(await import_lines(store, lines)) == (5, 0, 0)
        for key, expected in (("k1", in_1000), ("k2", in_2000), ("k3", in_3000)):
            entry = await store.get_entry(key)
            assert entry is not None and entry.version == 1, entry
            assert_close(entry.expires_at, expected, self.portability_slack, key)
            ttl = await store.ttl(key)
            remaining = (expected - utcnow()).total_seconds()
            assert ttl is not None and abs(ttl - remaining) <= self.portability_slack + 1, ttl
        for key in ("k4", "k5"):
            entry = await store.get_entry(key)
            assert entry is not None and entry.expires_at is None, entry
            assert await store.ttl(key) is None

    async def test_import_from_file_objects_and_paths(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = files_dir(tmp_path)
        lines = export_file([file_entry(f"k{i:03d}", i, f"p{i % 3}") for i in range(300)])
        data = b"".join(lines)
        plain = folder / "in.jsonl"
        plain.write_bytes(data)
        packed = folder / "in.jsonl.gz"
        packed.write_bytes(gzip.compress(data))
        seekable = io.BytesIO(b"not part of it" + data)
        seekable.seek(len(b"not part of it"))  # read from where it is
        sources: list[tuple[str, Any]] = [
            ("a str path", str(plain)),
            ("a Path", plain),
            ("a .gz path", packed),
            ("a seekable file object", seekable),
            ("an unseekable file object", io.BufferedReader(_Unseekable(data))),
        ]
        portable = _portable(store)
        for what, source in sources:
            await store.clear()
            report = await portable.import_from(source)
            assert counts(report) == (300, 0, 0), what
            assert await store.keys() == [f"k{i:03d}" for i in range(300)], what
            assert await store.get("k299") == 299, what
            entry = await store.get_entry("k005")
            assert entry is not None and entry.partition == "p2", (what, entry)

    async def test_import_refuses_an_unknown_mode_before_opening_anything(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = files_dir(tmp_path)
        await store.set("k", 1)
        before = await state_of(store)
        missing = folder / "does-not-exist.jsonl"
        valid = io.BytesIO(b"".join(export_file([file_entry("k", 2)])))
        portable = _portable(store)
        for mode in BAD_MODES:
            what = f"import_from(mode={mode!r})"
            with pytest.raises(InvalidArgumentError) as info:
                await portable.import_from(missing, mode=mode)
            assert isinstance(info.value, ValueError), what
            with pytest.raises(InvalidArgumentError):
                await portable.import_from(valid, mode=mode)
            assert valid.tell() == 0, f"{what} read the file"
        async with self.target(store) as other:
            for mode in BAD_MODES:
                with pytest.raises(InvalidArgumentError):
                    await fleetmem.copy_namespace(_copy_of(store), _copy_of(other), mode=mode)
            assert await other.keys() == []
        assert await state_of(store) == before
        assert list(folder.iterdir()) == []

    async def test_import_refuses_corrupt_input_and_changes_nothing(
        self, store: MemoryStore
    ) -> None:
        await store.set("k1", "old", partition="p")
        await store.set("k2", {"old": True}, partition="q", ttl=3600)
        await store.set("other", 2**70)
        before = await state_of(store)
        for key in before:
            await store.get(key)  # cached, where there is a cache
        for what, lines, line, text in corrupt_exports(self.max_value_bytes):
            for mode in ("merge", "missing", "replace"):
                where = f"{what} ({mode})"
                with pytest.raises(InvalidExportError) as info:
                    await import_lines(store, lines, mode)
                error = info.value
                assert isinstance(error, ValueError) and isinstance(error, FleetmemError)
                message = str(error)
                if line is not None:
                    assert error.line == line, f"{where}: line {error.line!r}: {message}"
                    assert re.search(rf"\bline {line}\b", message, re.IGNORECASE), (
                        f"{where}: the message does not name line {line}: {message}"
                    )
                if text is not None:
                    assert text in message.lower(), f"{where}: no {text!r} in {message!r}"
            assert await state_of(store) == before, f"{what}: the namespace changed"
        assert await store.get("k1") == "old" and await store.get("other") == 2**70

    async def test_import_refuses_truncated_or_foreign_files(
        self, store: MemoryStore, tmp_path: Path
    ) -> None:
        folder = files_dir(tmp_path)
        await store.set("k1", "old")
        await store.set("zz", "other")
        before = await state_of(store)
        lines = export_file([file_entry(f"k{i:02d}", "v" * 50 + str(i)) for i in range(1, 60)])
        data = b"".join(lines)
        packed = gzip.compress(data)
        cases: list[tuple[str, bytes, str | None]] = [
            ("cut.jsonl.gz", packed[: len(packed) // 2], "truncated"),
            ("cut-crc.jsonl.gz", packed[:-4], "truncated"),
            ("plain-data.jsonl.gz", data, None),  # not gzip at all
            ("no-trailer.jsonl", b"".join(lines[:-1]), "no trailer"),
            ("no-trailer.jsonl.gz", gzip.compress(b"".join(lines[:-1])), "no trailer"),
            ("header-only.jsonl", lines[0], "no trailer"),
            ("empty.jsonl", b"", None),
            ("empty.jsonl.gz", gzip.compress(b""), None),
        ]
        portable = _portable(store)
        for name, content, text in cases:
            path = folder / name
            path.write_bytes(content)
            for mode in ("merge", "missing", "replace"):
                with pytest.raises(InvalidExportError) as info:
                    await portable.import_from(path, mode=mode)
                message = str(info.value).lower()
                if text is not None:
                    assert text in message, f"{name} ({mode}): {message!r}"
            assert await state_of(store) == before, f"{name}: the namespace changed"

    async def test_import_checks_everything_before_the_first_write(
        self, store: MemoryStore
    ) -> None:
        """A progress callback raising during the check pass stops an import that has
        written nothing yet, in every mode."""
        await store.set("a", "old")
        await store.set("zz", "other")
        before = await state_of(store)
        lines = export_file([file_entry(f"k{i:02d}", i) for i in range(50)])
        phases: list[str] = []

        def stop(phase: str, done: int) -> None:
            phases.append(phase)
            if phase == "check":
                raise _Stop(phase)

        for mode in ("merge", "missing", "replace"):
            with pytest.raises(_Stop):
                await _portable(store).import_from(
                    io.BytesIO(b"".join(lines)), mode=mode, progress=stop
                )
            assert await state_of(store) == before, mode
        assert set(phases) == {"check"}, phases

    async def test_progress_reports_each_phase_in_order(self, store: MemoryStore) -> None:
        await write_sample(store)
        total = len(SAMPLE)

        def recorder(into: list[tuple[str, int]]) -> Progress:
            def progress(phase: str, done: int) -> None:
                into.append((phase, done))

            return progress

        def check(calls: list[tuple[str, int]], phases: tuple[str, ...], what: str) -> None:
            assert calls, f"{what}: progress was never called"
            assert {phase for phase, _ in calls} == set(phases), f"{what}: {calls}"
            order = [PHASES.index(phase) for phase, _ in calls]
            assert order == sorted(order), f"{what}: phases out of order: {calls}"
            for phase in phases:
                done = [n for p, n in calls if p == phase]
                assert done == sorted(done), f"{what}: {phase} went back: {calls}"
                assert all(0 <= n <= total for n in done), f"{what}: {calls}"

        exported: list[tuple[str, int]] = []
        buffer = io.BytesIO()
        await _portable(store).export_to(buffer, progress=recorder(exported))
        check(exported, ("export",), "export_to")
        async with self.target(store) as other:
            imported: list[tuple[str, int]] = []
            buffer.seek(0)
            await _portable(other).import_from(buffer, progress=recorder(imported))
            check(imported, ("check", "import"), "import_from")
            copied: list[tuple[str, int]] = []
            await fleetmem.copy_namespace(
                _copy_of(store), _copy_of(other), progress=recorder(copied)
            )
            check(copied, PHASES, "copy_namespace")

    # ------------------------------------------------------------ the change feed

    async def test_imports_are_recorded_in_the_change_feed(self, store: MemoryStore) -> None:
        now = utcnow()
        lines = export_file(
            [
                file_entry("a", {"n": 2**90}, "pa"),
                file_entry("b", "file-b", "pb", now + timedelta(hours=1)),
                file_entry("c", "file-c", "pc", now - timedelta(seconds=5)),
                file_entry("d", [1, "\u00e9"], "pd"),
            ]
        )
        async with self.target(store, "f") as other:
            await other.set("b", "old-b")
            await other.set("c", "old-c")
            await other.set("x", "other")
            changes = other.changes
            await changes.enable()
            try:
                start = await changes.cursor()
                assert counts(await import_lines(other, lines, "replace")) == (3, 1, 0)
                got = (await changes.read(since=start, limit=1000)).changes
                assert Counter((c.op, c.key) for c in got) == Counter(
                    [("set", "a"), ("set", "b"), ("set", "d"), ("delete", "c"), ("delete", "x")]
                ), got
                await self._changes_match_entries(other, got)

                middle = await changes.cursor()
                assert counts(await import_lines(other, lines, "merge")) == (3, 1, 0)
                got = (await changes.read(since=middle, limit=1000)).changes
                assert sorted((c.op, c.key) for c in got) == [
                    ("set", "a"),
                    ("set", "b"),
                    ("set", "d"),
                ], got
                await self._changes_match_entries(other, got)

                last = await changes.cursor()
                assert counts(await import_lines(other, lines, "missing")) == (0, 1, 3)
                assert (await changes.read(since=last, limit=1000)).changes == []
            finally:
                await changes.disable()

    async def _changes_match_entries(self, store: MemoryStore, changes: list[Change]) -> None:
        for change in changes:
            assert change.key is not None
            if change.op != "set":
                assert change.value is None, change
                continue
            entry = await store.get_entry(change.key)
            assert entry is not None, change
            assert change.version == entry.version and change.partition == entry.partition
            assert_same_json(change.value, entry.value, f"change of {change.key!r}")

    # ------------------------------------------------------------ copy_namespace

    async def test_copy_namespace_between_two_namespaces(self, store: MemoryStore) -> None:
        written = await write_sample(store)
        source = await state_of(store)
        async with self.target(store, "c") as other:

            async def prepare() -> None:
                await other.clear()
                await other.set("a", "dst-own", partition="own")
                await other.set("zz-other", 1)
                await other.get("a")  # cached, where there is a cache

            for mode, verify, copied, extra in (
                ("merge", True, len(SAMPLE), ["zz-other"]),
                ("missing", True, len(SAMPLE) - 1, ["zz-other"]),
                ("replace", True, len(SAMPLE), []),
                ("merge", False, len(SAMPLE), ["zz-other"]),
            ):
                what = f"copy_namespace(mode={mode!r}, verify={verify})"
                await prepare()
                report = await fleetmem.copy_namespace(
                    _copy_of(store), _copy_of(other), mode=mode, verify=verify
                )
                assert isinstance(report, fleetmem.CopyReport), report
                assert (report.copied, report.skipped_expired, report.verified) == (
                    copied,
                    0,
                    verify,
                ), f"{what}: {report}"
                got = await self.entries_of(other)
                assert sorted(got) == sorted([*SAMPLE_KEYS, *extra]), f"{what}: {sorted(got)}"
                want = dict(written)
                if mode == "missing":
                    assert (got["a"].value, got["a"].partition, got["a"].version) == (
                        "dst-own",
                        "own",
                        1,
                    ), f"{what}: {got['a']}"
                    del want["a"], got["a"]
                else:
                    assert got["a"].version == 2, f"{what}: {got['a']}"
                    assert_same_json(await other.get("a"), written["a"].value, what)
                for key in extra:
                    del got[key]
                self.assert_same_entries(got, want, what)
        assert await state_of(store) == source, "the copy changed its source"


# ---------------------------------------------------------------- corrupt inputs


def corrupt_exports(max_value_bytes: int) -> list[tuple[str, list[bytes], int | None, str | None]]:
    """(what, lines, the line the error names or None, text its message holds or None) for
    every way an export can be wrong. The base file holds k1..k5 on lines 2-6 and its trailer
    on line 7; each case breaks one thing (a changed entry line gets a recomputed trailer, so
    that only the intended problem is there)."""
    now = utcnow()
    base = [file_entry(f"k{i}", {"i": i}, "p", now + timedelta(hours=i)) for i in range(1, 6)]

    def with_line(number: int, line: dict[str, Any] | bytes) -> list[bytes]:
        """The base file with entry line ``number`` (2-6) replaced."""
        body: list[dict[str, Any] | bytes] = list(base)
        body[number - 2] = line
        return export_file(body)

    def entry(key: Any = "k2", value: Any = 2, **fields: Any) -> dict[str, Any]:
        return {"key": key, "value": value, **fields}

    good = export_file(base)
    header = good[0]
    header_fields = json.loads(header)
    trailer = json.loads(good[-1])
    body = good[1:-1]
    cases: list[tuple[str, list[bytes], int | None, str | None]] = [
        ("bad JSON", with_line(3, b'{"key":"k2","value":\n'), 3, None),
        ("not an object", with_line(3, b"[1,2]\n"), 3, None),
        ("a JSON string", with_line(3, b'"k2"\n'), 3, None),
        ("no key", with_line(3, b'{"value":2}\n'), 3, None),
        ("no value", with_line(3, b'{"key":"k2","partition":"p"}\n'), 3, None),
        ("a key that is a number", with_line(3, entry(2)), 3, None),
        ("a null key", with_line(3, entry(None)), 3, None),
        ("an empty key", with_line(2, entry("")), 2, None),
        ("a NUL in a key", with_line(3, entry("k2\x00")), 3, None),
        ("a control character in a key", with_line(3, entry("k2\x1f")), 3, None),
        ("a key over 1024 bytes", with_line(3, entry("k2" + "x" * 1023)), 3, None),
        ("a lone surrogate in a key", with_line(3, b'{"key":"k2\\ud800","value":1}\n'), 3, None),
        ("an empty partition", with_line(3, entry(partition="")), 3, None),
        ("a partition over 255 bytes", with_line(3, entry(partition="p" * 256)), 3, None),
        ("a partition that is a number", with_line(3, entry(partition=5)), 3, None),
        ("a NUL in a partition", with_line(3, entry(partition="p\x00")), 3, None),
        ("expires_at not a date", with_line(3, entry(expires_at="tomorrow")), 3, None),
        ("expires_at a number", with_line(3, entry(expires_at=1893456000)), 3, None),
        ("a naive expires_at", with_line(3, entry(expires_at="2999-01-01T00:00:00")), 3, None),
        (
            "a naive expires_at, ms",
            with_line(4, entry("k3", expires_at="2999-01-01T00:00:00.000")),
            4,
            None,
        ),
        (
            "a value over max_value_bytes",
            with_line(3, entry(value="x" * (max_value_bytes - 1))),
            3,
            None,
        ),
        ("a value nested too deep", with_line(3, entry(value=nested_list(65))), 3, None),
        (
            "a line over 2 x max_value_bytes + 64 KiB",
            with_line(3, entry(value="x" * (2 * max_value_bytes + 64 * 1024))),
            3,
            None,
        ),
        ("U+0000 in a value", with_line(3, b'{"key":"k2","value":"a\\u0000b"}\n'), 3, None),
        ("U+0000 in a field name", with_line(3, b'{"key":"k2","value":{"\\u0000":1}}\n'), 3, None),
        ("a lone surrogate in a value", with_line(3, b'{"key":"k2","value":"\\udc00"}\n'), 3, None),
        ("a number beyond a float", with_line(3, b'{"key":"k2","value":[1e400]}\n'), 3, None),
        ("NaN", with_line(3, b'{"key":"k2","value":NaN}\n'), 3, None),
        ("Infinity", with_line(3, b'{"key":"k2","value":[-Infinity]}\n'), 3, None),
        ("a repeated field", with_line(3, b'{"key":"k2","value":1,"value":2}\n'), 3, None),
        ("a repeated key field", with_line(3, b'{"key":"k2","key":"k9","value":1}\n'), 3, None),
        ("invalid UTF-8", with_line(3, b'{"key":"k2\xff","value":1}\n'), 3, None),
        ("an empty line", export_file([*base[:2], b"\n", *base[2:]]), 4, None),
        ("a blank line", export_file([*base[:2], b"  \n", *base[2:]]), 4, None),
        ("keys not ascending", export_file([base[0], base[2], base[1], *base[3:]]), 4, None),
        ("a duplicate key", with_line(4, file_entry("k2", 3)), 4, None),
        ("a wrong count", export_file(base, trailer={"count": 4}), 7, None),
        ("a count as text", export_file(base, trailer={"count": "5"}), 7, None),
        ("a wrong checksum", export_file(base, trailer={"sha256": "0" * 64}), 7, None),
        (
            "the checksum of other lines",
            [header, *body[:2], dumps_line(file_entry("k3", "changed")), *body[3:], good[-1]],
            7,
            None,
        ),
        ("no header", good[1:], 1, None),
        ("a BOM", [b"\xef\xbb\xbf" + header, *good[1:]], 1, None),
        ("another format", export_file(base, header={"format": "other-export"}), 1, None),
        ("version 2", export_file(base, header={"version": 2}), 1, None),
        (
            "a naive exported_at",
            export_file(base, header={"exported_at": "2024-01-01T00:00:00"}),
            1,
            None,
        ),
        ("a line after the trailer", [*good, dumps_line(file_entry("k9", 9))], 8, None),
        ("a second trailer", [*good, good[-1]], 8, None),
        ("an empty line after the trailer", [*good, b"\n"], 8, None),
        (
            "the trailer as an entry",
            [header, *body, dumps_line({**trailer, "end": False})],
            None,
            None,
        ),
        ("no trailer", good[:-1], None, "no trailer"),
        ("only a header", [header], None, "no trailer"),
    ]
    assert header_fields["format"] == "fleetmem-export"  # the base is valid
    return cases
