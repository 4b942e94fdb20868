"""JSON encoding and decoding of values: the contract's value rules, in one place.

``encode_value`` validates a value (JSON types only, str dict keys, finite floats, nesting of at
most 64 levels, no U+0000 in any string) and returns compact UTF-8 JSON. orjson does the work;
the standard library takes over only for integers beyond 64 bits, which orjson refuses to write
and silently turns into floats when reading.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from fleetmem._validate import INT64_MAX, INT64_MIN
from fleetmem.errors import (
    InvalidArgumentError,
    NotANumberError,
    SerializationError,
    ValueTooLargeError,
)

__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "MAX_DEPTH",
    "decode_value",
    "decode_value_after_byte",
    "encode_value",
    "encode_value_ex",
    "incremented",
    "needs_exact_decoder",
    "stored_form",
    "utc_from_ms",
]

DEFAULT_MAX_VALUE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 64

_U64_MAX = 2**64 - 1
# orjson writes floats of this magnitude or more in exponent form (1e+16); see _write.
_EXPONENT_FORM = 1e16
_I64_MIN = -(2**63)
# 19 or more digits in a row: a number orjson might read as a float (or text we can afford to
# decode slowly; the stdlib reads big integers exactly). Mapping every digit to "0" and looking
# for a run of 19 is ~10x faster than a regular expression; counting the digits first (one
# C pass that deletes them) is faster still and rules most values out.
_DIGITS = b"0123456789"
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN_ZEROS = b"0" * 19


def _has_long_digit_run(data: bytes) -> bool:
    return len(data) - len(data.translate(None, _DIGITS)) >= 19 and _has_run_of_19(data)


def _has_run_of_19(data: bytes) -> bool:
    """The second step of :func:`_has_long_digit_run`, for a value holding 19+ digits."""
    return data.translate(_DIGITS_TO_ZERO).find(_NINETEEN_ZEROS) >= 0


def needs_exact_decoder(data: bytes | bytearray | memoryview) -> bool:
    """True if JSON ``data`` holds a run of 19 or more digits: a number orjson might not read
    exactly, so :func:`decode_value` must (any other is safe for ``orjson.loads``)."""
    return len(data) >= 19 and _has_long_digit_run(bytes(data))


class _BigInt(Exception):
    """Raised by the walk to send a value holding a >64-bit integer to the stdlib encoder."""


_NUL_MESSAGE = "strings holding U+0000 cannot be stored"


def _check(value: Any, depth: int) -> bool:
    """Validate ``value``; return True if orjson cannot write it (an int over 64 bits, a
    str-subclass dict key): the stdlib encoder then does."""
    kind = type(value)
    if kind is dict or kind is list or kind is tuple:
        return _check_container(value, kind, depth)
    if kind is str:
        if "\x00" in value:
            raise SerializationError(_NUL_MESSAGE)
        return False
    if kind is bool or value is None:
        return False
    if kind is int:
        return not _I64_MIN <= value <= _U64_MAX
    if kind is float:
        if value - value != 0.0:  # NaN and the infinities
            raise SerializationError(f"{value!r} is not a JSON number")
        return not -_EXPONENT_FORM < value < _EXPONENT_FORM
    # Subclasses of the JSON types (IntEnum, str subclasses, OrderedDict ...) are their base type.
    if isinstance(value, (str, int, float, dict, list, tuple)):
        return _check(_as_base(value), depth)
    raise SerializationError(f"values of type {kind.__name__} are not JSON")


def _check_container(value: Any, kind: type, depth: int) -> bool:
    # Scalars are checked inline: only nested containers (and odd types) cost a call.
    if depth >= MAX_DEPTH:
        raise SerializationError(f"value is nested deeper than {MAX_DEPTH} levels")
    big = False
    if kind is dict:
        for k in value:
            if type(k) is not str:
                if not isinstance(k, str):
                    raise SerializationError(f"dict keys must be str, not {type(k).__name__}")
                big = True  # orjson refuses str-subclass keys; the stdlib encoder takes them
            if "\x00" in k:
                raise SerializationError(_NUL_MESSAGE)
        items = value.values()
    else:
        items = value
    for v in items:
        t = type(v)
        if t is str:
            if "\x00" in v:
                raise SerializationError(_NUL_MESSAGE)
        elif t is int:
            if not _I64_MIN <= v <= _U64_MAX:
                big = True
        elif t is float:
            if v - v != 0.0:
                raise SerializationError(f"{v!r} is not a JSON number")
            if not -_EXPONENT_FORM < v < _EXPONENT_FORM:
                big = True
        elif t is bool or v is None:
            pass
        elif _check(v, depth + 1):
            big = True
    return big


def _as_base(value: Any) -> Any:
    if isinstance(value, bool):
        return bool(value)
    bases: tuple[type[Any], ...] = (str, int, float, dict, list, tuple)
    for base in bases:
        if isinstance(value, base):
            return base(value)
    raise SerializationError(
        f"values of type {type(value).__name__} are not JSON"
    )  # pragma: no cover


def _write(value: Any, out: list[str]) -> list[str]:
    """Exact JSON for the rare values orjson cannot write as fleetmem stores them.

    Integers of any size; str-subclass dict keys; and integral floats of 1e16 or more, which
    orjson writes in exponent form (``1e+300``) -- a form PostgreSQL's ``jsonb`` keeps as an
    integer. They are written as plain decimals with ``.0`` so that every backend reads (and
    ``incr`` treats) them as the floats they are. ``value`` was validated by ``_check``.
    """
    kind = type(value)
    if kind is dict or isinstance(value, dict):
        out.append("{")
        for index, (k, v) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(_string(str(k)))
            out.append(":")
            _write(v, out)
        out.append("}")
    elif kind is list or kind is tuple or isinstance(value, (list, tuple)):
        out.append("[")
        for index, v in enumerate(value):
            if index:
                out.append(",")
            _write(v, out)
        out.append("]")
    elif kind is str or isinstance(value, str):
        out.append(_string(str(value)))
    elif value is None or isinstance(value, bool):
        out.append("null" if value is None else "true" if value else "false")
    elif isinstance(value, int):
        try:
            out.append(str(int(value)))
        except ValueError:  # Python converts at most sys.get_int_max_str_digits() digits
            raise SerializationError(
                f"an integer of {value.bit_length()} bits has more digits than Python converts "
                "to and from text (sys.get_int_max_str_digits()); it cannot be stored"
            ) from None
    else:
        number = float(value)
        if -_EXPONENT_FORM < number < _EXPONENT_FORM:
            out.append(orjson.dumps(number).decode())
        else:
            out.append(f"{int(number)}.0")  # exactly the float's value
    return out


def _string(text: str) -> str:
    try:
        return orjson.dumps(text).decode()
    except orjson.JSONEncodeError:
        raise SerializationError("strings holding lone surrogates cannot be stored") from None


def encode_value(value: Any, max_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> bytes:
    """Validate ``value`` and return it as compact UTF-8 JSON.

    Raises :class:`SerializationError` for a value that is not JSON and
    :class:`ValueTooLargeError` when the result is over ``max_bytes``.
    """
    return encode_value_ex(value, max_bytes)[0]


def encode_value_ex(value: Any, max_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> tuple[bytes, bool]:
    """:func:`encode_value`, also telling whether orjson reads the result back exactly
    (False when the value holds an integer beyond 64 bits)."""
    big = _check(value, 0)
    if big:
        data = "".join(_write(value, [])).encode("utf-8")
    else:
        try:
            # orjson's result keeps its whole output buffer: at least 4 KiB, and about 10x
            # the length of a long string. A copy makes a payload that a batch or the
            # in-memory store holds cost its length, not the buffer's. (Joined with b"": ~80 ns
            # for a small value, against ~190 ns through a memoryview.)
            data = b"".join(
                (
                    orjson.dumps(
                        value, option=orjson.OPT_PASSTHROUGH_SUBCLASS, default=_orjson_default
                    ),
                    b"",
                )
            )
        except orjson.JSONEncodeError as exc:
            cause = exc.__cause__
            if isinstance(cause, SerializationError):
                raise cause from None
            raise SerializationError(f"value cannot be encoded as JSON: {exc}") from None
    if len(data) > max_bytes:
        raise ValueTooLargeError(
            f"serialized value is {len(data)} bytes, over the store's max_value_bytes ({max_bytes})"
        )
    return data, not big


def _orjson_default(value: Any) -> Any:
    # Only subclasses of the JSON types reach here (validated by the walk).
    return _as_base(value)


def decode_value(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON written by :func:`encode_value` (or normalised by a database)."""
    if isinstance(data, str):
        if len(data) >= 19 and _has_long_digit_run(data.encode("utf-8")):
            return json.loads(data)
        return orjson.loads(data)
    if needs_exact_decoder(data):
        return json.loads(bytes(data))
    return orjson.loads(data)


_EXACT_AS_GIVEN = (str, int, float, bool, type(None))


def stored_form(value: Any, data: bytes, orjson_exact: bool) -> Any:
    """The value as a read returns it: a scalar as given, a container decoded from ``data``."""
    if type(value) in _EXACT_AS_GIVEN:
        return value
    return orjson.loads(data) if orjson_exact else json.loads(data)


def decode_value_after_byte(data: bytes) -> Any:
    """:func:`decode_value` of ``data[1:]`` (PostgreSQL's binary ``jsonb``: a version byte, then
    the JSON text), in one pass over ``bytes`` and one Python call per value: the decoder that
    bulk reads run once per row."""
    # data[0] is the version byte, never a digit. _has_long_digit_run's two steps, the first
    # inline: one Python call less per row (~60 ns, 0.6 ms per 10,000 rows).
    if len(data) - len(data.translate(None, _DIGITS)) >= 19 and _has_run_of_19(data):
        return json.loads(data[1:])
    return orjson.loads(data[1:])


def incremented(key: str, base: Any, amount: int | float) -> int | float:
    """``base + amount`` as ``incr`` computes it on every backend: exact in signed 64 bits, a
    float if either is a float; ``NotANumberError`` when ``base`` is not a number,
    ``InvalidArgumentError`` when the result leaves the signed 64-bit range or overflows."""
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise NotANumberError(f"key {key!r} holds a {type(base).__name__}, not a number")
    if isinstance(base, int) and isinstance(amount, int):
        result = base + amount
        if not INT64_MIN <= result <= INT64_MAX:
            raise InvalidArgumentError(f"incr of key {key!r} would leave the signed 64-bit range")
        return result
    try:
        total = float(base) + float(amount)
    except OverflowError:  # a stored integer too large for a float
        total = math.inf
    if not math.isfinite(total):
        raise InvalidArgumentError(f"incr of key {key!r} would overflow a float")
    return total


#: From the epoch up to this many milliseconds (about the year 2109), ``ms / 1000`` as a float
#: still rounds to the right microsecond.
_FLOAT_EXACT_MS = 2**42
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def utc_from_ms(ms: int) -> datetime:
    """A timestamp in milliseconds since the epoch as an aware UTC datetime (how SQLite and
    Redis keep timestamps), exact to the microsecond: the float division is exact enough
    from 1970 until about the year 2109; elsewhere (far expiries, up to year 9999) it goes
    through a ``timedelta``, which is exact."""
    if 0 <= ms < _FLOAT_EXACT_MS:
        return datetime.fromtimestamp(ms / 1000.0, timezone.utc)
    return _EPOCH + timedelta(milliseconds=ms)
