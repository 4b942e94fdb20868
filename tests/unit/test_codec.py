"""Unit tests of ``fleetmem._codec``: the value rules of the contract, without a store."""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import enum
import json
from typing import Any

import orjson
import pytest

from fleetmem._codec import (
    DEFAULT_MAX_VALUE_BYTES,
    MAX_DEPTH,
    decode_value,
    decode_value_after_byte,
    encode_value,
)
from fleetmem.errors import FleetmemError, SerializationError, ValueTooLargeError


def nested(levels: int, kind: str = "list") -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value] if kind == "list" else {"k": value}
    return value


class _Color(enum.IntEnum):
    RED = 3


class _Text(str):
    pass


class _Number(float):
    pass


ROUND_TRIP: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    2**100,
    -(10**40),
    0.1,
    1e300,
    5e-324,
    -0.0,
    "",
    "\u00e9\U0001f600\u2028",
    "12345678901234567890123",
    [],
    {},
    [1, "a", None, True, [2**70, {"x": -(2**70)}]],
    {"a": {"b": [1.5, "c"]}, "": 0},
    nested(MAX_DEPTH),
    nested(MAX_DEPTH, "dict"),
]


@pytest.mark.parametrize("value", ROUND_TRIP, ids=repr)
def test_round_trip_matches_the_standard_library(value: Any) -> None:
    data = encode_value(value)
    assert isinstance(data, bytes)
    decoded = decode_value(data)
    expected = json.loads(json.dumps(value))
    assert decoded == expected
    assert json.dumps(decoded) == json.dumps(expected)  # same types: True stays true, ints stay
    assert decode_value(data.decode("utf-8")) == expected
    assert decode_value(bytearray(data)) == expected
    assert decode_value(memoryview(data)) == expected


def test_encoding_is_compact_utf8() -> None:
    assert encode_value({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}'
    assert encode_value("\u00e9") == '"\u00e9"'.encode()
    assert encode_value((1, (2,))) == b"[1,[2]]"
    assert encode_value(True) == b"true"
    assert encode_value([2**64, "\u00e9"]) == '[18446744073709551616,"\u00e9"]'.encode()


def test_big_integers_are_exact_both_ways() -> None:
    for number in (2**64, -(2**63) - 1, 2**200, -(10**50)):
        data = encode_value({"n": [number]})
        assert data == f'{{"n":[{number}]}}'.encode()
        assert decode_value(data) == {"n": [number]}
    # orjson would read these as floats.
    assert decode_value(b"123456789012345678901234567890") == 123456789012345678901234567890
    assert decode_value("-99999999999999999999") == -99999999999999999999
    value = decode_value(b'["1234567890123456789012", 1.2345678901234567891]')
    assert value == ["1234567890123456789012", 1.2345678901234567891]
    assert decode_value(b"1e300") == 1e300


def test_a_big_integer_is_found_among_many_digits() -> None:
    # Over 19 digits in all but no run of 19: orjson reads it. A run of 20 among them: exact.
    many = [1234567890, 123456789, 98765, 4321]
    assert decode_value(orjson.dumps(many)) == many
    big = [*many, 2**64 + 1]
    data = encode_value(big)
    for decoded in (
        decode_value(data),
        decode_value(data.decode()),
        decode_value_after_byte(b"\x01" + data),
    ):
        assert decoded == big
        assert type(decoded[-1]) is int
    assert decode_value_after_byte(b"\x01" + orjson.dumps(many)) == many


def test_subclasses_are_their_base_type() -> None:
    assert encode_value(_Color.RED) == b"3"
    assert encode_value({"c": _Color.RED}) == b'{"c":3}'
    assert encode_value(_Text("x")) == b'"x"'
    assert encode_value(collections.OrderedDict(a=1)) == b'{"a":1}'
    assert encode_value(_Number(1.5)) == b"1.5"
    assert encode_value({_Text("k"): 1}) == b'{"k":1}'
    assert encode_value({_Text("k"): 2**64}) == b'{"k":18446744073709551616}'
    with pytest.raises(SerializationError):
        encode_value(_Number("nan"))
    with pytest.raises(SerializationError):
        encode_value({_Text("k\x00"): 1})


class _Opaque:
    def __repr__(self) -> str:
        # The test id: the default repr holds an address, which differs between xdist workers.
        return "_Opaque()"


REFUSED: list[Any] = [
    {1, 2},
    b"bytes",
    bytearray(b"x"),
    dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    decimal.Decimal("1"),
    _Opaque(),
    1j,
    {1: 2},
    {None: 2},
    {1: 2**64},
    {"a": {(1,): 2}},
    float("nan"),
    float("inf"),
    float("-inf"),
    [float("nan"), 2**64],
    nested(MAX_DEPTH + 1),
    nested(MAX_DEPTH + 1, "dict"),
    [nested(MAX_DEPTH + 1), 2**64],
    "\x00",
    ["a\x00"],
    {"k\x00": 1},
    {"k\x00": 2**64},
    "\ud800",
    ["\udfff", 2**64],
    {"\ud800": 1},
]


@pytest.mark.parametrize("value", REFUSED, ids=repr)
def test_refused_values(value: Any) -> None:
    with pytest.raises(SerializationError) as info:
        encode_value(value)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, FleetmemError)
    assert type(info.value) is SerializationError


def test_size_limit_is_on_encoded_bytes() -> None:
    assert DEFAULT_MAX_VALUE_BYTES == 8 * 1024 * 1024
    assert encode_value("x" * 8, max_bytes=10) == b'"xxxxxxxx"'
    with pytest.raises(ValueTooLargeError) as info:
        encode_value("x" * 9, max_bytes=10)
    assert isinstance(info.value, SerializationError)
    assert "10" in str(info.value)
    with pytest.raises(ValueTooLargeError):
        encode_value("\u00e9" * 5, max_bytes=10)  # 5 characters, 12 bytes
    with pytest.raises(ValueTooLargeError):
        encode_value([2**64], max_bytes=10)  # the stdlib path checks the size too
    assert encode_value([2**64], max_bytes=22) == b"[18446744073709551616]"
    data = encode_value("y" * (DEFAULT_MAX_VALUE_BYTES - 2))
    assert len(data) == DEFAULT_MAX_VALUE_BYTES
    with pytest.raises(ValueTooLargeError):
        encode_value("y" * (DEFAULT_MAX_VALUE_BYTES - 1))


def test_depth_limit_counts_containers() -> None:
    encode_value(nested(MAX_DEPTH))
    encode_value([[[nested(MAX_DEPTH - 3, "dict")]]])
    with pytest.raises(SerializationError, match="64"):
        encode_value([[[nested(MAX_DEPTH - 2, "dict")]]])


def test_encoded_payloads_cost_their_length_not_the_encoders_buffer() -> None:
    """A batch or the in-memory store holds many payloads: each must cost about its length."""
    import tracemalloc

    values = [{"agent": f"a-{i}", "notes": "x" * 150} for i in range(1000)] + ["y" * 5000] * 100
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode_value(v) for v in values]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    payload_bytes = sum(len(p) for p in kept)
    overhead = 40 + 8  # a bytes object's header, a list slot
    assert held < payload_bytes + overhead * len(kept) + 64 * 1024, (held, payload_bytes)
