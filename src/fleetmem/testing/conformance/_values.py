"""Values: what round-trips, what is refused, and the size limit."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pytest

from fleetmem.errors import FleetmemError, SerializationError, ValueTooLargeError
from fleetmem.protocol import MemoryStore
from fleetmem.testing.conformance._base import (
    ConformanceBase,
    assert_same_json,
    nested_dict,
    nested_list,
)

#: Values every backend stores and returns equal as JSON.
ROUND_TRIP_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**64,
    2**100,
    -(2**100),
    10**40,
    0.1,
    -2.5,
    1e300,
    -1e300,
    1e-300,
    5e-324,
    1.7976931348623157e308,
    2.0,
    -0.0,
    "",
    "plain",
    "unicode \u00e9 \U0001f600 \u4e2d\u6587",
    'quotes " and \\ backslash / slash',
    "\x01\x1f\x7f\u2028\u2029 control characters are fine in values",
    "\ud7ff\ue000\ufeff\uffff",
    "  padded  ",
    "null",
    "123",
    "12345678901234567890123456789",
    "x" * 10_000,
    [],
    {},
    [1, "a", None, True, 1.5, [], {}],
    (1, 2, (3, 4)),
    {"a": 1, "b": [1, {"c": None}], "": "empty key", "\u00e9\U0001f600": "unicode key"},
    {"1": "digit key", "true": True, "false": False, "null": None},
    {"big": 2**100, "list": [2**64, -(2**65), 1e300], "bool": [True, False]},
    nested_list(64),
    nested_dict(64),
]


class _Opaque:
    pass


#: Values refused with ``SerializationError`` (a ``TypeError``) before any I/O.
REFUSED_VALUES: list[Any] = [
    {1, 2},
    frozenset(),
    b"bytes",
    bytearray(b"x"),
    dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    dt.date(2024, 1, 1),
    decimal.Decimal("1.5"),
    _Opaque(),
    object(),
    1j,
    {1: "int key"},
    {None: "None key"},
    {("a",): "tuple key"},
    {"nested": {2: "int key"}},
    float("nan"),
    float("inf"),
    float("-inf"),
    [1.0, float("nan")],
    {"x": float("inf")},
    nested_list(65),
    nested_dict(65),
    [nested_dict(64)],
    "\x00",
    "a\x00b",
    ["fine", "bad\x00"],
    {"key\x00": 1},
    {"nested": {"\x00": 1}},
    # More digits than Python converts to and from text (sys.get_int_max_str_digits(), 4300).
    10**5000,
    {"n": [-(10**5000)]},
]


class ValueConformance(ConformanceBase):
    """The value rules of the contract."""

    async def test_json_values_round_trip(self, store: MemoryStore) -> None:
        keys = [f"v{i:02d}" for i in range(len(ROUND_TRIP_VALUES))]
        for key, value in zip(keys, ROUND_TRIP_VALUES, strict=True):
            entry = await store.set(key, value)
            assert_same_json(entry.value, value, f"set({key}).value")
        many = await store.get_many(keys)
        assert list(many) == keys
        for key, value in zip(keys, ROUND_TRIP_VALUES, strict=True):
            assert_same_json(await store.get(key, "missing"), value, f"get({key})")
            assert_same_json(many[key], value, f"get_many[{key}]")
            stored = await store.get_entry(key)
            assert stored is not None
            assert_same_json(stored.value, value, f"get_entry({key}).value")
        found = await store.search("v*")
        assert list(found) == keys
        for key, value in zip(keys, ROUND_TRIP_VALUES, strict=True):
            assert_same_json(found[key], value, f"search[{key}]")

    async def test_true_stays_bool(self, store: MemoryStore) -> None:
        await store.set("t", True)
        await store.set("l", [True, 1, False, 0])
        await store.set_many({"m": True})
        assert await store.get("t") is True
        got = await store.get("l")
        assert [type(v) for v in got] == [bool, int, bool, int]
        assert await store.get("m") is True

    async def test_refused_values_write_nothing(self, store: MemoryStore) -> None:
        await store.set("kept", "original")
        for value in REFUSED_VALUES:
            try:
                label = repr(value)[:60]
            except ValueError:  # an int too long for repr()
                label = "a huge int"
            with pytest.raises(SerializationError):
                await store.set("new", value)
            with pytest.raises(SerializationError):
                await store.set("kept", value)
            with pytest.raises(SerializationError):
                await store.set_many({"a": 1, "b": value, "c": 3})
            with pytest.raises(SerializationError):
                await store.set_if_absent("new", value)
            with pytest.raises(SerializationError):
                await store.compare_and_set("kept", value, version=1)
            with pytest.raises(SerializationError):
                await store.compare_and_set("new", value, version=0)
            assert await store.keys() == ["kept"], label
        entry = await store.get_entry("kept")
        assert entry is not None
        assert (entry.value, entry.version) == ("original", 1)
        assert issubclass(SerializationError, TypeError)
        assert issubclass(SerializationError, FleetmemError)

    async def test_nesting_limit_is_64_levels(self, store: MemoryStore) -> None:
        await store.set("list64", nested_list(64))
        await store.set("dict64", nested_dict(64))
        assert_same_json(await store.get("list64"), nested_list(64))
        assert_same_json(await store.get("dict64"), nested_dict(64))
        with pytest.raises(SerializationError):
            await store.set("list65", nested_list(65))
        with pytest.raises(SerializationError):
            await store.set("dict65", {"k": nested_list(64)})
        assert await store.keys() == ["dict64", "list64"]

    async def test_value_over_max_value_bytes_is_refused(self, store: MemoryStore) -> None:
        limit = self.max_value_bytes
        too_big = "x" * (limit - 1)  # with its quotes: limit + 1 bytes
        wide = "\u00e9" * (limit // 2)  # fewer characters than the limit, more bytes
        await store.set("kept", "original")
        for value in (too_big, wide, [too_big]):
            with pytest.raises(ValueTooLargeError) as info:
                await store.set("kept", value)
            assert isinstance(info.value, SerializationError)
            assert isinstance(info.value, TypeError)
            with pytest.raises(ValueTooLargeError):
                await store.set("new", value)
            with pytest.raises(ValueTooLargeError):
                await store.set_many({"a": 1, "new": value})
            with pytest.raises(ValueTooLargeError):
                await store.set_if_absent("new", value)
            with pytest.raises(ValueTooLargeError):
                await store.compare_and_set("kept", value, version=1)
        assert await store.keys() == ["kept"]
        entry = await store.get_entry("kept")
        assert entry is not None and (entry.value, entry.version) == ("original", 1)
        # Exactly at the limit is accepted.
        exact = "y" * (limit - 2)
        await store.set("exact", exact)
        got = await store.get("exact")
        assert isinstance(got, str) and len(got) == limit - 2 and got == exact
        await store.delete("exact")
