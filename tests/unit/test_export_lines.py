"""An export's lines written straight from Redis ``scan`` replies
(:func:`fleetmem.backends.redis.entries.export_lines`, behind ``RedisKV.export_lines``) are byte
for byte the lines of the path through ``Entry`` objects (``parse_entry`` then
``portability._entry_line``), and the seam's default ``KVBackend.export_lines`` is that path.

The replies are built here as the scan script answers them (``key, entry string, PEXPIRETIME``
triples; the entry string as ``lua/kv/_lib.lua`` writes it: the 19-byte header, the partition
name, the stored JSON as ``encode_value`` + ``mark_payload`` make it, or as ``incr`` writes a
number); the same against a Redis server is in ``tests/integration/test_redis_export_lines.py``.
"""

from __future__ import annotations

import contextlib
import string
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetmem import InMemoryStore
from fleetmem._codec import encode_value
from fleetmem.backends.redis.entries import export_lines, mark_payload, parse_entry, verbatim_json
from fleetmem.portability import _entry_line
from fleetmem.protocol import Entry

#: 9999-12-31T23:59:59.999Z, the far end of an expiry an import may carry.
YEAR_9999_MS = 253402300799999
NOW_MS = 1_765_000_000_123

VALUES: list[Any] = [
    {"agent": "agent-0042", "state": "running", "step": 17, "score": 0.8734},
    {"tags": ["plan", "search"], "note": "x" * 96, "ok": True, "none": None},
    {"nested": {"a": [1, [2, {"b": [3.5, {"c": {}}]}]], "empty": [], "e": {}}},
    2**64,
    2**64 - 1,
    2**63 - 1,
    -(2**63),
    -(2**63) - 1,
    2**200,
    [2**70, -(2**65), 1],
    {"big": 10**30, "small": 7},
    12345678901234567,
    [12345678901234567, 123456789012345678],
    1,
    0,
    -5,
    1.0,
    -0.0,
    0.1,
    5e-324,
    -5e-324,
    1e-7,
    1.7976931348623157e308,
    1e16,
    -1e16,
    1e15,
    9999999999999998.0,
    1e300,
    0.30000000000000004,
    123456789012345.6,
    [1.0, 1e16, -0.0, 5e-324, 1e22, 2.5e-8],
    {"f": 1e16, "g": 1e-16, "h": 1e15},
    "",
    "plain",
    'quote " backslash \\ slash /',
    "tab\t newline\n cr\r bell\x07 unit\x1f del\x7f",
    "é ü ß 中文 ключ 🙂 \u2028 \u2029 \ufeff",
    "1" * 17,
    "1" * 19,
    "digits 12345678901234567 in text",
    {"é": "ключ", "🙂": ["\u2028", "\\u0041"], "\x01": "x"},
    True,
    False,
    None,
    [],
    {},
    [[[[[[[[[[]]]]]]]]]],
]

KEYS = [
    "k",
    "é",
    "ключ",
    "🔑",
    'q"uote',
    "back\\slash",
    "tab\tkey",
    "ctl\x01\x1f",
    "del\x7f",
    "\u2028line",
    "a b",
    "{tag}",
]

PARTITIONS = ["default", "p", "раздел", 'p"q', "p\\q", "🙂"]

#: (created, updated, expires) in ms since the epoch; expires < 0: none.
TIMES = [
    (NOW_MS, NOW_MS, -1),
    (NOW_MS, NOW_MS + 1, NOW_MS + 3_600_000),
    (1_765_000_000_000, 1_765_000_000_000, 1_765_000_060_000),  # zero milliseconds
    (1_765_000_020_000, 1_765_000_021_001, 1_765_000_080_010),
    (0, 0, 0),  # the epoch
    (1, 999, 1000),
    (2**42 - 1, 2**42, 2**42 + 1),  # where utc_from_ms leaves its float path
    (2**33 * 1000 - 1, 2**33 * 1000, 2**33 * 1000 + 1),  # where ms_datetime does
    (NOW_MS, NOW_MS, YEAR_9999_MS),
    (NOW_MS, NOW_MS, 253402300799000),  # 9999-12-31T23:59:59.000Z
    (NOW_MS, NOW_MS, 4_102_444_800_000),  # 2100-01-01, a far future
    (951_782_400_000, 951_868_799_999, -2),  # 2000-02-29, and "no key" as no expiry
]

#: What ``incr`` stores (a bare number formatted by Lua, ``lua/kv/incr.lua``).
INCR_PAYLOADS = [
    b"1e+15",
    b"1e+20",
    b"1.5e-05",
    b"0.10000000000000001",
    b"100.0",
    b"-3",
    b"42",
    b"9223372036854775807",
    b"-0.0",
]


def entry_string(version: int, created: int, updated: int, partition: str, payload: bytes) -> bytes:
    """An entry string as ``lua/kv/_lib.lua`` writes it (``payload`` already marked)."""
    name = b"" if partition == "default" else partition.encode()
    return (
        bytes([len(name)])
        + version.to_bytes(6, "big")
        + created.to_bytes(6, "big")
        + updated.to_bytes(6, "big")
        + name
        + payload
    )


def stored(value: Any) -> bytes:
    """The stored JSON of a value, as every write but ``incr`` stores it."""
    return mark_payload(encode_value(value))


class Renderer:
    """``_entry_line``, counting its calls (the entries the fast path handed over)."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, entry: Entry) -> bytes:
        self.keys.append(entry.key)
        return _entry_line(entry)


def slow_lines(flat: list[Any]) -> bytes:
    """The lines of a reply through ``Entry`` objects: what ``export_pages`` + the writer
    produce (``parse_entries`` is ``parse_entry`` inlined)."""
    out = bytearray()
    for i in range(1, len(flat), 3):
        out += _entry_line(parse_entry(flat[i].decode(), flat[i + 1], flat[i + 2]))
    return bytes(out)


def fast_lines(flat: list[Any], times: dict[int, bytes] | None = None) -> tuple[list[str], bytes]:
    keys: list[str] = []
    out = bytearray()
    export_lines(flat, 1, keys, out, _entry_line, {} if times is None else times)
    return keys, bytes(out)


def reply(triples: list[tuple[str, bytes, int]]) -> list[Any]:
    flat: list[Any] = [b""]
    for key, raw, expires in triples:
        flat += [key.encode(), raw, expires]
    return flat


def variety() -> list[tuple[str, bytes, int]]:
    """Every value, key, partition and time above, combined (keys ascending)."""
    triples = []
    payloads = [stored(v) for v in VALUES] + INCR_PAYLOADS
    n = 0
    for i, payload in enumerate(payloads):
        for j, (created, updated, expires) in enumerate(TIMES):
            key = f"{KEYS[(i + j) % len(KEYS)]}-{n:06d}"
            partition = PARTITIONS[(i * 7 + j) % len(PARTITIONS)]
            version = [1, 2, 255, 2**32, 2**47 - 1][(i + j) % 5]
            raw = entry_string(version, created, updated, partition, payload)
            triples.append((key, raw, expires))
            n += 1
    return sorted(triples)


# ------------------------------------------------------------------------------------ tests


def test_every_line_is_the_entry_path_s_byte_for_byte() -> None:
    triples = variety()
    for triple in triples:  # one at a time: a difference names its entry
        flat = reply([triple])
        assert fast_lines(flat)[1] == slow_lines(flat), triple
    flat = reply(triples)  # and as one reply, the time caches shared by the entries
    keys, lines = fast_lines(flat)
    assert keys == [key for key, _, _ in triples]
    assert lines == slow_lines(flat)
    assert lines.count(b"\n") == len(triples)


def test_times_are_written_as_the_writer_writes_datetimes() -> None:
    cases = {
        0: "1970-01-01T00:00:00.000000Z",
        1_765_000_000_000: "2025-12-06T05:46:40.000000Z",
        1_765_000_000_007: "2025-12-06T05:46:40.007000Z",
        1_765_000_000_120: "2025-12-06T05:46:40.120000Z",
        YEAR_9999_MS: "9999-12-31T23:59:59.999000Z",
    }
    for ms, text in cases.items():
        raw = entry_string(3, ms, ms, "default", b"{}")
        _, line = fast_lines(reply([("k", raw, ms)]))
        record = orjson.loads(line)
        assert record["created_at"] == record["updated_at"] == record["expires_at"] == text
    # A cache shared across replies (as RedisKV.export_lines shares it) changes nothing.
    times: dict[int, bytes] = {}
    flat = reply(variety())
    assert fast_lines(flat, times)[1] == fast_lines(flat, times)[1] == slow_lines(flat)
    assert times


def test_only_values_orjson_might_write_otherwise_take_the_entry_path() -> None:
    """The fast path really writes the ordinary entries (the test above would pass if every
    entry went through ``render``); the others are handed to ``render``."""
    plain = [
        VALUES[0],
        VALUES[1],
        VALUES[2],
        "é ü ß 中文 ключ 🙂 \u2028",
        "tab\t\x1f\x7f",
        True,
        None,
        [],
        {"f": 0.1, "g": -0.0, "h": 5e-324, "i": 1e15, "j": 1e-7},
    ]
    special = [1, -5, 1.0, 2**64, 2**200, [2**70], 1e16, [1e16], {"x": 1e300}, "1" * 19]
    triples = []
    for i, value in enumerate(plain + special):
        triples.append((f"k{i:03d}", entry_string(1, NOW_MS, NOW_MS, "p", stored(value)), -1))
    for i, payload in enumerate(INCR_PAYLOADS):
        triples.append((f"n{i:03d}", entry_string(1, NOW_MS, NOW_MS, "p", payload), -1))
    flat = reply(triples)
    render = Renderer()
    keys: list[str] = []
    out = bytearray()
    export_lines(flat, 1, keys, out, render, {})
    assert bytes(out) == slow_lines(flat)
    handed = {f"k{i:03d}" for i in range(len(plain), len(plain) + len(special))}
    handed |= {f"n{i:03d}" for i in range(len(INCR_PAYLOADS))}
    assert set(render.keys) == handed


def test_verbatim_json_answers_true_only_for_orjson_s_own_form() -> None:
    payloads = [stored(v) for v in VALUES] + INCR_PAYLOADS
    for payload in payloads:
        if verbatim_json(payload):
            assert orjson.dumps(orjson.loads(payload)) == payload, payload
    assert verbatim_json(stored(VALUES[0]))
    assert not verbatim_json(stored(1e16))  # 10000000000000000.0, orjson writes 1e16
    assert not verbatim_json(stored([1e16]))
    assert not verbatim_json(stored({"n": 2**64}))  # "!"-marked
    assert not verbatim_json(b"1e+15")  # incr's
    assert not verbatim_json(b"")


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(
                alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                max_size=5,
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_keys = st.text(
    alphabet=st.sampled_from(string.printable + "é🙂\x01\x1f\u2028"), min_size=1, max_size=12
)
_ms = st.integers(min_value=0, max_value=YEAR_9999_MS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(_keys, _json, st.sampled_from(PARTITIONS), _ms, _ms, _ms | st.just(-1)),
        min_size=1,
        max_size=8,
        unique_by=lambda t: t[0],
    )
)
def test_any_entry_is_written_as_the_entry_path_writes_it(
    entries: list[tuple[str, Any, str, int, int, int]],
) -> None:
    triples = sorted(
        (key, entry_string(7, created, updated, partition, stored(value)), expires)
        for key, value, partition, created, updated, expires in entries
    )
    flat = reply(triples)
    assert fast_lines(flat)[1] == slow_lines(flat)


async def test_the_seam_s_default_renders_export_pages() -> None:
    store = InMemoryStore(namespace="lines")
    await store.set_many({f"k{i:03d}": {"i": i, "big": 2**70 + i} for i in range(25)})
    await store.set("p", [1e16, -0.0], partition="part", ttl=60)
    kv = store.kv
    got: list[tuple[list[str], bytes]] = []
    with_render = Renderer()
    async with contextlib.aclosing(kv.export_lines("k", None, 10, with_render)) as pages:
        async for keys, blob in pages:
            got.append((keys, bytes(blob)))
    want = []
    async with contextlib.aclosing(kv.export_pages("k", None, 10)) as entries:
        async for page in entries:
            want.append(([e.key for e in page], b"".join(_entry_line(e) for e in page)))
    assert got == want
    assert [len(keys) for keys, _ in got] == [10, 10, 5]
    assert with_render.keys == [f"k{i:03d}" for i in range(25)]


@pytest.mark.parametrize("expires", [-1, NOW_MS + 1])
def test_a_line_parses_back_to_the_entry(expires: int) -> None:
    value = {"a": [1, 2.5, "é"], "b": None}
    raw = entry_string(9, NOW_MS, NOW_MS + 5, "раздел", stored(value))
    _, line = fast_lines(reply([("ключ", raw, expires)]))
    record = orjson.loads(line)
    assert record == {
        "key": "ключ",
        "value": value,
        "partition": "раздел",
        "version": 9,
        "created_at": "2025-12-06T05:46:40.123000Z",
        "updated_at": "2025-12-06T05:46:40.128000Z",
        "expires_at": None
        if expires < 0
        else datetime.fromtimestamp(expires / 1000, timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z"),
    }
