"""The export format and ``import_from``'s checks (``fleetmem.portability``) on the in-memory
store: exact output, round trips, every corruption refused with its line and nothing written,
file objects, gzip, atomic files and progress. The backends' own export and import are tested
by the conformance suite and the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

import fleetmem
from fleetmem import (
    ExportReport,
    ImportReport,
    InMemoryStore,
    InvalidArgumentError,
    InvalidExportError,
    InvalidKeyError,
    portability,
)
from fleetmem.backends.memory.kv import InMemoryKV
from fleetmem.backends.seam import ImportOp, KVBackend
from fleetmem.portability import FORMAT, FORMAT_VERSION, _entry_line, format_time
from fleetmem.protocol import Entry
from fleetmem.sync import SyncStore

_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_FUTURE = "2099-01-01T00:00:00.000000Z"
_PAST = "2001-01-01T00:00:00.000000Z"


# ------------------------------------------------------------------------------------ helpers


async def _filled(namespace: str = "src") -> InMemoryStore:
    store = InMemoryStore(namespace=namespace)
    await store.set("plain", {"step": 1, "tags": ["a", "b"], "ok": True, "none": None})
    await store.set("big", {"n": 2**100, "m": -(2**70), "small": 7})
    await store.set("float", [1.5, 1e16, 0.1, -0.0])
    await store.set("ttl", "soon", ttl=3600, partition="p1")
    await store.set("ключ", "значение", partition="раздел")
    await store.set("🔑", {"emoji": "🙂"})
    await store.set("é", "accent")
    await store.set("B", False)
    await store.set("a", 1)
    return store


async def _export(store: InMemoryStore, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    await store.export_to(out, **kwargs)
    return out.getvalue()


def _lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n")
    return [line + b"\n" for line in data[:-1].split(b"\n")]


def _header(**fields: Any) -> bytes:
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "namespace": "x",
        "backend": "memory",
        "exported_at": "2026-01-01T00:00:00.000000Z",
        **fields,
    }
    return json.dumps(header, separators=(",", ":")).encode() + b"\n"


def _trailer(entries: list[bytes], count: int | None = None, sha256: str | None = None) -> bytes:
    digest = hashlib.sha256(b"".join(entries)).hexdigest()
    trailer = {
        "end": True,
        "count": len(entries) if count is None else count,
        "sha256": digest if sha256 is None else sha256,
    }
    return json.dumps(trailer, separators=(",", ":")).encode() + b"\n"


def _file(entries: list[bytes]) -> bytes:
    """A valid export of ``entries`` (lines with their newline): header and a right trailer."""
    return _header() + b"".join(entries) + _trailer(entries)


def _entry(key: str, value: Any = 1, **fields: Any) -> bytes:
    return json.dumps({"key": key, "value": value, **fields}, separators=(",", ":")).encode() + (
        b"\n"
    )


async def _state(store: InMemoryStore) -> list[Entry]:
    """Every live entry of the store's namespace, with its version and timestamps."""
    out = []
    for key in await store.keys():
        entry = await store.get_entry(key)
        assert entry is not None
        out.append(entry)
    return out


async def _target() -> InMemoryStore:
    store = InMemoryStore(namespace="dst", max_value_bytes=1000)
    await store.set("a", "existing")
    await store.set("zz", {"kept": True}, ttl=3600, partition="q")
    await store.changes.enable()
    return store


# ------------------------------------------------------------------------------------ writing


async def test_the_export_is_exactly_the_format() -> None:
    store = await _filled()
    out = io.BytesIO()
    report = await store.export_to(out)
    lines = _lines(out.getvalue())
    header = json.loads(lines[0])
    assert header == {
        "format": "fleetmem-export",
        "version": 1,
        "namespace": "src",
        "backend": "memory",
        "exported_at": header["exported_at"],
    }
    assert list(header) == ["format", "version", "namespace", "backend", "exported_at"]
    assert _TIME.fullmatch(header["exported_at"])
    entries, trailer = lines[1:-1], json.loads(lines[-1])
    assert trailer == {
        "end": True,
        "count": 9,
        "sha256": hashlib.sha256(b"".join(entries)).hexdigest(),
    }
    keys = [json.loads(line)["key"] for line in entries]
    assert keys == sorted(keys) == ["B", "a", "big", "float", "plain", "ttl", "é", "ключ", "🔑"]
    for line in entries:
        record = json.loads(line)
        assert list(record) == [
            "key",
            "value",
            "partition",
            "version",
            "created_at",
            "updated_at",
            "expires_at",
        ]
        assert _TIME.fullmatch(record["created_at"]) and _TIME.fullmatch(record["updated_at"])
        assert record["expires_at"] is None or _TIME.fullmatch(record["expires_at"])
        assert b", " not in line and b'": ' not in line  # compact
    # Non-ASCII is written as is, big integers exactly.
    assert "ключ".encode() in out.getvalue() and b"\\u" not in out.getvalue()
    assert b'"n":1267650600228229401496703205376' in out.getvalue()
    assert json.loads(entries[2])["value"] == {"n": 2**100, "m": -(2**70), "small": 7}
    ttl = json.loads(entries[5])
    assert (ttl["partition"], ttl["value"]) == ("p1", "soon")
    expires = datetime.fromisoformat(ttl["expires_at"].replace("Z", "+00:00"))
    assert timedelta(seconds=3590) < expires - datetime.now(timezone.utc) <= timedelta(hours=1)
    assert report == ExportReport(
        namespace="src",
        count=9,
        sha256=trailer["sha256"],
        exported_at=report.exported_at,
        consistency="snapshot",
    )
    assert report.exported_at.tzinfo is not None
    assert header["exported_at"] == report.exported_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_datetimes_always_carry_six_fraction_digits_in_utc() -> None:
    whole = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)  # microsecond 0
    other_zone = datetime(2026, 3, 4, 7, 6, 7, 5, tzinfo=timezone(timedelta(hours=2)))
    line = _entry_line(Entry("k", [2**65], "default", 3, whole, other_zone, whole))
    assert line == (
        b'{"key":"k","value":[36893488147419103232],"partition":"default","version":3,'
        b'"created_at":"2026-03-04T05:06:07.000000Z","updated_at":"2026-03-04T05:06:07.000005Z",'
        b'"expires_at":"2026-03-04T05:06:07.000000Z"}\n'
    )


async def test_prefix_and_partition_select_what_is_exported() -> None:
    store = await _filled()
    await store.set("a2", 2, partition="p1")
    lines = _lines(await _export(store, prefix="a"))
    assert [json.loads(line)["key"] for line in lines[1:-1]] == ["a", "a2"]
    lines = _lines(await _export(store, partition="p1"))
    assert [json.loads(line)["key"] for line in lines[1:-1]] == ["a2", "ttl"]
    lines = _lines(await _export(store, prefix="zzz"))
    assert len(lines) == 2 and json.loads(lines[1])["count"] == 0


async def test_bad_arguments_are_refused_before_any_file_is_made(tmp_path: Path) -> None:
    store = await _filled()
    target = tmp_path / "out.jsonl"
    with pytest.raises(InvalidKeyError):
        await store.export_to(target, prefix="a\x00")
    with pytest.raises(InvalidKeyError):
        await store.export_to(target, partition="")
    with pytest.raises(InvalidArgumentError):
        await store.export_to(io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await store.export_to(target, progress=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await store.import_from(io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await store.import_from(tmp_path / "missing.jsonl", mode="overwrite")
    with pytest.raises(InvalidArgumentError):
        await store.import_from(tmp_path / "missing.jsonl", mode=None)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        await store.import_from(tmp_path / "missing.jsonl")
    await store.close()
    with pytest.raises(fleetmem.StoreClosedError):
        await store.export_to(target)
    assert list(tmp_path.iterdir()) == []


class _FailingKV(InMemoryKV):
    """Exports one page, then fails."""

    async def export_pages(
        self, prefix: str, partition: str | None, page_size: int
    ) -> AsyncGenerator[list[Entry], None]:
        async with contextlib.aclosing(super().export_pages(prefix, partition, 2)) as pages:
            async for page in pages:
                yield page
                raise OSError("disk on fire")


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
async def test_a_failed_export_leaves_no_file_and_an_old_one_untouched(
    tmp_path: Path, name: str
) -> None:
    store = InMemoryStore.from_backend(_FailingKV(namespace="n"))
    await store.set_many({f"k{i}": i for i in range(5)})
    with pytest.raises(OSError, match="disk on fire"):
        await store.export_to(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / name).write_bytes(b"old")
    with pytest.raises(OSError, match="disk on fire"):
        await store.export_to(tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (tmp_path / name).read_bytes() == b"old"


async def test_a_cancelled_export_leaves_no_file(tmp_path: Path) -> None:
    store = await _filled()
    started = asyncio.Event()

    class _Slow(InMemoryKV):
        async def export_pages(
            self, prefix: str, partition: str | None, page_size: int
        ) -> AsyncGenerator[list[Entry], None]:
            started.set()
            await asyncio.sleep(30)
            yield []

    slow = InMemoryStore.from_backend(_Slow(namespace="n"))
    task = asyncio.ensure_future(slow.export_to(tmp_path / "out.jsonl"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(tmp_path.iterdir()) == []
    await store.export_to(tmp_path / "out.jsonl")  # a complete one appears
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


async def test_a_path_is_written_whole_and_gzip_by_its_suffix(tmp_path: Path) -> None:
    store = await _filled()
    report = await store.export_to(tmp_path / "a.jsonl")
    packed = await store.export_to(str(tmp_path / "a.jsonl.gz"))
    raw = (tmp_path / "a.jsonl").read_bytes()
    compressed = (tmp_path / "a.jsonl.gz").read_bytes()
    assert compressed[:2] == b"\x1f\x8b" and raw[:1] == b"{"
    unpacked = gzip.decompress(compressed)
    assert _lines(unpacked)[1:] == _lines(raw)[1:]  # the same entries and trailer
    assert packed.sha256 == report.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.jsonl.gz"]
    copy = store.with_namespace("copy")
    assert await copy.import_from(tmp_path / "a.jsonl.gz") == ImportReport(9, 0, 0)
    assert [e.value for e in await _state(copy)] == [e.value for e in await _state(store)]


async def test_file_objects_are_written_and_read_raw_from_their_position() -> None:
    store = await _filled()
    out = io.BytesIO(b"PREFIX")
    out.seek(6)
    await store.export_to(out)
    assert out.getvalue().startswith(b"PREFIX{") and not out.closed
    source = io.BytesIO(out.getvalue())
    source.seek(6)
    copy = store.with_namespace("copy")
    assert await copy.import_from(source) == ImportReport(9, 0, 0)
    assert source.read() == b""  # read to its end


class _Pipe(io.RawIOBase):
    """A non-seekable stream that hands out a few bytes at a time."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = min(7, len(buffer))
        chunk, self._data = self._data[:size], self._data[size:]
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _ReadOnly:
    """An object with nothing but ``read``."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(min(size, 5) if size > 0 else size)


class _WriteOnly:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)


async def test_non_seekable_file_objects() -> None:
    store = await _filled()
    sink = _WriteOnly()
    await store.export_to(sink)  # type: ignore[arg-type]
    data = b"".join(sink.parts)
    assert data == await _export(store) or _lines(data)[1:] == _lines(await _export(store))[1:]
    for source in (io.BufferedReader(_Pipe(data)), _Pipe(data), _ReadOnly(data)):
        copy = store.with_namespace("copy")
        await copy.clear()
        assert await copy.import_from(source) == ImportReport(9, 0, 0)  # type: ignore[arg-type]
        assert await copy.get("big") == {"n": 2**100, "m": -(2**70), "small": 7}


# ------------------------------------------------------------------------------------ round trips


async def test_round_trip_keeps_values_partitions_and_expiry_exactly() -> None:
    store = await _filled()
    data = await _export(store)
    copy = InMemoryStore(namespace="elsewhere")  # the header's namespace does not matter
    report = await copy.import_from(io.BytesIO(data))
    assert report == ImportReport(written=9, skipped_expired=0, skipped_existing=0)
    mine, theirs = await _state(store), await _state(copy)
    assert [(e.key, e.value, e.partition, e.expires_at) for e in theirs] == [
        (e.key, e.value, e.partition, e.expires_at) for e in mine
    ]
    assert all(e.version == 1 for e in theirs)  # versions follow the target's write rules
    big = await copy.get("big")
    assert big == {"n": 2**100, "m": -(2**70), "small": 7}
    floats = await copy.get("float")
    assert floats == [1.5, 1e16, 0.1, -0.0] and type(floats[1]) is float
    again = await _export(copy)
    assert _lines(again)[1:-1] != [] and [json.loads(x)["value"] for x in _lines(again)[1:-1]] == [
        json.loads(x)["value"] for x in _lines(data)[1:-1]
    ]


async def test_what_the_reader_accepts_beyond_what_it_writes() -> None:
    entries = [
        _entry("a", {"x": 1}, partition=None, expires_at=None, extra={"ignored": [1, 2]}),
        _entry("b", "x", expires_at="2099-01-01T02:00:00+02:00", version=4),
        _entry("c", 2**80, created_at="2020-01-01T00:00:00Z", updated_at="2020-01-01T00:00:00Z"),
        _entry("d", 1e300),
        b'{"key":"e","value":"colon\\u003a","note":"\\u003a"}\n',
        _entry("f", {"nested": {"k": "v"}}),
    ]
    data = _header(namespace="other", future_field=1) + b"".join(entries) + _trailer(entries)
    # Whitespace between tokens and an uppercase checksum are fine too.
    store = InMemoryStore(namespace="n")
    assert await store.import_from(io.BytesIO(data)) == ImportReport(6, 0, 0)
    a, b = await store.get_entry("a"), await store.get_entry("b")
    assert a is not None and (a.value, a.partition, a.expires_at) == ({"x": 1}, "default", None)
    assert b is not None and b.expires_at == datetime(2099, 1, 1, tzinfo=timezone.utc)
    assert await store.get("c") == 2**80
    d = await store.get("d")
    assert d == 1e300 and type(d) is float
    assert await store.get("e") == "colon:"
    spaced = _header() + b'{"key": "s", "value": [1, 2.5]}\n'
    spaced += _trailer([b'{"key": "s", "value": [1, 2.5]}\n'])
    assert await store.import_from(io.BytesIO(spaced)) == ImportReport(1, 0, 0)
    assert await store.get("s") == [1, 2.5]
    upper = _file([_entry("u")])
    digest = json.loads(_lines(upper)[-1])["sha256"]
    upper = upper.replace(digest.encode(), digest.upper().encode())
    assert await store.import_from(io.BytesIO(upper)) == ImportReport(1, 0, 0)


async def test_big_numbers_are_read_exactly_wherever_they_are() -> None:
    values: list[Any] = [
        2**64 - 1,
        2**63,
        -(2**63) - 1,
        [1, {"deep": [2**200]}],
        {"a": 12345678901234567890123, "b": "text 1e+5"},
        1e16,
        123456789.0e10,
    ]
    entries = [_entry(f"k{i}", value) for i, value in enumerate(values)]
    store = InMemoryStore(namespace="n")
    await store.import_from(io.BytesIO(_file(entries)))
    for i, value in enumerate(values):
        got = await store.get(f"k{i}")
        assert got == value and json.dumps(got) == json.dumps(value), i


# ------------------------------------------------------------------------------------ corruption


def _valid_entries() -> list[bytes]:
    return [_entry("a", 1), _entry("b", {"x": [1, 2]}), _entry("c", "three")]


def _swap(lines: list[bytes], index: int, line: bytes) -> bytes:
    """A file of ``lines`` with ``lines[index]`` replaced, and a trailer right for it."""
    changed = [*lines]
    changed[index] = line
    return _file(changed)


def _gzip_truncated() -> bytes:
    whole = gzip.compress(_file([_entry(f"k{i:05}", "x" * 50) for i in range(2000)]))
    return whole[: len(whole) // 2]


_GOOD = _valid_entries()


def _second(line: bytes) -> bytes:
    """A valid file whose second entry (line 3) is ``line``."""
    return _swap(_GOOD, 1, line)


def _b(**fields: Any) -> bytes:
    """A valid file whose second entry (line 3) is key ``b`` with ``fields``."""
    return _swap(_GOOD, 1, _entry("b", **fields))


_DUP_HEADER = _header()[:-2] + b',"version":1}\n' + b"".join(_GOOD) + _trailer(_GOOD)
_EMPTY_LINE = _header() + _GOOD[0] + b"\n" + b"".join(_GOOD[1:]) + _trailer(_GOOD)

#: name -> (input, the line it names, a part of the message)
CORRUPTIONS: dict[str, tuple[bytes | Callable[[], bytes], int, str]] = {
    "bad JSON line": (_second(b'{"key":"b","value":\n'), 3, "not valid JSON"),
    "not an object": (_swap(_GOOD, 1, b"[1,2]\n"), 3, "not a JSON object"),
    "no key": (_second(b'{"value":1}\n'), 3, "needs a key"),
    "no value": (_second(b'{"key":"b"}\n'), 3, "has no value"),
    "bad key": (_swap(_GOOD, 1, _entry("")), 3, "key must not be empty"),
    "key not a string": (_second(b'{"key":5,"value":1}\n'), 3, "key must be a str"),
    "NUL in a key": (_second(b'{"key":"b\\u0000","value":1}\n'), 3, "control character"),
    "NUL in a value": (_swap(_GOOD, 1, _entry("b", ["\u0000"])), 3, "U+0000"),
    "too long a key": (_swap(_GOOD, 2, _entry("c" * 1025)), 4, "longer than 1024"),
    "oversize value": (_swap(_GOOD, 1, _entry("b", "x" * 2000)), 3, "max_value_bytes"),
    "too deep a value": (
        _swap(_GOOD, 1, _entry("b", json.loads("[" * 70 + "]" * 70))),
        3,
        "deeper",
    ),
    "bad partition": (_swap(_GOOD, 1, _entry("b", partition="")), 3, "partition"),
    "wrong count": (_header() + b"".join(_GOOD) + _trailer(_GOOD, count=4), 5, "count mismatch"),
    "negative count": (_header() + b"".join(_GOOD) + _trailer(_GOOD, count=-1), 5, "count"),
    "wrong checksum": (
        _header() + b"".join(_GOOD) + _trailer(_GOOD, sha256="0" * 64),
        5,
        "checksum mismatch",
    ),
    "changed entry": (
        _header() + b"".join([_GOOD[0], _entry("b", 2), _GOOD[2]]) + _trailer(_GOOD),
        5,
        "checksum mismatch",
    ),
    "bad trailer": (_header() + b"".join(_GOOD) + b'{"end":false}\n', 5, "trailer"),
    "missing header": (b"".join(_GOOD) + _trailer(_GOOD), 1, "no header"),
    "unsupported version": (_file(_GOOD).replace(b'"version":1', b'"version":2', 1), 1, "2"),
    "string version": (_file(_GOOD).replace(b'"version":1', b'"version":"1"', 1), 1, "int"),
    "empty input": (b"", 1, "empty"),
    "BOM": (b"\xef\xbb\xbf" + _file(_GOOD), 1, "BOM"),
    "gzip data in a file object": (gzip.compress(_file(_GOOD)), 1, "gzip"),
    "missing trailer": (_header() + b"".join(_GOOD), 5, "no trailer"),
    "only a header": (_header(), 2, "no trailer"),
    "something after the trailer": (_file(_GOOD) + _entry("d"), 6, "follows the trailer"),
    "a second trailer": (_file(_GOOD) + _trailer(_GOOD), 6, "follows the trailer"),
    "keys not ascending": (_file([_GOOD[0], _GOOD[2], _GOOD[1]]), 4, "not ascending"),
    "keys by code point": (_file([_entry("é"), _entry("z")]), 3, "not ascending"),
    "duplicate key": (_file([_GOOD[0], _GOOD[1], _entry("b", 2)]), 4, "duplicate key 'b'"),
    "duplicate field": (
        _second(b'{"key":"b","value":1,"value":2}\n'),
        3,
        "duplicate field",
    ),
    "duplicate key field": (_second(b'{"key":"b","key":"bb","value":1}\n'), 3, "'key'"),
    "duplicate nested field": (_second(b'{"key":"b","value":{"x":1,"x":2}}\n'), 3, "'x'"),
    "duplicate field, escaped colon": (
        _second(b'{"key":"b\\u003a","value":{"x":1,"x":2}}\n'),
        3,
        "duplicate field",
    ),
    "duplicate header field": (
        _header()[:-2] + b',"version":1}\n' + _file(_GOOD)[len(_header()) :],
        1,
        "duplicate",
    ),
    "naive datetime": (_b(expires_at="2099-01-01T00:00:00"), 3, "offset"),
    "naive created_at": (_swap(_GOOD, 1, _entry("b", created_at="2020-01-01 10:00")), 3, "offset"),
    "not a datetime": (_swap(_GOOD, 1, _entry("b", expires_at="tomorrow")), 3, "ISO 8601"),
    "numeric datetime": (_swap(_GOOD, 1, _entry("b", expires_at=5)), 3, "ISO 8601"),
    "too far ahead": (
        _swap(_GOOD, 1, _entry("b", expires_at="2999-01-01T00:00:00Z")),
        3,
        "100 years",
    ),
    "bad version": (_swap(_GOOD, 1, _entry("b", version=0)), 3, "version"),
    "bool version": (_swap(_GOOD, 1, _entry("b", version=True)), 3, "version"),
    "NaN": (_second(b'{"key":"b","value":NaN}\n'), 3, "JSON"),
    "Infinity": (_second(b'{"key":"b","value":[-Infinity]}\n'), 3, "JSON"),
    "NaN with a big integer": (
        _second(b'{"key":"b","value":[NaN,123456789012345678901]}\n'),
        3,
        "NaN",
    ),
    "a number beyond a float": (_second(b'{"key":"b","value":1e400}\n'), 3, "float"),
    "a big number beyond a float": (
        _second(b'{"key":"b","value":[1e400,123456789012345678901]}\n'),
        3,
        "float",
    ),
    "invalid UTF-8": (_second(b'{"key":"b\xff","value":1}\n'), 3, "UTF-8"),
    "invalid UTF-8, escaped colon": (
        _second(b'{"key":"b\xff\\u003a","value":1}\n'),
        3,
        "UTF-8",
    ),
    "lone surrogate": (_second(b'{"key":"b\\ud800","value":1}\n'), 3, "surrogate"),
    "lone surrogate in a value": (
        _second(b'{"key":"b","value":{"t":["\\udc00"]}}\n'),
        3,
        "the value of key 'b' holds a lone surrogate",
    ),
    "empty line": (
        _header() + _GOOD[0] + b"\n" + b"".join(_GOOD[1:]) + _trailer(_GOOD),
        3,
        "empty line",
    ),
    "nested deeper than orjson writes": (_b(value=json.loads("[" * 300 + "]" * 300)), 3, "deeper"),
    "nested deeper than orjson reads": (
        _second(b'{"key":"b","value":' + b"[" * 5000 + b"]" * 5000 + b"}\n"),
        3,
        "deeply",
    ),
    "line too long": (_swap(_GOOD, 1, _entry("b", "x" * 70_000)), 3, "longer than"),
    "no final newline": (_file(_GOOD)[:-1], 5, "truncated"),
    "cut in the middle of a line": (_file(_GOOD)[:-20], 5, "truncated"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
async def test_every_corruption_is_refused_naming_its_line_and_nothing_is_written(
    case: str,
) -> None:
    data, line, words = CORRUPTIONS[case]
    payload = data() if callable(data) else data
    store = await _target()
    before = await _state(store)
    cursor = await store.changes.cursor()
    calls: list[tuple[str, int]] = []
    with pytest.raises(InvalidExportError) as caught:
        await store.import_from(io.BytesIO(payload), mode="replace", progress=_record(calls))
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, fleetmem.FleetmemError)
    assert error.line == line, str(error)
    assert str(error).startswith(f"line {line}: "), str(error)
    assert words in str(error), str(error)
    assert await _state(store) == before
    assert (await store.changes.read(cursor)).changes == []
    assert all(phase == "check" for phase, _ in calls)


@pytest.mark.parametrize("mode", ["merge", "missing", "replace"])
async def test_a_truncated_gzip_file_is_refused(tmp_path: Path, mode: str) -> None:
    (tmp_path / "cut.jsonl.gz").write_bytes(_gzip_truncated())
    (tmp_path / "raw.jsonl.gz").write_bytes(_file(_GOOD))  # not gzip at all
    store = await _target()
    before = await _state(store)
    with pytest.raises(InvalidExportError, match="truncated") as caught:
        await store.import_from(tmp_path / "cut.jsonl.gz", mode=mode)
    assert caught.value.line is not None and caught.value.line > 1
    assert str(caught.value).startswith(f"line {caught.value.line}: ")
    with pytest.raises(InvalidExportError, match="gzip") as caught:
        await store.import_from(tmp_path / "raw.jsonl.gz", mode=mode)
    assert caught.value.line == 1
    assert await _state(store) == before


def test_the_errors_pickle_with_their_details() -> None:
    import pickle

    error = InvalidExportError("line 3: bad", 3)
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert (str(again), again.line) == ("line 3: bad", 3)
    verification = fleetmem.VerificationError("differs", [f"k{i}" for i in range(12)])
    assert verification.keys == [f"k{i}" for i in range(10)]
    again_v = pickle.loads(pickle.dumps(verification))  # noqa: S301
    assert (str(again_v), again_v.keys) == ("differs", verification.keys)
    assert fleetmem.errors.InvalidExportError is InvalidExportError


# ------------------------------------------------------------------------------------ modes


def _record(calls: list[tuple[str, int]]) -> Callable[[str, int], None]:
    def progress(phase: str, done: int) -> None:
        calls.append((phase, done))

    return progress


async def test_merge_writes_every_entry_and_leaves_other_keys() -> None:
    store = await _target()
    cursor = await store.changes.cursor()
    entries = [_entry("a", "new", partition="p"), _entry("b", 2, expires_at=_FUTURE)]
    report = await store.import_from(io.BytesIO(_file(entries)))
    assert report == ImportReport(2, 0, 0)
    a = await store.get_entry("a")
    assert a is not None and (a.value, a.partition, a.version) == ("new", "p", 2)
    b = await store.get_entry("b")
    assert b is not None and b.expires_at == datetime(2099, 1, 1, tzinfo=timezone.utc)
    assert await store.get("zz") == {"kept": True}
    changes = (await store.changes.read(cursor)).changes
    assert [(c.op, c.key, c.value) for c in changes] == [("set", "a", "new"), ("set", "b", 2)]


async def test_missing_writes_only_absent_keys() -> None:
    store = await _target()
    entries = [_entry("a", "new"), _entry("b", 2), _entry("zz", "no")]
    report = await store.import_from(io.BytesIO(_file(entries)), mode="missing")
    assert report == ImportReport(written=1, skipped_expired=0, skipped_existing=2)
    assert await store.get("a") == "existing"
    assert await store.get("b") == 2
    assert await store.get("zz") == {"kept": True}


async def test_replace_makes_the_namespace_hold_exactly_the_file() -> None:
    store = await _target()
    await store.set("gone", 1)
    cursor = await store.changes.cursor()
    entries = [_entry("a", "new"), _entry("b", 2), _entry("gone", 3, expires_at=_PAST)]
    report = await store.import_from(io.BytesIO(_file(entries)), mode="replace")
    assert report == ImportReport(written=2, skipped_expired=1, skipped_existing=0)
    assert await store.keys() == ["a", "b"]
    changes = (await store.changes.read(cursor)).changes
    assert sorted((c.op, c.key) for c in changes) == [
        ("delete", "gone"),
        ("delete", "zz"),
        ("set", "a"),
        ("set", "b"),
    ]


async def test_expired_entries_are_skipped_and_counted_in_every_mode() -> None:
    entries = [_entry("a", "old", expires_at=_PAST), _entry("c", 3, expires_at=_FUTURE)]
    for mode in ("merge", "missing", "replace"):
        store = await _target()
        report = await store.import_from(io.BytesIO(_file(entries)), mode=mode)
        assert report.skipped_expired == 1 and report.written == 1 and report.skipped_existing == 0
        assert await store.get("a") == (None if mode == "replace" else "existing")


async def test_an_unchanged_spool_is_what_is_written_even_if_the_file_changes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(_file(_GOOD))
    store = InMemoryStore(namespace="n")
    calls: list[tuple[str, int]] = []

    def progress(phase: str, done: int) -> None:
        calls.append((phase, done))
        if phase == "check" and len(calls) == 1:
            path.write_bytes(b"garbage")  # the checked content is what gets written

    assert await store.import_from(path, progress=progress) == ImportReport(3, 0, 0)
    assert await store.get("b") == {"x": [1, 2]}


async def test_progress_reports_each_phase_up_to_its_total() -> None:
    store = InMemoryStore(namespace="n")
    await store.set_many({f"k{i:05}": i for i in range(2500)})
    calls: list[tuple[str, int]] = []
    out = io.BytesIO()
    await store.export_to(out, progress=_record(calls))
    assert calls[-1] == ("export", 2500) and {p for p, _ in calls} == {"export"}
    calls.clear()
    out.seek(0)
    copy = store.with_namespace("copy")
    await copy.import_from(out, progress=_record(calls))
    checks = [d for p, d in calls if p == "check"]
    imports = [d for p, d in calls if p == "import"]
    assert [p for p, _ in calls] == ["check"] * len(checks) + ["import"] * len(imports)
    assert checks == sorted(checks) and checks[-1] == 2500 and 1000 in checks
    assert imports == sorted(imports) and imports[-1] == 2500 and 1000 in imports
    calls.clear()
    out.seek(0)
    await copy.import_from(out, mode="replace", progress=_record(calls))
    assert calls[-1] == ("import", 2500)
    await store.import_from(io.BytesIO(_file([])), progress=_record(calls))
    assert calls[-2:] == [("check", 0), ("import", 0)]


async def test_a_progress_error_during_the_check_aborts_with_nothing_written() -> None:
    store = InMemoryStore(namespace="n")
    entries = [_entry(f"k{i:05}", i) for i in range(1500)]

    def progress(phase: str, done: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        await store.import_from(io.BytesIO(_file(entries)), progress=progress)
    assert await store.keys() == []


# ------------------------------------------------------------------------------------ memory


async def test_the_memory_export_is_a_snapshot() -> None:
    store = InMemoryStore(namespace="n")
    await store.set_many({"a": 1, "b": 2, "c": 3})
    pages = store.kv.export_pages("", None, 1)
    first = await pages.__anext__()
    await store.set("a0", "new")
    await store.set("b", "changed")
    await store.delete("c")
    rest = [page async for page in pages]
    seen = [(e.key, e.value) for page in [first, *rest] for e in page]
    assert seen == [("a", 1), ("b", 2), ("c", 3)]
    assert store.kv.export_consistency == "snapshot"


async def test_the_memory_replace_is_atomic() -> None:
    store = InMemoryStore(namespace="n")
    await store.set_many({"a": 1, "z": 26})
    before = await _state(store)

    async def failing() -> AsyncIterator[list[ImportOp]]:
        yield [ImportOp("a", b"2", "default", None)]
        raise OSError("input lost")

    with pytest.raises(OSError, match="input lost"):
        await store.kv.import_replace(failing())
    assert await _state(store) == before
    assert store.kv.replace_is_atomic is True


async def test_the_memory_import_uses_the_absolute_expiry() -> None:
    store = InMemoryStore(namespace="n")
    expires = datetime.now(timezone.utc) + timedelta(seconds=30)
    ops = [ImportOp("a", b"1", "p", expires), ImportOp("b", b"2", "p", None)]
    tally = await store.kv.import_batch(ops, False)
    assert tally == (2, 0, 0)
    a = await store.get_entry("a")
    assert a is not None and abs(a.expires_at - expires) < timedelta(microseconds=2)  # type: ignore[operator]
    gone = [ImportOp("c", b"3", "p", datetime.now(timezone.utc) - timedelta(seconds=1))]
    assert await store.kv.import_batch(gone, False) == (0, 1, 0)
    assert await store.kv.import_batch([ImportOp("a", b"9", "p", None)], True) == (0, 0, 1)
    assert await store.get("a") == 1


def test_the_seam_names_the_portability_types() -> None:
    assert KVBackend.export_consistency == "per-entry"
    assert KVBackend.replace_is_atomic is False
    for name in ("ExportReport", "ImportReport", "CopyReport", "copy_namespace"):
        assert name in fleetmem.__all__ and getattr(fleetmem, name) is not None
    for name in ("InvalidExportError", "VerificationError"):
        assert name in fleetmem.__all__ and name in fleetmem.errors.__all__


# ------------------------------------------------------------------------------------ sync


def test_the_sync_store_exports_and_imports(tmp_path: Path) -> None:
    async def make() -> InMemoryStore:
        return await _filled()

    source = asyncio.run(make())
    data = asyncio.run(_export(source))
    with SyncStore.wrap(InMemoryStore(namespace="n")) as store:
        assert store.import_from(io.BytesIO(data)) == ImportReport(9, 0, 0)
        report = store.export_to(os.fspath(tmp_path / "out.jsonl.gz"), prefix="b")
        assert report.count == 1 and report.namespace == "n"
        view = store.with_namespace("other")
        view.set("x", 1)
        assert view.import_from(tmp_path / "out.jsonl.gz", mode="replace") == ImportReport(1, 0, 0)
        assert view.keys() == ["big"]
        with pytest.raises(InvalidArgumentError):
            view.import_from(tmp_path / "out.jsonl.gz", mode="nope")


# ------------------------------------------------------------------------------------ review fixes


async def test_text_mode_file_objects_are_refused_before_any_io(tmp_path: Path) -> None:
    """Not only io.TextIOBase: a SpooledTemporaryFile in text mode is found by a probe that
    moves no data (read(0) gives str, write(b"") raises), as is a closed file object."""
    store = await _filled()
    for make in (tempfile.SpooledTemporaryFile, tempfile.TemporaryFile):
        with make(mode="w+") as text:
            with pytest.raises(InvalidArgumentError, match="binary file object"):
                await store.export_to(text)  # type: ignore[arg-type]
            assert text.tell() == 0
        with pytest.raises(InvalidArgumentError):
            await store.export_to(text)  # type: ignore[arg-type]  # closed now
    with tempfile.SpooledTemporaryFile(mode="w+") as text:
        text.write(_file(_GOOD).decode())
        text.seek(0)
        with pytest.raises(InvalidArgumentError, match="text mode"):
            await store.import_from(text)  # type: ignore[arg-type]
        assert text.read() == _file(_GOOD).decode()  # nothing consumed
    closed = io.BytesIO(_file(_GOOD))
    closed.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        await store.import_from(closed)
    target = await _target()
    before = await _state(target)
    with tempfile.SpooledTemporaryFile(mode="w+") as text, pytest.raises(InvalidArgumentError):
        await target.import_from(text)  # type: ignore[arg-type]
    assert await _state(target) == before


async def test_an_export_into_a_missing_directory_names_the_target(tmp_path: Path) -> None:
    store = await _filled()
    target = tmp_path / "no" / "such" / "dir" / "x.jsonl"
    with pytest.raises(FileNotFoundError) as caught:
        await store.export_to(target)
    assert caught.value.filename == str(target)
    assert ".tmp" not in str(caught.value) and str(target) in str(caught.value)
    assert list(tmp_path.iterdir()) == []


class SkewedDatetime(datetime):
    """``datetime`` whose ``now()`` runs :attr:`skew` seconds off the real clock (an
    application host with a wrong clock), put in place of the front end's ``datetime`` only:
    the backend keeps its own clock. (At module level: the check pass pickles what it
    parses, which may be of this class.)"""

    skew = 0.0

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(seconds=cls.skew)


def skew_front_end_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    monkeypatch.setattr(SkewedDatetime, "skew", seconds)
    monkeypatch.setattr(portability, "datetime", SkewedDatetime)


@pytest.mark.parametrize("skew", [-30, 30])
@pytest.mark.parametrize("mode", ["merge", "missing", "replace"])
async def test_a_skewed_client_clock_does_not_change_what_is_imported(
    monkeypatch: pytest.MonkeyPatch, skew: int, mode: str
) -> None:
    """Expiry is judged on the target's clock: with the application's clock 30 s ahead, an
    entry with 10 s left is still written (and a replace keeps its key); 30 s behind, an entry
    10 s past its expiry is still skipped."""
    now = datetime.now(timezone.utc)
    entries = [
        _entry("dead", "new", expires_at=format_time(now - timedelta(seconds=10))),
        _entry("live", "new", expires_at=format_time(now + timedelta(seconds=10))),
    ]
    store = InMemoryStore(namespace="dst")
    await store.set_many({"dead": "old", "live": "old", "other": "old"})
    skew_front_end_clock(monkeypatch, skew)
    report = await store.import_from(io.BytesIO(_file(entries)), mode=mode)
    assert report == ImportReport(
        written=0 if mode == "missing" else 1,
        skipped_expired=1,
        skipped_existing=1 if mode == "missing" else 0,
    )
    expected = {
        "merge": {"dead": "old", "live": "new", "other": "old"},
        "missing": {"dead": "old", "live": "old", "other": "old"},
        "replace": {"live": "new"},
    }[mode]
    assert await store.get_many(await store.keys()) == expected
    if mode != "missing":
        left = await store.ttl("live")
        assert left is not None and 5 < left <= 10


class _SlowReader:
    """A binary file object with only ``read``, each call taking ``delay`` seconds (a pipe
    whose producer is slow): it blocks whatever thread reads it."""

    def __init__(self, data: bytes, delay: float) -> None:
        self._data = io.BytesIO(data)
        self._delay = delay
        self.threads: set[int] = set()

    def read(self, size: int = -1) -> bytes:
        if size != 0:
            self.threads.add(threading.get_ident())
            time.sleep(self._delay)
        return self._data.read(size)


async def test_the_event_loop_keeps_running_while_a_large_import_is_checked() -> None:
    """The check pass runs off the event loop: a ticker keeps ticking while 40,000 lines are
    read from a slow pipe and checked (about 1.5 s of reading: on the loop it would stall for
    all of it), and progress still runs in the caller's thread."""
    source = InMemoryStore(namespace="src")
    await source.set_many({f"k{i:06d}": {"i": i, "pad": "x" * 20} for i in range(40_000)})
    data = await _export(source)
    reader = _SlowReader(data, 0.003)  # io.BufferedReader reads 8 KiB at a time
    reads = len(data) // 8192
    assert reads * 0.003 >= 1.0  # the pipe really takes a while
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    checked: list[int] = []
    progress_threads: set[int] = set()

    def progress(phase: str, done: int) -> None:
        progress_threads.add(threading.get_ident())
        if phase == "check":
            checked.append(done)

    store = InMemoryStore(namespace="dst")
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.monotonic()
    report = await store.import_from(cast(BinaryIO, reader), progress=progress)
    took = time.monotonic() - started
    stop.set()
    await task
    assert report == ImportReport(40_000, 0, 0)
    assert checked[-1] == 40_000 and len(checked) >= 40
    assert took >= 1.0
    # A loop held by the check would show one gap of about the whole check (over a second).
    # Relative to the import's own time, so that a busy machine starving the process for a
    # while (another test run beside this one) cannot fail it: every gap well under half of it.
    assert max(gaps) < took / 2, (max(gaps), took)
    assert len(gaps) >= 4, gaps
    assert threading.get_ident() not in reader.threads  # read off the loop
    assert progress_threads == {threading.get_ident()}  # progress in the caller's thread


async def test_a_cancelled_import_waits_for_the_check_step_and_writes_nothing() -> None:
    source = InMemoryStore(namespace="src")
    await source.set_many({f"k{i:05d}": i for i in range(5_000)})
    reader = _SlowReader(await _export(source), 0.002)
    store = InMemoryStore(namespace="dst")
    task = asyncio.create_task(store.import_from(cast(BinaryIO, reader)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.keys() == []
