"""Unit tests of ``fleetmem._validate``: names, TTLs, limits and glob patterns.

Glob matching is compared with ``fnmatch.fnmatchcase`` (the contract's reference) on patterns
without ``\\`` or ``^``, and ``GlobPattern.regex`` / ``.like`` / ``.prefix`` with the exact
matcher, using hypothesis.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleetmem._validate import (
    MAX_TTL_SECONDS,
    compile_glob,
    validate_amount,
    validate_key,
    validate_keys,
    validate_limit,
    validate_namespace,
    validate_optional_partition,
    validate_optional_ttl,
    validate_partition,
    validate_ttl,
    validate_version,
)
from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidPatternError,
)

# ---------------------------------------------------------------------------- names

BAD_KEYS: list[Any] = [
    "",
    "a" * 1025,
    "\u00e9" * 512 + "a",
    "\U0001f600" * 256 + "a",
    "\x00",
    "a\x1f",
    "\x7f",
    "a\nb",
    "\ud800",
    "x\udfff",
    1,
    None,
    b"k",
    ["k"],
]
GOOD_KEYS = ["k", "a" * 1024, "\u00e9" * 512, "\U0001f600" * 256, "\u0085\u00a0", "* ? [ ] \\ % _"]


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_bad_keys(key: Any) -> None:
    with pytest.raises(InvalidKeyError) as info:
        validate_key(key)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, FleetmemError)


@pytest.mark.parametrize("key", GOOD_KEYS, ids=repr)
def test_good_keys(key: str) -> None:
    assert validate_key(key) is key


@given(st.text(min_size=1, max_size=40))
def test_key_rule_matches_the_contract(key: str) -> None:
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    valid = 1 <= size <= 1024 and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in key)
    if valid:
        assert validate_key(key) == key
    else:
        with pytest.raises(InvalidKeyError):
            validate_key(key)


def test_validate_keys_dedups_in_order() -> None:
    assert validate_keys(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert validate_keys(iter(["x"])) == ["x"]
    assert validate_keys([]) == []
    for bad in ("abc", b"abc", 5, ["ok", ""], ["ok", 1]):
        with pytest.raises(InvalidKeyError):
            validate_keys(bad)


def test_validate_keys_bulk_check_agrees_with_the_single_key_rules() -> None:
    """The all-printable-ASCII shortcut of a bulk call refuses exactly what validate_key does."""

    class Name(str):
        pass

    good = ["a", "k" * 1024, "with space", "\u00e9t\u00e9", Name("sub"), "\U0001f600" * 256]
    assert validate_keys(good) == good
    bad_items: list[object] = [
        "",
        "k" * 1025,
        "tab\there",
        "del\x7f",
        "nul\x00",
        "\u00e9" * 513,
        "\ud800",
        7,
        None,
        b"bytes",
    ]
    for bad in bad_items:
        with pytest.raises(InvalidKeyError):
            validate_key(bad)
        for where in (0, 5):
            keys = ["x", "y", "z", "w", "v"]
            keys.insert(where, bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidKeyError):
                validate_keys(keys)


def test_partitions() -> None:
    assert validate_partition("p" * 255) == "p" * 255
    assert validate_partition("\u00e9" * 127 + "a") == "\u00e9" * 127 + "a"
    assert validate_optional_partition(None) is None
    for bad in ("p" * 256, "\u00e9" * 128, "", "a\x00", None, 3):
        with pytest.raises(InvalidKeyError):
            validate_partition(bad)


def test_namespaces() -> None:
    for good in ("a", "x" * 64, "A-z_0.9", ".", "-"):
        assert validate_namespace(good) == good
    for bad in ("", "x" * 65, "a b", "a:b", "a/b", "\u00e9", "a\n", 1, None):
        with pytest.raises(InvalidKeyError):
            validate_namespace(bad)


# ---------------------------------------------------------------------------- numbers


def test_ttl_conversion_to_milliseconds() -> None:
    assert validate_ttl(1) == 1000
    assert validate_ttl(0.001) == 1
    assert validate_ttl(0.0015) == 2
    assert validate_ttl(12.5) == 12500
    assert validate_ttl(timedelta(milliseconds=1)) == 1
    assert validate_ttl(timedelta(days=1)) == 86_400_000
    assert validate_ttl(MAX_TTL_SECONDS) == MAX_TTL_SECONDS * 1000
    assert validate_optional_ttl(None) is None
    assert validate_optional_ttl(None, keep_ttl=True) is None
    assert validate_optional_ttl(2) == 2000


@pytest.mark.parametrize(
    "ttl",
    [
        0,
        0.0,
        -1,
        0.0005,
        0.000999,
        float("nan"),
        float("inf"),
        float("-inf"),
        True,
        False,
        timedelta(0),
        timedelta(seconds=-1),
        timedelta(microseconds=999),
        MAX_TTL_SECONDS + 1,
        "10",
        None,
    ],
    ids=repr,
)
def test_bad_ttls(ttl: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_ttl(ttl)
    assert isinstance(info.value, ValueError)


def test_ttl_with_keep_ttl_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        validate_optional_ttl(5, keep_ttl=True)


def test_limits_versions_amounts() -> None:
    assert validate_limit(None) is None
    assert validate_limit(0) == 0
    assert validate_limit(7) == 7
    assert validate_limit(2**63 - 1) == 2**63 - 1
    # Beyond signed 64 bits a limit bounds nothing and no backend could carry it: no limit.
    for huge in (2**63, 2**64, 10**30):
        assert validate_limit(huge) is None
    bad_limits: list[Any] = [-1, True, 1.0, "1", -(2**64)]
    for bad in bad_limits:
        with pytest.raises(InvalidArgumentError):
            validate_limit(bad)
    assert validate_version(0) == 0
    assert validate_version(5) == 5
    assert validate_version(2**63 - 1) == 2**63 - 1
    bad_versions: list[Any] = [-1, True, 1.0, "1", None, 2**63, 2**64, 10**30]
    for bad in bad_versions:
        with pytest.raises(InvalidArgumentError):
            validate_version(bad)
    assert validate_amount(2**63 - 1) == 2**63 - 1
    assert validate_amount(-(2**63)) == -(2**63)
    amount = validate_amount(1.5)
    assert amount == 1.5 and type(amount) is float
    bad_amounts: list[Any] = [2**63, -(2**63) - 1, True, float("nan"), float("inf"), "1", None]
    for bad in bad_amounts:
        with pytest.raises(InvalidArgumentError):
            validate_amount(bad)


# ---------------------------------------------------------------------------- glob


def _like_regex(like: str) -> re.Pattern[str]:
    """An SQL LIKE pattern (escape ``\\``) as a Python regular expression."""
    out: list[str] = []
    i = 0
    while i < len(like):
        ch = like[i]
        if ch == "\\":
            out.append(re.escape(like[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _check_compiled(pattern: str, key: str) -> bool:
    """``matches`` and every derived form agree on ``key``; return the match."""
    glob = compile_glob(pattern)
    matched = glob.matches(key)
    assert (re.fullmatch(glob.regex, key) is not None) is matched, (pattern, key, glob.regex)
    like = _like_regex(glob.like).fullmatch(key) is not None
    if matched:
        assert like, (pattern, key, glob.like)
        assert key.startswith(glob.prefix), (pattern, key, glob.prefix)
    if not glob.has_class:
        assert like is matched, (pattern, key, glob.like)
    if glob.literal is not None:
        assert matched is (key == glob.literal)
    return matched


PATTERN_CHARS = "ab-*?[]!/%_\u00e9\U0001f600"
KEY_CHARS = "ab-*?[]!^/%_\\\u00e9\U0001f600"


@settings(max_examples=1500, deadline=None)
@given(st.text(PATTERN_CHARS, max_size=10), st.text(KEY_CHARS, min_size=1, max_size=10))
def test_glob_matches_fnmatch(pattern: str, key: str) -> None:
    try:
        compile_glob(pattern)
    except InvalidPatternError:
        # Only an unclosed class (or too many stars) is refused: fnmatch reads it literally.
        assume(False)
    expected = bool(pattern) and fnmatch.fnmatchcase(key, pattern)
    assert _check_compiled(pattern, key) is expected, (pattern, key)


@settings(max_examples=1500, deadline=None)
@given(
    st.text(PATTERN_CHARS + "\\^", max_size=12),
    st.text(KEY_CHARS, min_size=1, max_size=10),
)
def test_glob_forms_agree_with_escapes_and_carets(pattern: str, key: str) -> None:
    try:
        compile_glob(pattern)
    except InvalidPatternError:
        assume(False)
    _check_compiled(pattern, key)


@given(st.text(KEY_CHARS, min_size=1, max_size=12))
def test_escaped_key_matches_only_itself(key: str) -> None:
    pattern = "".join("\\" + c for c in key)
    glob = compile_glob(pattern)
    assert glob.literal == key
    assert glob.matches(key)
    assert not glob.matches(key + "x")
    assert _check_compiled(pattern, key)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("\\a", "a", True),
        ("a\\\\b", "a\\b", True),
        ("[^a]", "b", True),
        ("[^a]", "a", False),
        ("[!a]", "^", True),
        ("[a^]", "^", True),
        ("[]]", "]", True),
        ("[!]]", "]", False),
        ("[^]]", "x", True),
        ("[z-a]", "m", False),
        ("[z-a]", "z", False),
        ("[!z-a]", "m", True),
        ("[\\]]", "]", True),
        ("[\\\\]", "\\", True),
        ("[\\-x]", "-", True),
        ("[a\\-z]", "m", False),
        ("[*]", "*", True),
        ("*", "a/b/c", True),
        ("a/*", "a/b/c", True),
        ("?", "\U0001f600", True),
        ("??", "\U0001f600", False),
        ("a%", "a%", True),
        ("a%", "ab", False),
        ("a_", "ab", False),
        ("", "a", False),
        ("A*", "a", False),
    ],
)
def test_glob_cases(pattern: str, key: str, expected: bool) -> None:
    assert _check_compiled(pattern, key) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "[",
        "a[",
        "[]",
        "[!]",
        "[^]",
        "a[b",
        "a\\",
        "[\\",
        "[a\\",
        "[a-\\",
        "x" * 257,
        "\u00e9" * 129,
        "*" * 17,
        "a*" * 17,
        5,
        None,
        "\ud800",
        # A control character anywhere: no key holds one (and PostgreSQL cannot take U+0000).
        "a\x00*",
        "\x00",
        "a\\\x00",
        "[\x00-\x7f]",
        "[!\x01]*",
        "*\t*",
        "\x1f",
        "a\x7f",
        "\u00e9" * 100 + "\n",
    ],
    ids=repr,
)
def test_bad_patterns(pattern: Any) -> None:
    with pytest.raises(InvalidPatternError) as info:
        compile_glob(pattern)
    assert isinstance(info.value, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_patterns_and_keys_refuse_the_same_control_characters(text: str) -> None:
    # A pattern is refused for a control character exactly when a key would be for it.
    assume(text.isprintable() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text))
    assume(not any(0xD800 <= ord(c) <= 0xDFFF for c in text))
    control = any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    escaped = "".join("\\" + c for c in text)  # every character literal
    if control:
        with pytest.raises(InvalidPatternError, match="control character"):
            compile_glob(escaped)
        with pytest.raises(InvalidKeyError):
            validate_key(text)
    elif len(escaped.encode()) <= 256:
        assert compile_glob(escaped).matches(text)


def test_pattern_limits_are_inclusive() -> None:
    assert compile_glob("x" * 256).literal == "x" * 256
    assert compile_glob("\u00e9" * 128).literal == "\u00e9" * 128
    assert compile_glob("*" * 16).matches("anything")


def test_prefix_and_literal() -> None:
    assert compile_glob("user/*/x").prefix == "user/"
    assert compile_glob("ab?c").prefix == "ab"
    assert compile_glob("a\\*b*").prefix == "a*b"
    assert compile_glob("[a]bc").prefix == ""
    assert compile_glob("abc").literal == "abc"
    assert compile_glob("a\\?c").literal == "a?c"
    assert compile_glob("a?c").literal is None
    assert compile_glob("").literal is None
    assert compile_glob("a%_").like == "a\\%\\_"


def test_many_stars_are_linear() -> None:
    glob = compile_glob("a*" * 16 + "c")
    assert not glob.matches("a" * 1024)
    assert glob.matches("a" * 1023 + "c")
    assert not compile_glob("*a" * 16 + "b").matches("a" * 1024)
