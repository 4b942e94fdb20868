"""Validation of namespaces, keys, partitions, TTLs, limits and glob patterns: one place for all.

Every public store method validates its arguments here before any I/O.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fleetmem.errors import (
    ConfigurationError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidPatternError,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "KEY_CEILING",
    "MAX_KEY_BYTES",
    "MAX_PARTITION_BYTES",
    "MAX_PATTERN_BYTES",
    "MAX_PATTERN_STARS",
    "MAX_TTL_SECONDS",
    "GlobPattern",
    "check_non_negative_int",
    "check_non_negative_number",
    "check_positive_int",
    "check_positive_number",
    "compile_glob",
    "prefix_upper_bound",
    "validate_key",
    "validate_keys",
    "validate_limit",
    "validate_name",
    "validate_namespace",
    "validate_partition",
    "validate_ttl",
    "validate_wait",
]

MAX_KEY_BYTES = 1024
MAX_PARTITION_BYTES = 255
MAX_PATTERN_BYTES = 256
MAX_PATTERN_STARS = 16
#: The longest TTL accepted (100 years): every backend can represent the resulting expiry.
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
DEFAULT_PARTITION = "default"

#: Greater than every valid key (a key holds at most 1024 UTF-8 bytes; this is 1028 bytes).
KEY_CEILING = "\U0010ffff" * 257

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def validate_namespace(namespace: object) -> str:
    """Return ``namespace`` if it matches ``[A-Za-z0-9_.-]{1,64}``."""
    if type(namespace) is not str or _NAMESPACE_RE.fullmatch(namespace) is None:
        raise InvalidKeyError(
            f"invalid namespace {namespace!r}: expected 1-64 characters of A-Z a-z 0-9 _ . -"
        )
    return namespace


def _validate_name(value: object, what: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a str, not {type(value).__name__}")
    # Fast path: printable ASCII is valid as soon as it is short enough.
    if value.isascii():
        if 0 < len(value) <= max_bytes and value.isprintable():
            return value
        if not value:
            raise InvalidKeyError(f"{what} must not be empty")
        if len(value) > max_bytes:
            raise InvalidKeyError(f"{what} is longer than {max_bytes} bytes")
        raise InvalidKeyError(f"{what} {value!r} contains a control character")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKeyError(f"{what} {value!r} contains a lone surrogate") from None
    if size > max_bytes:
        raise InvalidKeyError(f"{what} is longer than {max_bytes} bytes ({size} bytes)")
    if _CONTROL_RE.search(value) is not None:
        raise InvalidKeyError(f"{what} {value!r} contains a control character")
    return value


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid key (1-1024 UTF-8 bytes, no control character)."""
    return _validate_name(key, "key", MAX_KEY_BYTES)


def validate_name(value: object, what: str, max_bytes: int = MAX_KEY_BYTES) -> str:
    """``value`` if it follows the key rules (a lease name, an agent id, an owner), with
    ``what`` naming it in the error."""
    return _validate_name(value, what, max_bytes)


def _as_float(number: int | float) -> float:
    """``number`` as a float; an int too large for one becomes the largest float of its sign
    (which the callers refuse as out of range) instead of raising ``OverflowError``."""
    try:
        return float(number)
    except OverflowError:
        return sys.float_info.max if number > 0 else -sys.float_info.max


def validate_wait(wait: object) -> float | None:
    """``wait`` (seconds or ``timedelta``, >= 0, finite; ``None``: do not wait) as seconds."""
    if wait is None:
        return None
    if isinstance(wait, bool):
        raise InvalidArgumentError("wait must be a number of seconds or a timedelta, not a bool")
    if isinstance(wait, timedelta):
        seconds = wait.total_seconds()
    elif isinstance(wait, (int, float)):
        seconds = _as_float(wait)
    else:
        raise InvalidArgumentError(
            f"wait must be a number of seconds or a timedelta, not {type(wait).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(f"wait must be a finite number of seconds >= 0, not {wait!r}")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidArgumentError(f"wait must be at most {MAX_TTL_SECONDS} seconds (100 years)")
    return seconds


def validate_keys(keys: object) -> list[str]:
    """Validate an iterable of keys (not a bare ``str``); duplicates are removed, order kept."""
    if isinstance(keys, (str, bytes)):
        raise InvalidKeyError("keys must be an iterable of str, not a single str")
    try:
        items = list(keys)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidKeyError(
            f"keys must be an iterable of str, not {type(keys).__name__}"
        ) from None
    if not _all_short_printable_ascii(items, MAX_KEY_BYTES):
        for key in items:
            _validate_name(key, "key", MAX_KEY_BYTES)
    return list(dict.fromkeys(items))


def _all_short_printable_ascii(items: list[Any], max_bytes: int) -> bool:
    """True if every item is a non-empty ``str`` of at most ``max_bytes`` printable ASCII
    characters: the common case of a bulk call, checked in a few C-level passes."""
    try:
        joined = "".join(items)
    except TypeError:
        return False
    if not (joined.isascii() and joined.isprintable()):
        return False
    lengths = list(map(len, items))
    return min(lengths, default=1) > 0 and max(lengths, default=0) <= max_bytes


def validate_partition(partition: object) -> str:
    """Return ``partition`` if it is a valid partition name (1-255 UTF-8 bytes)."""
    return _validate_name(partition, "partition", MAX_PARTITION_BYTES)


def validate_optional_partition(partition: object) -> str | None:
    """``None`` or a valid partition."""
    return None if partition is None else validate_partition(partition)


def validate_ttl(ttl: object) -> int:
    """Return ``ttl`` (seconds or ``timedelta``) as whole milliseconds, at least 1."""
    if isinstance(ttl, bool):
        raise InvalidArgumentError("ttl must be a number of seconds or a timedelta, not a bool")
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)):
        seconds = _as_float(ttl)
    else:
        raise InvalidArgumentError(
            f"ttl must be a number of seconds or a timedelta, not {type(ttl).__name__}"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise InvalidArgumentError(f"ttl must be finite, not {ttl!r}")
    if seconds < 0.001:
        raise InvalidArgumentError(f"ttl must be at least one millisecond, not {ttl!r}")
    if seconds > MAX_TTL_SECONDS:
        raise InvalidArgumentError(f"ttl must be at most {MAX_TTL_SECONDS} seconds (100 years)")
    return max(1, round(seconds * 1000))


def validate_optional_ttl(ttl: object, keep_ttl: bool = False) -> int | None:
    """``None`` or the TTL in milliseconds; ``ttl`` with ``keep_ttl=True`` is refused."""
    if ttl is None:
        return None
    if keep_ttl:
        raise InvalidArgumentError("ttl and keep_ttl=True cannot be given together")
    return validate_ttl(ttl)


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def validate_limit(limit: object) -> int | None:
    """``None`` (no limit) or an ``int`` >= 0.

    A limit above ``2**63 - 1`` bounds nothing (no namespace holds that many entries) and no
    backend's integer can carry it (PostgreSQL's ``LIMIT`` is a bigint, SQLite's a signed
    64-bit integer): it is returned as ``None``, no limit, the same on every backend.
    """
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgumentError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise InvalidArgumentError(f"limit must be >= 0, not {limit}")
    if limit > INT64_MAX:
        return None
    return limit


def validate_version(version: object) -> int:
    """A compare-and-set version: an ``int`` from 0 to ``2**63 - 1``.

    Versions are signed 64-bit counters on every backend (a PostgreSQL ``bigint``, a Redis
    integer): no entry can have a larger one, so asking for it is a bad argument
    (``InvalidArgumentError``, before any I/O), not a conflict.
    """
    if isinstance(version, bool) or not isinstance(version, int):
        raise InvalidArgumentError(f"version must be an int, not {type(version).__name__}")
    if version < 0:
        raise InvalidArgumentError(f"version must be >= 0, not {version}")
    if version > INT64_MAX:
        raise InvalidArgumentError(
            f"version must be at most 2**63 - 1 (no entry can have a larger one), not {version}"
        )
    return version


def validate_amount(amount: object) -> int | float:
    """An ``incr`` amount: an ``int`` in signed 64 bits or a finite ``float``."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise InvalidArgumentError(f"amount must be an int or a float, not {type(amount).__name__}")
    if isinstance(amount, float):
        if not math.isfinite(amount):
            raise InvalidArgumentError(f"amount must be finite, not {amount!r}")
        return float(amount)
    if not INT64_MIN <= amount <= INT64_MAX:
        raise InvalidArgumentError("amount is out of the signed 64-bit range")
    return int(amount)


# --------------------------------------------------------------------------------------------
# Glob patterns
# --------------------------------------------------------------------------------------------

# A token of a star-free segment: a literal character, ``None`` for ``?``, or a character class.
_ClassItem = tuple[str, str]  # an inclusive range (lo, hi); a single character is (c, c)


@dataclass(frozen=True, slots=True)
class _Class:
    negated: bool
    ranges: tuple[_ClassItem, ...]


_Token = str | _Class | None


@dataclass(frozen=True)
class GlobPattern:
    """A validated glob pattern, compiled for every backend.

    ``prefix`` is the literal text every match starts with (to turn into an index range),
    ``literal`` is the whole key when the pattern has no wildcard, ``like`` is an SQL ``LIKE``
    pattern (escape character ``\\``) that every match satisfies -- a superset filter when the
    pattern has classes -- and ``regex`` an anchored POSIX/Python regular expression equivalent to
    the pattern. :meth:`matches` is the exact matcher, linear in the key's length.
    """

    pattern: str
    prefix: str
    literal: str | None
    like: str
    regex: str
    has_class: bool
    _segments: tuple[re.Pattern[str], ...]
    _widths: tuple[int, ...]
    _starred: bool
    _empty: bool

    def matches(self, key: str) -> bool:
        """Whether ``key`` matches the whole pattern."""
        if self._empty:
            return False
        segments = self._segments
        if not self._starred:
            return segments[0].fullmatch(key) is not None
        first, last = segments[0], segments[-1]
        widths = self._widths
        n = len(key)
        if widths[0] + widths[-1] > n:
            return False
        if widths[0] and first.match(key) is None:
            return False
        end = n - widths[-1]
        if widths[-1] and last.fullmatch(key, end) is None:
            return False
        pos = widths[0]
        # Middle segments: the leftmost occurrence is always the best choice for a glob, so
        # each is found once -- no backtracking, O(len(key) * len(pattern)) at worst.
        for index in range(1, len(segments) - 1):
            found = segments[index].search(key, pos, end)
            if found is None:
                return False
            pos = found.end()
        return pos <= end


def _class_regex(cls: _Class) -> str:
    parts = []
    for lo, hi in cls.ranges:
        if lo == hi:
            parts.append(_re_class_char(lo))
        else:
            parts.append(f"{_re_class_char(lo)}-{_re_class_char(hi)}")
    body = "".join(parts)
    if not body:
        # Only reversed ranges: matches nothing (negated: any character).
        return "[\\s\\S]" if cls.negated else "[^\\s\\S]"
    return f"[^{body}]" if cls.negated else f"[{body}]"


def _re_class_char(ch: str) -> str:
    # \uXXXX / \UXXXXXXXX mean the same in Python's and PostgreSQL's regular expressions.
    if ch.isascii() and ch.isalnum():
        return ch
    code = ord(ch)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _re_literal(ch: str) -> str:
    return re.escape(ch)


def _like_literal(ch: str) -> str:
    return "\\" + ch if ch in "%_\\" else ch


def _segment_regex(segment: list[_Token]) -> str:
    return "".join(
        "." if tok is None else _class_regex(tok) if isinstance(tok, _Class) else _re_literal(tok)
        for tok in segment
    )


def compile_glob(pattern: object) -> GlobPattern:
    """Validate and compile a glob pattern (see :meth:`MemoryStore.search`)."""
    if not isinstance(pattern, str):
        raise InvalidPatternError(f"pattern must be a str, not {type(pattern).__name__}")
    try:
        size = len(pattern.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidPatternError(f"pattern {pattern!r} contains a lone surrogate") from None
    if size > MAX_PATTERN_BYTES:
        raise InvalidPatternError(f"pattern is longer than {MAX_PATTERN_BYTES} bytes")
    if _CONTROL_RE.search(pattern) is not None:
        # Anywhere, escaped or in a class too: no key holds one, and PostgreSQL's text cannot
        # even carry U+0000. Refused before any I/O, alike on every backend.
        raise InvalidPatternError(
            f"pattern {pattern!r} contains a control character (U+0000-U+001F, U+007F), "
            "which no key can hold"
        )
    segments: list[list[_Token]] = [[]]
    stars = 0
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            stars += 1
            if stars > MAX_PATTERN_STARS:
                raise InvalidPatternError(f"pattern has more than {MAX_PATTERN_STARS} '*'")
            if segments[-1] or len(segments) == 1:
                segments.append([])
            i += 1
        elif ch == "?":
            segments[-1].append(None)
            i += 1
        elif ch == "\\":
            if i + 1 >= n:
                raise InvalidPatternError(f"pattern {pattern!r} ends with a lone '\\'")
            segments[-1].append(pattern[i + 1])
            i += 2
        elif ch == "[":
            cls, i = _parse_class(pattern, i)
            segments[-1].append(cls)
        else:
            segments[-1].append(ch)
            i += 1
    starred = len(segments) > 1
    # Prefix: the literal characters of the first segment before its first wildcard.
    prefix_chars: list[str] = []
    for tok in segments[0]:
        if isinstance(tok, str):
            prefix_chars.append(tok)
        else:
            break
    prefix = "".join(prefix_chars)
    has_wildcard = starred or any(not isinstance(t, str) for t in segments[0])
    has_class = any(isinstance(t, _Class) for seg in segments for t in seg)
    like_parts: list[str] = []
    regex_parts: list[str] = []
    for index, seg in enumerate(segments):
        if index > 0:
            like_parts.append("%")
            regex_parts.append(".*")
        for tok in seg:
            like_parts.append(_like_literal(tok) if isinstance(tok, str) else "_")
        regex_parts.append(_segment_regex(seg))
    compiled = tuple(re.compile(_segment_regex(seg), re.DOTALL) for seg in segments)
    return GlobPattern(
        pattern=pattern,
        prefix=prefix,
        literal=None if has_wildcard or not pattern else prefix,
        like="".join(like_parts),
        regex="^" + "".join(regex_parts) + "$",
        has_class=has_class,
        _segments=compiled,
        _widths=tuple(len(seg) for seg in segments),
        _starred=starred,
        _empty=not pattern,
    )


def _parse_class(pattern: str, start: int) -> tuple[_Class, int]:
    """Parse the class at ``pattern[start] == '['``; return it and the index after it."""
    n = len(pattern)
    i = start + 1
    negated = False
    if i < n and pattern[i] in "!^":
        negated = True
        i += 1
    members: list[str] = []
    first = True
    ranges: list[_ClassItem] = []
    while True:
        if i >= n:
            raise InvalidPatternError(f"pattern {pattern!r} has an unclosed '['")
        ch = pattern[i]
        if ch == "]" and not first:
            i += 1
            break
        first = False
        if ch == "\\":
            if i + 1 >= n:
                raise InvalidPatternError(f"pattern {pattern!r} ends with a lone '\\'")
            lo = pattern[i + 1]
            i += 2
        else:
            lo = ch
            i += 1
        # A range "lo-hi" unless '-' is the last member before ']'.
        if i + 1 < n and pattern[i] == "-" and pattern[i + 1] != "]":
            if pattern[i + 1] == "\\":
                if i + 2 >= n:
                    raise InvalidPatternError(f"pattern {pattern!r} ends with a lone '\\'")
                hi = pattern[i + 2]
                i += 3
            else:
                hi = pattern[i + 1]
                i += 2
            if lo <= hi:
                ranges.append((lo, hi))
            # A reversed range matches nothing: it adds no member.
        else:
            members.append(lo)
    ranges.extend((m, m) for m in members)
    return _Class(negated=negated, ranges=tuple(ranges)), i


def prefix_upper_bound(prefix: str) -> str:
    """The smallest string above every string that starts with ``prefix`` (code-point order):
    keys with the prefix are exactly those in ``[prefix, prefix_upper_bound(prefix))``."""
    stripped = prefix.rstrip("\U0010ffff")  # nothing follows U+10FFFF: carry to the left
    if not stripped:
        return KEY_CEILING
    code = ord(stripped[-1]) + 1
    if 0xD800 <= code <= 0xDFFF:  # surrogates are not text: the next code point is U+E000
        code = 0xE000
    return stripped[:-1] + chr(code)


# ---------------------------------------------------------------- constructor options
# Options are checked when a store is built, before any I/O; a wrong one is a ConfigurationError.


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an ``int`` > 0 (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive int, not {value!r}")
    return value


def check_non_negative_int(name: str, value: object) -> int:
    """``value`` as an ``int`` >= 0 (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an int >= 0, not {value!r}")
    return value


def check_positive_number(name: str, value: object) -> float:
    """``value`` as a finite ``float`` > 0 (``bool`` refused)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number, not {value!r}")
    return float(value)


def check_non_negative_number(name: str, value: object) -> float:
    """``value`` as a finite ``float`` >= 0 (``bool`` refused)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigurationError(f"{name} must be a finite number >= 0, not {value!r}")
    return float(value)
