"""The Redis entry string: the one reader (and writer) of its format.

An entry ``fm:{<ns>}:e:<key>`` is one STRING (see ``lua/kv/_lib.lua``, which writes it):

* a 19-byte header, struct ``>BI6I6I6``: the length of the partition name (1 byte), the
  version, the created and the updated time (ms since the epoch; 6 bytes each, big-endian);
* the partition name (UTF-8; empty for ``default``);
* the stored JSON: ``"!" + JSON`` when it holds a run of 19+ digits (a number orjson might
  not read exactly), read back with ``decode_value``; any other is read with orjson directly,
  which skips ``decode_value``'s scan of every value read.

The expiry is the key's native TTL, not part of the string: readers pass ``PEXPIRETIME``.
Scripts that write entries answer with the parts (version, created, updated, partition,
expires), which :func:`entry_meta` turns into an ``EntryMeta``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from fleetmem._codec import decode_value, needs_exact_decoder, utc_from_ms
from fleetmem._validate import DEFAULT_PARTITION
from fleetmem.backends.seam import EntryMeta
from fleetmem.protocol import Entry

__all__ = [
    "HEADER_SIZE",
    "datetime_ms",
    "entry_meta",
    "entry_value",
    "entry_values",
    "export_lines",
    "mark_payload",
    "ms_datetime",
    "parse_entries",
    "parse_entry",
    "partition_name",
    "stored_value",
    "verbatim_json",
]

#: Bytes of the binary header before the partition name.
HEADER_SIZE = 19
#: The header as ``struct`` reads it: each 6-byte number as its high 2 and low 4 bytes.
_HEADER = struct.Struct(">BHIHIHI")
_EXACT = 33  # "!": the JSON after it needs decode_value
_UTC = timezone.utc
_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)
_MS = timedelta(milliseconds=1)


def mark_payload(payload: bytes) -> bytes:
    """``payload`` (JSON) as stored: "!"-prefixed when only ``decode_value`` reads it exactly."""
    return b"!" + payload if needs_exact_decoder(payload) else payload


def entry_value(raw: bytes) -> Any:
    """The value of an entry string."""
    start = 19 + raw[0]
    if raw[start] == _EXACT:
        return decode_value(raw[start + 1 :])
    return orjson.loads(memoryview(raw)[start:])


def stored_value(stored: bytes) -> Any:
    """The value of a stored JSON (as ``mark_payload`` made it): the change feed keeps the
    stored form of each value it records."""
    if stored[:1] == b"!":
        return decode_value(stored[1:])
    return orjson.loads(stored)


def entry_values(raws: Iterable[bytes | None], missing: Any) -> list[Any]:
    """The values of entry strings (an ``MGET`` reply), ``missing`` for each None."""
    loads = orjson.loads
    out: list[Any] = []
    append = out.append
    for raw in raws:
        if raw is None:
            append(missing)
            continue
        at = 19 + raw[0]  # entry_value(), inlined: one call per batch, not per value
        append(loads(raw[at:]) if raw[at] != _EXACT else decode_value(raw[at + 1 :]))
    return out


#: Below this many milliseconds (2**33 s, the year 2242) a float of seconds is within half a
#: microsecond of every millisecond, so ``utc_from_ms`` (the faster path) is exact.
_FLOAT_EXACT_MS = 2**33 * 1000


def ms_datetime(ms: int) -> datetime:
    """A time in milliseconds since the epoch as an aware UTC datetime, exactly: far dates
    (an expiry in the year 9999, as an import may carry) are computed without a float."""
    if ms < _FLOAT_EXACT_MS:
        return utc_from_ms(ms)
    return _EPOCH + timedelta(milliseconds=ms)


def datetime_ms(at: datetime) -> int:
    """An aware datetime as whole milliseconds since the epoch, rounded down (the precision
    of every time Redis keeps: ``PXAT``, ``PEXPIRETIME``, the header's timestamps)."""
    return (at - _EPOCH) // _MS


def partition_name(raw: bytes | str) -> str:
    """A stored partition name ("" is ``default``)."""
    name = raw.decode() if isinstance(raw, bytes) else raw
    return name or DEFAULT_PARTITION


def entry_meta(ver: int, created: int, updated: int, part: bytes, expires: int) -> EntryMeta:
    """An ``EntryMeta`` from an entry's parts (ms timestamps; ``expires`` < 0: none)."""
    return EntryMeta(
        partition_name(part),
        int(ver),
        ms_datetime(created),
        ms_datetime(updated),
        None if expires < 0 else ms_datetime(expires),
    )


def parse_entry(key: str, raw: bytes, expires: int) -> Entry:
    """An ``Entry`` from an entry string and its ``PEXPIRETIME`` (ms; < 0: none)."""
    from_bytes = int.from_bytes
    return Entry(
        key,
        entry_value(raw),
        *entry_meta(
            from_bytes(raw[1:7], "big"),
            from_bytes(raw[7:13], "big"),
            from_bytes(raw[13:19], "big"),
            raw[19 : 19 + raw[0]],
            expires,
        ),
    )


def parse_entries(flat: list[Any], start: int) -> list[Entry]:
    """The entries of a script reply holding ``key, entry string, PEXPIRETIME`` triples from
    ``flat[start]`` on (the export's pages): :func:`parse_entry` for each, inlined, the header
    read with one ``struct`` call, one datetime made per distinct millisecond (entries written
    together share their times)."""
    out: list[Entry] = []
    append = out.append
    loads = orjson.loads
    unpack = _HEADER.unpack_from
    times: dict[int, datetime] = {}
    known = times.get
    for i in range(start, len(flat), 3):
        raw = flat[i + 1]
        plen, v_hi, v_lo, c_hi, c_lo, u_hi, u_lo = unpack(raw)
        at = 19 + plen
        c = c_hi << 32 | c_lo
        created = known(c)
        if created is None:
            created = times[c] = ms_datetime(c)
        u = u_hi << 32 | u_lo
        updated = created if u == c else known(u)
        if updated is None:
            updated = times[u] = ms_datetime(u)
        ms = flat[i + 2]
        expires = None
        if ms >= 0:
            expires = known(ms)
            if expires is None:
                expires = times[ms] = ms_datetime(ms)
        append(
            Entry(
                flat[i].decode(),
                loads(raw[at:]) if raw[at] != _EXACT else decode_value(raw[at + 1 :]),
                raw[19:at].decode() if plen else DEFAULT_PARTITION,
                v_hi << 32 | v_lo,
                created,
                updated,
                expires,
            )
        )
    return out


# An export's lines straight from the scan script's replies (``RedisKV.export_lines``).

#: An export line (``fleetmem.portability``'s format), its fields in ``_entry_line``'s order.
_EXPORT_LINE = (
    b'{"key":%b,"value":%b,"partition":%b,"version":%d,'
    b'"created_at":%b,"updated_at":%b,"expires_at":%b}\n'
)
#: First bytes of a stored JSON written as is: an object, an array, a string, true, false,
#: null. A bare number may be ``incr``'s (Lua's formatting, ``1e+15``): rendered by orjson.
_VERBATIM = frozenset(b'{["tfn')
#: Digits in a row from which a stored JSON may hold a float the codec wrote as a plain
#: decimal (``10000000000000000.0``: 1e16 or more), which orjson writes otherwise (``1e16``).
_LONG_RUN = 17
_DIGITS = b"0123456789"
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_ZEROS = b"0" * _LONG_RUN
_DEFAULT_PART = orjson.dumps(DEFAULT_PARTITION)
#: Entries between clearings of the caches of formatted times (their size bound).
_TIME_CACHE = 65_536


def verbatim_json(payload: bytes) -> bool:
    """Whether the stored JSON ``payload`` (after the header and partition, ``"!"`` marker
    included) is byte for byte what orjson writes for the value it decodes to -- so an export
    line may carry it as is.

    Every value is stored as :func:`~fleetmem._codec.encode_value` writes it: orjson's compact
    JSON, except a value holding an integer beyond 64 bits (``"!"``-marked: 19+ digits in a
    row) or a float of 1e16 or more (a plain decimal with ``.0``), and ``incr``'s results (a
    bare number formatted by Lua). Those, and anything holding 17 digits in a row, answer
    False (a few values orjson would write the same way included: a false answer only costs
    the slower rendering)."""
    if not payload or payload[0] not in _VERBATIM:
        return False
    return len(payload) - len(payload.translate(None, _DIGITS)) < _LONG_RUN or (
        payload.translate(_DIGITS_TO_ZERO).find(_ZEROS) < 0
    )


def _second_text(second: int) -> bytes:
    """``"YYYY-MM-DDTHH:MM:SS.`` of a second since the epoch (UTC, the opening quote)."""
    moment = _EPOCH + timedelta(seconds=second)
    return b'"' + moment.isoformat()[:19].encode() + b"."


def export_lines(
    flat: list[Any],
    start: int,
    keys: list[str],
    out: bytearray,
    render: Callable[[Entry], bytes],
    times: dict[int, bytes],
) -> None:
    """Append to ``keys`` and ``out`` the keys and the export lines of the ``key, entry string,
    PEXPIRETIME`` triples of a ``scan`` reply from ``flat[start]`` on (what
    :func:`parse_entries` reads): exactly ``render(parse_entry(...))`` for each entry, without
    building the ``Entry`` or its datetimes when the stored JSON can be written as is
    (:func:`verbatim_json`); ``render`` writes the others.

    A time (ms since the epoch) is written as ``_entry_line`` writes its datetime:
    ``YYYY-MM-DDTHH:MM:SS.mmm000Z``, quoted; ``times`` caches them, by millisecond and by
    second (negative keys), across the calls of one export."""
    append = keys.append
    unpack = _HEADER.unpack_from
    dumps = orjson.dumps
    known = times.get
    parts: dict[bytes, bytes] = {}
    line = _EXPORT_LINE
    if len(times) > _TIME_CACHE:
        times.clear()
    for i in range(start, len(flat), 3):
        key = flat[i].decode()
        append(key)
        raw = flat[i + 1]
        plen, v_hi, v_lo, c_hi, c_lo, u_hi, u_lo = unpack(raw)
        at = 19 + plen
        payload = raw[at:]
        if not verbatim_json(payload):
            out += render(parse_entry(key, raw, flat[i + 2]))
            continue
        if plen:
            name = raw[19:at]
            part = parts.get(name)
            if part is None:
                part = parts[name] = dumps(name.decode())
        else:
            part = _DEFAULT_PART
        c = c_hi << 32 | c_lo
        created = known(c)
        if created is None:
            created = times[c] = _time_text(c, times)
        u = u_hi << 32 | u_lo
        updated = created if u == c else known(u)
        if updated is None:
            updated = times[u] = _time_text(u, times)
        ms = flat[i + 2]
        expires = b"null" if ms < 0 else known(ms)
        if expires is None:
            expires = times[ms] = _time_text(ms, times)
        out += line % (dumps(key), payload, part, v_hi << 32 | v_lo, created, updated, expires)


def _time_text(ms: int, times: dict[int, bytes]) -> bytes:
    """``ms`` as ``"YYYY-MM-DDTHH:MM:SS.mmm000Z"`` (quoted), its second cached in ``times``
    under ``-1 - second``."""
    second, milli = divmod(ms, 1000)
    head = times.get(-1 - second)
    if head is None:
        head = times[-1 - second] = _second_text(second)
    return b'%b%03d000Z"' % (head, milli)
