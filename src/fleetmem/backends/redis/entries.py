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

from collections.abc import Iterable
from datetime import timezone
from typing import Any

import orjson

from fleetmem._codec import decode_value, needs_exact_decoder, utc_from_ms
from fleetmem._validate import DEFAULT_PARTITION
from fleetmem.backends.seam import EntryMeta
from fleetmem.protocol import Entry

__all__ = [
    "HEADER_SIZE",
    "entry_meta",
    "entry_value",
    "entry_values",
    "mark_payload",
    "ms_datetime",
    "parse_entry",
    "partition_name",
    "stored_value",
]

#: Bytes of the binary header before the partition name.
HEADER_SIZE = 19
_EXACT = 33  # "!": the JSON after it needs decode_value
_UTC = timezone.utc


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


ms_datetime = utc_from_ms


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
