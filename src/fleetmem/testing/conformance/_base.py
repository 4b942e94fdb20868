"""Shared tolerances, capabilities and helpers of the conformance suite."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fleetmem.protocol import MemoryStore

#: Keys every method must refuse with ``InvalidKeyError`` (a ``ValueError``).
BAD_KEYS: list[Any] = [
    "",
    "a" * 1025,
    "\u00e9" * 512 + "a",  # 1025 UTF-8 bytes, 513 characters
    "\U0001f600" * 256 + "a",  # 1025 UTF-8 bytes, 257 characters
    "\x00",
    "a\x00b",
    "a\x01",
    "a\x1fb",
    "\x7f",
    "line\nbreak",
    "tab\tkey",
    "\ud800",
    "a\udfffb",
    1,
    None,
    b"bytes",
    1.5,
    ("a",),
]

#: Keys every backend must accept and return unchanged.
GOOD_KEYS: list[str] = [
    "a" * 1024,
    "\u00e9" * 512,  # 1024 UTF-8 bytes
    "\U0001f600" * 256,  # 1024 UTF-8 bytes
    "\u20ac" * 341 + "a",  # 1024 UTF-8 bytes
    "* ? [ ] \\ % _ { } :",
    " ",
    "a b",
    "\u0085\u00a0\u2028",  # not control characters in the contract's sense
    "user:42/session/{x}",
    "\ufeff\uffff",
]

#: Partitions refused (besides the bad keys): over 255 UTF-8 bytes.
BAD_PARTITIONS: list[Any] = [
    *(key for key in BAD_KEYS if key is not None),  # partition=None means "keep"
    "p" * 256,
    "\u00e9" * 128,  # 256 bytes
]
GOOD_PARTITIONS: list[str] = ["p" * 255, "\u00e9" * 127 + "a", "agent:7/run {1}"]

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def nested_list(levels: int) -> Any:
    """A value of ``levels`` nested lists around ``1``."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def nested_dict(levels: int) -> Any:
    """A value of ``levels`` nested dicts around ``1``."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def assert_same_json(actual: Any, expected: Any, where: str = "value") -> None:
    """Assert ``actual`` equals ``json.loads(json.dumps(expected))`` as JSON.

    An integer stays an integer of the same value, a float comes back as a number of the same
    value (an integral one may be an ``int``), a ``bool`` stays a ``bool``, a tuple is a list.
    """
    if expected is None:
        assert actual is None, f"{where}: expected null, got {actual!r}"
    elif isinstance(expected, bool):
        assert type(actual) is bool, f"{where}: expected a bool, got {actual!r}"
        assert actual is expected, f"{where}: expected {expected!r}, got {actual!r}"
    elif isinstance(expected, int):
        assert type(actual) is int, f"{where}: expected an int, got {actual!r}"
        assert actual == expected, f"{where}: expected {expected!r}, got {actual!r}"
    elif isinstance(expected, float):
        assert type(actual) in (int, float), f"{where}: expected a number, got {actual!r}"
        assert float(actual) == expected, f"{where}: expected {expected!r}, got {actual!r}"
    elif isinstance(expected, str):
        assert type(actual) is str, f"{where}: expected a str, got {actual!r}"
        assert actual == expected, f"{where}: expected {expected!r}, got {actual!r}"
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is list, f"{where}: expected a list, got {actual!r}"
        assert len(actual) == len(expected), f"{where}: expected {expected!r}, got {actual!r}"
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same_json(got, want, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert type(actual) is dict, f"{where}: expected a dict, got {actual!r}"
        assert set(actual) == set(expected), f"{where}: keys {set(actual)} != {set(expected)}"
        for key, want in expected.items():
            assert_same_json(actual[key], want, f"{where}[{key!r}]")
    else:  # pragma: no cover - a bug in the suite
        raise AssertionError(f"{where}: unexpected expected value {expected!r}")


def assert_utc(moment: object, what: str = "datetime") -> datetime:
    """Assert ``moment`` is a timezone-aware UTC ``datetime`` and return it."""
    assert isinstance(moment, datetime), f"{what} is not a datetime: {moment!r}"
    assert moment.tzinfo is not None, f"{what} is naive: {moment!r}"
    assert moment.utcoffset() == timedelta(0), f"{what} is not UTC: {moment!r}"
    return moment


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ConformanceBase:
    """Tolerances, capabilities and helpers shared by the conformance mixins."""

    ttl_slack: float = 0.05
    expiry_ttl: float = 0.2
    clock_skew: float = 5.0
    max_value_bytes: int = 8 * 1024 * 1024
    exact_expiry_accounting: bool = True
    pathological_pattern_seconds: float = 2.0
    concurrency: int = 50

    async def wait_for_expiry(self) -> None:
        """Sleep until entries written with ``expiry_ttl`` before the call have expired."""
        await asyncio.sleep(self.expiry_ttl + 0.15 + self.ttl_slack)

    def require_exact_expiry_accounting(self) -> None:
        if not self.exact_expiry_accounting:
            pytest.skip("exact_expiry_accounting is off for this store")

    @contextlib.asynccontextmanager
    async def sibling_namespaces(
        self, store: MemoryStore, *suffixes: str
    ) -> AsyncIterator[list[MemoryStore]]:
        """Views on namespaces named ``store.namespace + suffix``, cleared and closed after."""
        names = [store.namespace + suffix for suffix in suffixes]
        if any(_NAMESPACE_RE.fullmatch(name) is None for name in names):
            pytest.skip("the fixture's namespace is too long to derive sibling namespaces")
        views = [store.with_namespace(name) for name in names]
        try:
            yield views
        finally:
            for view in views:
                if not view.closed:
                    await view.clear()
                    await view.close()


async def raises_each(
    error: type[BaseException], calls: list[tuple[str, Callable[[], Awaitable[object]]]]
) -> None:
    """Assert every call raises ``error`` (the message names the call that did not)."""
    for name, call in calls:
        try:
            result = await call()
        except error:
            continue
        except Exception as exc:  # pragma: no cover - reported as a failure
            raise AssertionError(
                f"{name} raised {type(exc).__name__}: {exc}, expected {error.__name__}"
            ) from exc
        raise AssertionError(f"{name} returned {result!r}, expected {error.__name__}")
