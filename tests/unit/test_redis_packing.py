"""RedisStore's own clients pack commands in C (hiredis): the bytes must be redis-py's."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("hiredis")

from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from fleetmem.backends.redis import RedisStore
from fleetmem.backends.redis.connector import _C_PACK_LIMIT, _in_front, _PackInC

COMMANDS: list[tuple[Any, ...]] = [
    ("GET", "k"),
    ("MGET", *[f"fm:{{ns}}:e:key-{i}" for i in range(500)]),
    ("FCALL", b"fm_0123_set", b"1", b"fm:{ns}:", "clé-ünï", b'{"a":[1,2.5,null]}'),
    ("SCRIPT LOAD", "return 1"),  # a two-word name is two arguments
    ("SET", "k", b"v", "PX", 1500),  # an int: redis-py packs it
    ("INCRBYFLOAT", "k", 0.1),
    ("SET", "big", b"x" * (_C_PACK_LIMIT + 1)),  # too big for one copy: redis-py
    ("SET", "empty", b""),
    ("SET", memoryview(b"view"), b"v"),
]


def _packed(conn: Any, args: tuple[Any, ...]) -> bytes:
    return b"".join(bytes(part) for part in conn.pack_command(*args))


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
def test_c_packing_writes_what_redis_py_writes(args: tuple[Any, ...]) -> None:
    assert _packed(_in_front(_PackInC, Connection)(), args) == _packed(Connection(), args)


def test_what_hiredis_refuses_goes_to_redis_py() -> None:
    fast, plain = _in_front(_PackInC, Connection)(), Connection()
    for bad in (True, None):
        with pytest.raises(DataError):
            fast.pack_command("SET", "k", bad)
    assert _packed(fast, ("SET", "k", bytearray(b"x"))) == _packed(plain, ("SET", "k", b"x"))
    with pytest.raises(UnicodeEncodeError):
        fast.pack_command("SET", "k", "\ud800")


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:1/0", Connection),
        ("rediss://127.0.0.1:1/0", SSLConnection),
        ("unix:///tmp/fleetmem-none.sock", UnixDomainSocketConnection),
    ],
)
def test_own_clients_pack_in_c_over_every_transport(url: str, base: type[Any]) -> None:
    store = RedisStore.from_url(url)
    cls = store.client.connection_pool.connection_class
    assert issubclass(cls, base) and cls is not base
    assert cls.pack_command is not base.pack_command
    assert _packed(cls(), ("GET", "k")) == _packed(base(), ("GET", "k"))


def test_a_client_with_another_encoding_keeps_redis_pys_packer() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0?encoding=latin-1")
    assert store.client.connection_pool.connection_class is Connection
