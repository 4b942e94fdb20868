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
from collections.abc import Iterable
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
    "mark_payload",
    "ms_datetime",
    "parse_entries",
    "parse_entry",
    "partition_name",
    "stored_value",
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
