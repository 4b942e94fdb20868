"""Glob search: metacharacters in keys and patterns, classes, escapes, limits, bad patterns."""

from __future__ import annotations

import time

import pytest

from fleetmem.errors import FleetmemError, InvalidPatternError
from fleetmem.protocol import MemoryStore
from fleetmem.testing.conformance._base import ConformanceBase

#: Keys holding every glob, LIKE and regex metacharacter, stored as literal text.
SEARCH_KEYS: list[str] = [
    "a*b",
    "a?b",
    "a[b]",
    "a\\b",
    "a%b",
    "a_b",
    "a{b}",
    "a:b",
    "axb",
    "ab",
    "a/b",
    "a/x/b",
    "abc",
    "a]b",
    "a-b",
    "a!b",
    "a^b",
    "a.b",
    "a$b",
    "a(b",
    "a|b",
    "a+b",
    "b",
    "A.b",
    "[x",
    "caf\u00e9",
    "caf\U0001f600",
    "a\u2028b",
]

_THREE = [k for k in SEARCH_KEYS if len(k) == 3 and k[0] == "a" and k[2] == "b"]
_A_B = [k for k in SEARCH_KEYS if k.startswith("a") and k.endswith("b")]

#: pattern -> the keys of SEARCH_KEYS it matches (fnmatch semantics with ``\\`` and ``[^``).
SEARCH_CASES: dict[str, list[str]] = {
    "a*b": _A_B,
    "a?b": _THREE,
    "a\\*b": ["a*b"],
    "a\\?b": ["a?b"],
    "a\\[b\\]": ["a[b]"],
    "a\\[b]": ["a[b]"],
    "a\\\\b": ["a\\b"],
    "\\a\\*\\b": ["a*b"],
    "a%b": ["a%b"],
    "a_b": ["a_b"],
    "a%*": ["a%b"],
    "a_*": ["a_b"],
    "*%*": ["a%b"],
    "*_*": ["a_b"],
    "a{*": ["a{b}"],
    "a{b}": ["a{b}"],
    "*:*": ["a:b"],
    "a.*": ["a.b"],
    "a.b": ["a.b"],
    "*$*": ["a$b"],
    "a(*": ["a(b"],
    "a|?": ["a|b"],
    "a+b": ["a+b"],
    "*]*": ["a[b]", "a]b"],
    "[!a]*": ["A.b", "[x", "b", "caf\u00e9", "caf\U0001f600"],
    "[^a]*": ["A.b", "[x", "b", "caf\u00e9", "caf\U0001f600"],
    "?": ["b"],
    "a[]]b": ["a]b"],
    "a[!]]b": [k for k in _THREE if k != "a]b"],
    "a[^]]b": [k for k in _THREE if k != "a]b"],
    "a[z-a]b": [],
    "a[!z-a]b": _THREE,
    "a[\\]]b": ["a]b"],
    "a[\\\\]b": ["a\\b"],
    "a[*?]b": ["a*b", "a?b"],
    "a[%_]b": ["a%b", "a_b"],
    "a[x-z]b": ["axb"],
    "a[-]b": ["a-b"],
    "a[!-]b": [k for k in _THREE if k != "a-b"],
    "a[\\-x]b": ["a-b", "axb"],
    "a[.]b": ["a.b"],
    "a[$^]b": ["a$b", "a^b"],
    "a[!^]b": [k for k in _THREE if k != "a^b"],
    "[[]x": ["[x"],
    "a/*": ["a/b", "a/x/b"],
    "a/*/b": ["a/x/b"],
    "*/b": ["a/b", "a/x/b"],
    "a/?/b": ["a/x/b"],
    "A*": ["A.b"],
    "A?b": ["A.b"],
    "caf?": ["caf\u00e9", "caf\U0001f600"],
    "caf[\u00e9]": ["caf\u00e9"],
    "caf[^\u00e9]": ["caf\U0001f600"],
    "caf[\u00e0-\u00ea]": ["caf\u00e9"],
    "caf[\U0001f600-\U0001f64f]": ["caf\U0001f600"],
    "caf*": ["caf\u00e9", "caf\U0001f600"],
    "a?c": ["abc"],
    "ab?": ["abc"],
    "ab*": ["ab", "abc"],
    "ab": ["ab"],
    "a\u2028b": ["a\u2028b"],
    "a?*?": [k for k in SEARCH_KEYS if k.startswith("a") and len(k) >= 3],
    "*": SEARCH_KEYS,
    "**": SEARCH_KEYS,
    "*" * 16: SEARCH_KEYS,
    "*?*": SEARCH_KEYS,
    "?*": SEARCH_KEYS,
    "zz*": [],
    "abc?": [],
    "": [],
}

#: Patterns refused with ``InvalidPatternError`` (a ``ValueError``).
BAD_PATTERNS: list[str] = [
    "a[",
    "a[b",
    "[",
    "[]",
    "[!]",
    "[^]",
    "a[]b",
    "a\\",
    "a[\\",
    "a[b\\",
    "x" * 257,
    "\u00e9" * 129,  # 258 bytes
    "*" * 17,
    "a*" * 17,
    "*" * 9 + "x" + "*" * 8,
    # A control character anywhere (no key holds one; PostgreSQL's text cannot carry U+0000):
    # refused before any I/O, never a driver error.
    "a\x00*",
    "\x00",
    "a\x00",
    "a\\\x00*",
    "[\x00-\x7f]*",
    "[!\x00]",
    "a\x01*",
    "*\n*",
    "?\x1f",
    "\x7f*",
]


class SearchConformance(ConformanceBase):
    """The glob rules of ``search`` and its partition, limit and ordering."""

    async def test_search_glob_semantics(self, store: MemoryStore) -> None:
        await store.set_many({key: index for index, key in enumerate(SEARCH_KEYS)})
        value_of = {key: index for index, key in enumerate(SEARCH_KEYS)}
        failures = []
        for pattern, keys in SEARCH_CASES.items():
            expected = {key: value_of[key] for key in sorted(keys)}
            found = await store.search(pattern)
            if list(found.items()) != list(expected.items()):
                failures.append(f"search({pattern!r}) -> {list(found)}, expected {list(expected)}")
        assert not failures, "\n".join(failures)

    async def test_search_with_partition_and_limit(self, store: MemoryStore) -> None:
        await store.set_many({f"k{i}": i for i in range(0, 10, 2)}, partition="even")
        await store.set_many({f"k{i}": i for i in range(1, 10, 2)}, partition="odd")
        await store.set("other", 0, partition="even")
        assert await store.search("k*", partition="even") == {f"k{i}": i for i in (0, 2, 4, 6, 8)}
        assert list(await store.search("k?", partition="odd")) == ["k1", "k3", "k5", "k7", "k9"]
        assert await store.search("k*", partition="none") == {}
        assert await store.search("k*", limit=3) == {"k0": 0, "k1": 1, "k2": 2}
        assert await store.search("k*", partition="odd", limit=2) == {"k1": 1, "k3": 3}
        assert await store.search("k*", limit=0) == {}
        assert len(await store.search("*", limit=100)) == 11
        # A limit no backend's integer can carry bounds nothing (keys() shares the rule).
        for huge in (2**63 - 1, 2**63, 2**64, 10**30):
            assert len(await store.search("k*", limit=huge)) == 10
            assert len(await store.search("k*", partition="odd", limit=huge)) == 5
            assert len(await store.keys(limit=huge)) == 11
            assert await store.keys("k", partition="even", limit=huge) == [
                "k0",
                "k2",
                "k4",
                "k6",
                "k8",
            ]
        # A pattern without a wildcard is an exact lookup, still filtered by partition.
        assert await store.search("k3") == {"k3": 3}
        assert await store.search("k3", partition="odd") == {"k3": 3}
        assert await store.search("k3", partition="even") == {}
        assert await store.search("k3", limit=1) == {"k3": 3}
        assert await store.search("k3", limit=0) == {}
        result = await store.search("*")
        assert list(result) == sorted(result)

    async def test_bad_patterns_are_refused(self, store: MemoryStore) -> None:
        await store.set("a[b", 1)
        for pattern in BAD_PATTERNS:
            with pytest.raises(InvalidPatternError) as info:
                await store.search(pattern)
                raise AssertionError(f"search({pattern!r}) was accepted")
            assert isinstance(info.value, ValueError)
            assert isinstance(info.value, FleetmemError)
        # At the limits: 256 bytes and 16 stars are accepted.
        assert await store.search("a" * 256) == {}
        assert await store.search("*" * 8 + "[[]" + "*" * 8) == {"a[b": 1}
        assert await store.search("\u00e9" * 128) == {}
        # Nothing was broken by the refusals (no connection left in a bad state).
        assert await store.search("a[[]?") == {"a[b": 1}

    async def test_many_stars_against_a_long_key_stay_fast(self, store: MemoryStore) -> None:
        miss = "a" * 1024
        hit = "a" * 1023 + "c"
        await store.set_many({miss: 1, hit: 2, "a" * 1022 + "ca": 3})
        pattern = "a*" * 16 + "c"  # 16 stars, no match in `miss`: backtracking is exponential
        start = time.monotonic()
        assert await store.search(pattern) == {hit: 2}
        assert await store.search("*a" * 16 + "b") == {}
        assert await store.search("*a" * 14 + "*c*") == {hit: 2, "a" * 1022 + "ca": 3}
        elapsed = time.monotonic() - start
        assert elapsed < self.pathological_pattern_seconds, f"took {elapsed:.2f} s"
