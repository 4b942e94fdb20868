"""``fleetmem.copy_namespace`` on in-memory stores: the copy, its report, its modes, and its
verification catching a destination that did not keep what it was given (in-memory stores
whose import is deliberately broken). Copies between real backends are in
``tests/integration/test_copy_between_backends.py``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

import fleetmem
from fleetmem import (
    CopyReport,
    InMemoryStore,
    InvalidArgumentError,
    InvalidExportError,
    StoreClosedError,
    VerificationError,
    copy_namespace,
    portability,
)
from fleetmem.backends.memory.kv import InMemoryKV
from fleetmem.backends.seam import ImportOp, ImportTally
from fleetmem.portability import same_json


async def _source(count: int = 30) -> InMemoryStore:
    store = InMemoryStore(namespace="src")
    await store.set_many({f"k{i:02}": {"i": i, "big": 2**70 + i} for i in range(count)})
    await store.set("k03", "three", partition="p3")
    await store.set("k04", [1.5, True, None], ttl=3600)
    await store.set("ключ", "é")
    return store


async def _entries(store: InMemoryStore) -> list[tuple[str, Any, str, Any]]:
    out = []
    for key in await store.keys():
        entry = await store.get_entry(key)
        assert entry is not None
        out.append((entry.key, entry.value, entry.partition, entry.expires_at))
    return out


class _Broken(InMemoryKV):
    """An in-memory backend whose imports apply ``change`` to the ops first (``None`` drops
    one), and whose replace may leave other keys in place."""

    change: Callable[[ImportOp], ImportOp | None] = staticmethod(lambda op: op)
    deletes: bool = True

    async def import_batch(self, ops: list[ImportOp], missing_only: bool) -> ImportTally:
        changed = [c for c in map(type(self).change, ops) if c is not None]
        tally = await super().import_batch(changed, missing_only)
        return ImportTally(tally.written + len(ops) - len(changed), tally.expired, tally.existing)

    async def import_replace(self, pages: AsyncIterator[list[ImportOp]]) -> ImportTally:
        if self.deletes:
            return await super().import_replace(pages)
        written = 0
        async for page in pages:
            written += (await self.import_batch(page, False)).written
        return ImportTally(written, 0, 0)


def _broken(change: Callable[[ImportOp], ImportOp | None], deletes: bool = True) -> InMemoryStore:
    kind = type("Broken", (_Broken,), {"change": staticmethod(change), "deletes": deletes})
    return InMemoryStore.from_backend(kind(namespace="dst"))


def _drop(*keys: str) -> Callable[[ImportOp], ImportOp | None]:
    return lambda op: None if op.key in keys else op


# ------------------------------------------------------------------------------------ copies


async def test_a_copy_between_two_namespaces_of_one_store() -> None:
    src = await _source()
    dst = src.with_namespace("dst")
    await dst.set("other", 1)
    calls: list[tuple[str, int]] = []
    report = await copy_namespace(src, dst, progress=lambda p, d: calls.append((p, d)))
    assert report == CopyReport(copied=31, skipped_expired=0, verified=True)
    assert await _entries(dst) == sorted([*await _entries(src), ("other", 1, "default", None)])
    phases = [p for p, _ in calls]
    assert phases == sorted(phases, key=["export", "check", "import", "verify"].index)
    assert dict(calls) == {"export": 31, "check": 31, "import": 31, "verify": 31}
    assert await dst.get("k05") == {"i": 5, "big": 2**70 + 5}


async def test_replace_and_missing_copies() -> None:
    src = await _source()
    dst = src.with_namespace("dst")
    await dst.set("other", 1)
    await dst.set("k01", "mine", partition="mine")
    report = await copy_namespace(src, dst, mode="missing")
    assert report == CopyReport(copied=30, skipped_expired=0, verified=True)
    assert await dst.get("k01") == "mine"
    report = await copy_namespace(src, dst, mode="replace")
    assert report == CopyReport(copied=31, skipped_expired=0, verified=True)
    assert await _entries(dst) == await _entries(src)
    # A store onto itself changes nothing it can see.
    assert (await copy_namespace(src, src)).verified is True
    assert await _entries(dst) == await _entries(src)


async def test_without_verification_the_report_says_so() -> None:
    src = await _source()
    dst = _broken(_drop("k05"))
    assert await copy_namespace(src, dst, verify=False) == CopyReport(31, 0, False)
    assert await dst.exists("k05") is False


async def test_an_entry_that_expires_during_the_copy_is_skipped() -> None:
    src = await _source(3)
    await src.set("fleeting", 1, ttl=0.2)

    def slow_export(phase: str, done: int) -> None:
        if phase == "export":
            time.sleep(0.3)  # it expires between the export and the check

    dst = src.with_namespace("dst")
    report = await copy_namespace(src, dst, progress=slow_export)
    assert report == CopyReport(copied=6, skipped_expired=1, verified=True)
    assert await dst.exists("fleeting") is False


async def test_the_destination_rules_apply_and_nothing_is_written_on_a_bad_entry() -> None:
    src = await _source(3)
    await src.set("huge", "x" * 5000)
    dst = InMemoryStore(namespace="dst", max_value_bytes=1000)
    await dst.set("kept", 1)
    with pytest.raises(InvalidExportError, match="max_value_bytes") as caught:
        await copy_namespace(src, dst, mode="replace")
    assert caught.value.line == 2  # the header, then huge
    assert await dst.keys() == ["kept"]


async def test_arguments_are_checked_before_any_io() -> None:
    class _Untouchable(InMemoryKV):
        def export_pages(self, *args: Any) -> Any:
            raise AssertionError("read before the arguments were checked")

    src = InMemoryStore.from_backend(_Untouchable(namespace="src"))
    dst = InMemoryStore(namespace="dst")
    with pytest.raises(InvalidArgumentError, match="mode"):
        await copy_namespace(src, dst, mode="overwrite")
    with pytest.raises(InvalidArgumentError, match="verify"):
        await copy_namespace(src, dst, verify="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="progress"):
        await copy_namespace(src, dst, progress="bar")  # type: ignore[arg-type]
    await dst.close()
    with pytest.raises(StoreClosedError):
        await copy_namespace(src, dst)


# ------------------------------------------------------------------------------------ verification


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_drop("k05"), "missing"),
        (lambda op: op._replace(payload=b'"other"') if op.key == "k05" else op, "another value"),
        (lambda op: op._replace(payload=b"true") if op.key == "k05" else op, "another value"),
        (lambda op: op._replace(partition="elsewhere") if op.key == "k05" else op, "partition"),
        (
            lambda op: (
                op._replace(expires_at=op.expires_at + timedelta(milliseconds=5))
                if op.key == "k04" and op.expires_at is not None
                else op
            ),
            "expires_at",
        ),
        (
            lambda op: op._replace(expires_at=None) if op.key == "k04" else op,
            "expires_at",
        ),
    ],
)
async def test_verification_names_the_key_that_differs(
    change: Callable[[ImportOp], ImportOp | None], why: str
) -> None:
    src = await _source()
    if why != "expires_at":
        await src.set("k05", 1)
    dst = _broken(change)
    with pytest.raises(VerificationError) as caught:
        await copy_namespace(src, dst)
    key = "k04" if why == "expires_at" else "k05"
    assert caught.value.keys == [key]
    assert repr(key) in str(caught.value) and why in str(caught.value)
    assert isinstance(caught.value, fleetmem.FleetmemError)


async def test_verification_forgives_what_json_and_a_millisecond_cannot_tell() -> None:
    src = await _source()
    await src.set("k05", 1)
    await src.set("k06", {"a": [1, 2.0], "b": {"c": 3}})

    def change(op: ImportOp) -> ImportOp:
        if op.key == "k05":
            return op._replace(payload=b"1.0")
        if op.key == "k06":
            return op._replace(payload=b'{"b":{"c":3.0},"a":[1.0,2]}')
        if op.key == "k04" and op.expires_at is not None:
            return op._replace(expires_at=op.expires_at - timedelta(microseconds=900))
        return op

    assert (await copy_namespace(src, _broken(change))).verified is True


async def test_verification_names_the_first_ten_keys_in_order() -> None:
    src = await _source()
    odd = {f"k{i:02}" for i in range(30) if i % 2}
    with pytest.raises(VerificationError) as caught:
        await copy_namespace(src, _broken(_drop(*odd)))
    assert caught.value.keys == sorted(odd)[:10]


async def test_a_replace_verifies_that_nothing_else_is_left() -> None:
    src = await _source(5)
    dst = _broken(lambda op: op, deletes=False)
    await dst.set("a-extra", 1)
    await dst.set("k02x", 1)
    await dst.set("zz-extra", 1)
    with pytest.raises(VerificationError) as caught:
        await copy_namespace(src, dst, mode="replace")
    assert caught.value.keys == ["a-extra", "k02x", "zz-extra"]
    assert "not in the source" in str(caught.value)
    # A merge leaves them by design.
    assert (await copy_namespace(src, dst)).verified is True


async def test_a_missing_copy_checks_only_presence_of_the_keys_it_kept() -> None:
    src = await _source(5)
    dst = _broken(lambda op: op._replace(payload=b'"wrong"') if op.key == "k03" else op)
    await dst.set("k01", "mine", partition="mine")
    await dst.set("k03", "mine too")
    report = await copy_namespace(src, dst, mode="missing")
    assert report == CopyReport(copied=4, skipped_expired=0, verified=True)
    assert await dst.get("k01") == "mine"
    # A key it did not have must arrive as exported.
    fresh = _broken(lambda op: op._replace(payload=b'"wrong"') if op.key == "k03" else op)
    with pytest.raises(VerificationError) as caught:
        await copy_namespace(src, fresh, mode="missing")
    assert caught.value.keys == ["k03"]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (1, 1.0, True),
        (True, 1, False),
        (False, 0, False),
        (True, True, True),
        (None, None, True),
        ({"a": 1, "b": [1, 2]}, {"b": [1.0, 2], "a": 1}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ([1, [True]], [1, [1]], False),
        (2**80, 2**80, True),
        (2**80, 2**80 + 1, False),
        ([2**80], [float(2**80)], True),
        ("1", 1, False),
        ([], {}, False),
    ],
)
def test_json_equality(a: Any, b: Any, same: bool) -> None:
    assert same_json(a, b) is same
    assert same_json(b, a) is same


class SkewedDatetime(datetime):
    """``datetime`` whose ``now()`` runs :attr:`skew` seconds off the real clock, put in place
    of the front end's only (module level: the check pass pickles what it parses)."""

    skew = 0.0

    @classmethod
    def now(cls, tz: Any = None) -> Any:
        return datetime.now(tz) + timedelta(seconds=cls.skew)


@pytest.mark.parametrize("skew", [-30, 30])
async def test_verification_judges_expiry_on_the_destination_clock(
    monkeypatch: pytest.MonkeyPatch, skew: int
) -> None:
    """The application's clock 30 s off the destination's: an entry copied correctly that has
    expired on the destination before it is compared is excused (not "missing"), and one with
    time left is written and compared."""
    src = await _source(3)
    await src.set("fleeting", 1, ttl=0.3)
    await src.set("lasting", 2, ttl=20)
    monkeypatch.setattr(SkewedDatetime, "skew", skew)
    monkeypatch.setattr(portability, "datetime", SkewedDatetime)

    def slow_import(phase: str, done: int) -> None:
        if phase == "import":
            time.sleep(0.4)  # "fleeting" expires after it is written, before it is compared

    dst = src.with_namespace("dst")
    report = await copy_namespace(src, dst, progress=slow_import)
    assert report.verified and report.copied + report.skipped_expired == 8
    assert await dst.exists("fleeting") is False
    lasting = await dst.get_entry("lasting")
    source = await src.get_entry("lasting")
    assert lasting is not None and source is not None
    assert lasting.expires_at == source.expires_at
