"""Without hiredis (an optional speed-up): HybridStore builds, fills and hits its cache.

The hybrid tier packs its hot-path commands itself with ``pack_command``; without hiredis that
was None and building a HybridStore raised TypeError. The pure-Python packer must write
exactly hiredis's bytes, and a store on it must work end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from fleetmem.testing.servers import PostgresServer, RedisServer

pytestmark = [pytest.mark.hybrid, pytest.mark.postgres, pytest.mark.redis]

COMMANDS: list[tuple[Any, ...]] = [
    ("GET", "k"),
    (b"MGET", b"fmh:{ns}:E", b"fmh:{ns}:R"),
    ("EVALSHA", b"0123abcd", b"2", b"fmh:{ns}:E", b"fmh:{ns}:k:a", "tok-1", b"5000"),
    ("FCALL", b"fm_0123_kv_set", b"1", b"fm:{ns}:", "clé-ünï", b'{"a":[1,2.5,null]}'),
    ("SET", "k", b"v", "PX", 1500),
    ("SET", "empty", b""),
    ("SET", memoryview(b"view"), b"v"),
]

_CHILD = textwrap.dedent(
    """
    import ast, asyncio, json, sys

    sys.modules["hiredis"] = None  # "import hiredis" raises ImportError from now on
    from fleetmem.backends.hybrid import HybridStore
    from fleetmem.backends.redis import connector, pack_command

    async def main() -> None:
        dsn, url, namespace, commands = sys.argv[1:5]
        store = HybridStore.from_urls(dsn, url, namespace=namespace)  # TypeError before the fix
        await store.connect()
        try:
            await store.set("k", {"x": [1, 2.5, None]})
            first = await store.get("k")  # a miss: read from PostgreSQL, fills the cache
            hits = store.metrics.hits
            second = await store.get("k")  # served by Redis
            hits = store.metrics.hits - hits
        finally:
            await store.close()
        view = lambda a: memoryview(bytes(a)) if isinstance(a, list) else a
        packed = [
            pack_command(tuple(map(view, cmd))).hex() for cmd in ast.literal_eval(commands)
        ]
        print(json.dumps({
            "hiredis": connector._hiredis_pack is not None,
            "values": [first, second],
            "hits": hits,
            "packed": packed,
        }))

    asyncio.run(main())
    """
)


def _literal(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` as ``ast.literal_eval`` reads it (a memoryview as a list of its bytes)."""
    return tuple(list(bytes(a)) if isinstance(a, memoryview) else a for a in args)


def test_hybrid_store_works_without_hiredis(
    fleetmem_postgres_server: PostgresServer,
    fleetmem_redis_server: RedisServer,
    fleetmem_namespace: str,
) -> None:
    hiredis = pytest.importorskip("hiredis")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            fleetmem_postgres_server.dsn,
            fleetmem_redis_server.url,
            fleetmem_namespace,
            repr([_literal(c) for c in COMMANDS]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["hiredis"] is False
    assert result["values"] == [{"x": [1, 2.5, None]}] * 2
    assert result["hits"] == 1
    expected = [hiredis.pack_command(args).hex() for args in COMMANDS]
    assert result["packed"] == expected
