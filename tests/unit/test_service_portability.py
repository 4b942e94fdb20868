"""The portability routes: streamed export and import, snapshots, diff and restore.

In process through ``httpx.ASGITransport`` (which buffers a streamed body: fine for what an
export holds), plus one export over a real uvicorn to see it stream; memory and SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn

from fleetmem import open_store, portability
from fleetmem.errors import BackendUnavailableError
from fleetmem.protocol import Entry
from fleetmem.service import create_app
from fleetmem.service.app import state_of_app
from fleetmem.service.auth import TokenTable, make_entry, new_token
from fleetmem.service.context import ServiceSettings, ServiceState
from fleetmem.service.portability import SpillBuffer
from fleetmem.store import Store

NS = "/v1/ns/fleet"


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store[Any]]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/fleet.db"
    async with open_store(url, namespace="fleet") as opened:
        yield opened


@contextlib.asynccontextmanager
async def in_process(
    store: Store[Any], **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, ServiceState]]:
    app = create_app(store, metrics=False, **options)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=cast(Any, app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, state_of_app(app)


async def library_export(store: Store[Any], **options: Any) -> bytes:
    out = io.BytesIO()
    await store.export_to(out, **options)
    return out.getvalue()


def without_time(export: bytes) -> list[Any]:
    """The export's lines as JSON, the header without its ``exported_at``."""
    lines = [json.loads(line) for line in export.splitlines()]
    del lines[0]["exported_at"]
    return lines


def entries(export: bytes) -> list[tuple[Any, ...]]:
    """What an import carries over: key, value, partition, expires_at."""
    lines = [json.loads(line) for line in export.splitlines()[1:-1]]
    return [(d["key"], d["value"], d["partition"], d["expires_at"]) for d in lines]


async def fill(store: Store[Any]) -> None:
    await store.set("a", {"nested": [1, 2.5, None, True]})
    await store.set("big", 2**80)
    await store.set("ttl", "soon", ttl=3600)
    await store.set("p/1", "one", partition="p")
    await store.set("p/2", "two", partition="p")
    await store.set("ünïcode/键", "é")


async def test_export_import_round_trip(store: Store[Any]) -> None:
    await fill(store)
    async with in_process(store) as (client, _):
        r = await client.get(f"{NS}/export")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/jsonl")
        exported = r.content
        assert without_time(exported) == without_time(await library_export(store))
        assert json.loads(exported.splitlines()[-1])["count"] == 6

        # prefix and partition
        r = await client.get(f"{NS}/export", params={"prefix": "p/"})
        assert [e[0] for e in entries(r.content)] == ["p/1", "p/2"]
        assert without_time(r.content) == without_time(await library_export(store, prefix="p/"))
        r = await client.get(f"{NS}/export", params={"partition": "p"})
        assert [e[0] for e in entries(r.content)] == ["p/1", "p/2"]

        # into another namespace, through HTTP
        await store.with_namespace("copy").set("stale", 1)
        r = await client.post("/v1/ns/copy/import", params={"mode": "replace"}, content=exported)
        assert r.status_code == 200, r.text
        assert r.json() == {"written": 6, "skipped_expired": 0, "skipped_existing": 0}
        copied = await library_export(store.with_namespace("copy"))
        assert entries(copied) == entries(exported)

        # missing mode skips what exists; merge (the default) writes it all
        r = await client.post("/v1/ns/copy/import", params={"mode": "missing"}, content=exported)
        assert r.json() == {"written": 0, "skipped_expired": 0, "skipped_existing": 6}
        r = await client.post("/v1/ns/copy/import", content=exported)
        assert r.json() == {"written": 6, "skipped_expired": 0, "skipped_existing": 0}
        entry = await store.with_namespace("copy").get_entry("a")
        assert entry is not None and entry.version == 2  # replace wrote 1, merge 2
        assert entry.value == {"nested": [1, 2.5, None, True]}


async def test_export_refusals(store: Store[Any]) -> None:
    async with in_process(store) as (client, _):
        for params, status, kind in (
            ({"snapshot": "nope"}, 404, "snapshot-not-found"),
            ({"partition": ""}, 400, None),
            ({"prefix": "\x01"}, 400, "invalid-key"),
            ({"snapshot": ""}, 400, "invalid-key"),
        ):
            r = await client.get(f"{NS}/export", params=params)
            assert r.status_code == status, (params, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            if kind is not None:
                assert r.json()["type"] == kind


async def test_import_refusals_write_nothing(store: Store[Any]) -> None:
    await fill(store)
    exported = await library_export(store)
    lines = exported.splitlines(keepends=True)
    target = store.with_namespace("copy")
    settings = ServiceSettings(max_import_bytes=len(exported) + 100)
    async with in_process(store, settings=settings) as (client, _):
        corrupt = b"".join([*lines[:3], b'{"key": "x", "value": \n', *lines[3:]])
        r = await client.post("/v1/ns/copy/import", content=corrupt)
        assert r.status_code == 400
        problem = r.json()
        assert problem["type"] == "invalid-export" and problem["line"] == 4
        # no trailer: the truncated file names the line where it ended
        r = await client.post("/v1/ns/copy/import", content=b"".join(lines[:-1]))
        assert r.status_code == 400 and r.json()["type"] == "invalid-export"
        assert "trailer" in r.json()["detail"] and isinstance(r.json()["line"], int)
        r = await client.post("/v1/ns/copy/import", content=b"")
        assert r.status_code == 400 and r.json()["type"] == "invalid-export"
        r = await client.post("/v1/ns/copy/import", params={"mode": "clobber"}, content=exported)
        assert r.status_code == 400
        r = await client.post("/v1/ns/copy/import", content=exported + b"x" * 200)
        assert r.status_code == 413

        assert await target.keys() == []
        # the cap leaves room for the file itself
        r = await client.post("/v1/ns/copy/import", content=exported)
        assert r.status_code == 200
        assert len(await target.keys()) == 6


async def test_import_body_without_length_over_the_cap() -> None:
    async with open_store("memory://", namespace="fleet") as store:
        await fill(store)
        exported = await library_export(store)
        settings = ServiceSettings(max_import_bytes=len(exported) + 100)
        async with in_process(store, settings=settings) as (client, _):

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
                yield exported
                yield b"x" * 200

            r = await client.post("/v1/ns/copy/import", content=chunks())
            assert r.status_code == 413
            assert await store.with_namespace("copy").keys() == []


async def test_snapshots_lifecycle(store: Store[Any]) -> None:
    await fill(store)
    async with in_process(store) as (client, _):
        assert (await client.get(f"{NS}/snapshots")).json() == {"snapshots": []}
        r = await client.post(f"{NS}/snapshots", json={"name": "runs/42/before"})
        assert r.status_code == 201
        snap = r.json()
        assert snap["name"] == "runs/42/before" and snap["keys"] == 6 and snap["bytes"] > 0
        assert snap["created_at"].endswith("Z")
        r = await client.post(f"{NS}/snapshots", json={"name": "runs/42/before"})
        assert r.status_code == 409 and r.json()["type"] == "snapshot-exists"
        for body in ({"name": ""}, {"name": "\x01"}, {}, {"name": "x", "other": 1}):
            r = await client.post(f"{NS}/snapshots", json=body)
            assert r.status_code == 400, body

        # read it: the name with '/' written as is or as %2F
        for path in ("runs/42/before", "runs%2F42%2Fbefore"):
            r = await client.get(f"{NS}/snapshots/{path}")
            assert r.status_code == 200 and r.json() == snap
        assert (await client.get(f"{NS}/snapshots/runs/42")).status_code == 404

        # change the live namespace, diff, snapshot again, diff two snapshots
        await store.set("a", "changed")
        await store.delete("big")
        await store.set("new", 1)
        r = await client.get(f"{NS}/snapshots/runs/42/before/diff")
        assert r.status_code == 200
        assert r.json() == {"added": ["new"], "removed": ["big"], "changed": ["a"]}
        r = await client.post(f"{NS}/snapshots", json={"name": "after"})
        assert r.status_code == 201
        r = await client.get(f"{NS}/snapshots/runs%2F42%2Fbefore/diff", params={"against": "after"})
        assert r.json() == {"added": ["new"], "removed": ["big"], "changed": ["a"]}
        r = await client.get(f"{NS}/snapshots/after/diff", params={"against": "nope"})
        assert r.status_code == 404
        listed = (await client.get(f"{NS}/snapshots")).json()["snapshots"]
        assert [s["name"] for s in listed] == ["runs/42/before", "after"]

        # an export by snapshot name holds what it held
        r = await client.get(f"{NS}/export", params={"snapshot": "runs/42/before"})
        assert r.status_code == 200
        assert json.loads(r.content.splitlines()[0])["snapshot"] == "runs/42/before"
        assert [e[0] for e in entries(r.content)] == ["a", "big", "p/1", "p/2", "ttl", "ünïcode/键"]

        # restore
        r = await client.post(f"{NS}/snapshots/runs/42/before/restore")
        assert r.status_code == 200 and r.json() == {"restored": 6}
        assert await store.get("a") == {"nested": [1, 2.5, None, True]}
        assert await store.get("big") == 2**80
        assert await store.get("new") is None
        r = await client.get(f"{NS}/snapshots/runs/42/before/diff")
        assert r.json() == {"added": [], "removed": [], "changed": []}
        assert (await client.post(f"{NS}/snapshots/nope/restore")).status_code == 404
        assert (await client.post(f"{NS}/snapshots/runs/42/before")).status_code == 400

        # delete
        r = await client.delete(f"{NS}/snapshots/runs%2F42/before")
        assert r.status_code == 200 and r.json() == {"deleted": True}
        r = await client.delete(f"{NS}/snapshots/runs/42/before")
        assert r.status_code == 404 and r.json()["type"] == "snapshot-not-found"
        assert (await client.get(f"{NS}/snapshots/runs/42/before")).status_code == 404
        names = [s["name"] for s in (await client.get(f"{NS}/snapshots")).json()["snapshots"]]
        assert names == ["after"]

        # a name that ends in a verb: restored and deleted like any other
        assert (await client.post(f"{NS}/snapshots", json={"name": "x/restore"})).status_code == 201
        r = await client.post(f"{NS}/snapshots/x/restore/restore")
        assert r.status_code == 200 and r.json() == {"restored": 6}
        assert (await client.delete(f"{NS}/snapshots/x/restore")).status_code == 200


async def test_scopes(store: Store[Any]) -> None:
    reader, admin = new_token(), new_token()
    table = TokenTable([make_entry(reader, ["fleet"], "read"), make_entry(admin, ["*"], "admin")])
    await fill(store)
    await store.snapshots.create("s")
    exported = await library_export(store)
    as_reader = {"Authorization": f"Bearer {reader}"}
    as_admin = {"Authorization": f"Bearer {admin}"}
    async with in_process(store, tokens=table) as (client, _):
        for method, path in (
            ("GET", "export"),
            ("GET", "snapshots"),
            ("GET", "snapshots/s"),
            ("GET", "snapshots/s/diff"),
        ):
            r = await client.request(method, f"{NS}/{path}", headers=as_reader)
            assert r.status_code == 200, (method, path)
            r = await client.request(method, f"/v1/ns/other/{path}", headers=as_reader)
            assert r.status_code == 403, (method, path)
            assert (await client.request(method, f"{NS}/{path}")).status_code == 401
        r = await client.post(f"{NS}/snapshots", json={"name": "t"}, headers=as_reader)
        assert r.status_code == 403
        r = await client.post(f"{NS}/snapshots/s/restore", headers=as_reader)
        assert r.status_code == 403
        r = await client.delete(f"{NS}/snapshots/s", headers=as_reader)
        assert r.status_code == 403
        r = await client.post(f"{NS}/import", content=exported, headers=as_reader)
        assert r.status_code == 403
        r = await client.post(f"{NS}/import", content=exported, headers=as_admin)
        assert r.status_code == 200


# ------------------------------------------------------------------ streaming over uvicorn


@contextlib.asynccontextmanager
async def serve(store: Store[Any]) -> AsyncIterator[str]:
    app = create_app(store, metrics=False)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while not server.started:
            if task.done():
                task.result()
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_export_streams_pages_and_a_failure_leaves_no_trailer(
    store: Store[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(portability, "EXPORT_PAGE", 100)  # pages of 100 entries
    n = 450
    await store.set_many({f"k{i:06d}": {"i": i, "pad": "x" * 20} for i in range(n)})
    expected = await library_export(store)
    async with serve(store) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        body = bytearray()
        chunks = 0
        async with client.stream("GET", f"{NS}/export") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                body += chunk
                chunks += 1
        assert chunks > 1
        assert without_time(bytes(body)) == without_time(expected)

        # A client that goes away early: the server carries on serving.
        async with client.stream("GET", f"{NS}/export") as response:
            async for _ in response.aiter_raw():
                break
        assert (await client.get(f"{NS}/snapshots")).status_code == 200

        # The backend fails after the first page, once the response has started: the status
        # is sent, and the body ends without its trailer.
        original = store.kv.export_lines
        started = asyncio.Event()

        def failing(
            prefix: str, partition: str | None, page_size: int, render: Callable[[Entry], bytes]
        ) -> AsyncGenerator[tuple[list[str], bytearray], None]:
            async def pages() -> AsyncGenerator[tuple[list[str], bytearray], None]:
                async for page in original(prefix, partition, page_size, render):
                    yield page
                    await started.wait()
                    raise BackendUnavailableError("the backend went away")

            return pages()

        monkeypatch.setattr(store.kv, "export_lines", failing)
        async with client.stream("GET", f"{NS}/export") as response:
            assert response.status_code == 200
            started.set()
            truncated = await response.aread()
        lines = truncated.splitlines()
        assert len(lines) == 1 + 100  # the header and one page, no trailer
        assert "end" not in json.loads(lines[-1])

        # A failure before the first page is still a problem (the status is not sent yet).
        def broken(*args: Any) -> AsyncGenerator[tuple[list[str], bytearray], None]:
            async def pages() -> AsyncGenerator[tuple[list[str], bytearray], None]:
                raise BackendUnavailableError("the backend went away")
                yield  # type: ignore[unreachable]  # an async generator

            return pages()

        monkeypatch.setattr(store.kv, "export_lines", broken)
        r = await client.get(f"{NS}/export")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/problem+json"
        monkeypatch.setattr(store.kv, "export_lines", original)
        r = await client.post("/v1/ns/copy/import", content=truncated)
        assert r.status_code == 400 and r.json()["type"] == "invalid-export"
        assert "trailer" in r.json()["detail"]
        assert await store.with_namespace("copy").keys() == []


# ------------------------------------------------------------------ the spill buffer


async def test_spill_buffer_keeps_order_and_spills_beyond_its_memory() -> None:
    buffer = SpillBuffer(memory=10)
    assert buffer.write(b"") == 0 and buffer.read() == b""
    out = bytearray()
    written = bytearray()
    for i in range(200):
        data = bytes([65 + i % 26]) * (i % 7 + 1)
        written += data
        assert buffer.write(bytearray(data)) == len(data)
        if i % 3 == 0:  # a reader slower than the writer
            out += buffer.read()
        if i == 20:
            assert buffer._file is not None  # spilled
    while chunk := buffer.read():
        out += chunk
    assert bytes(out) == bytes(written)
    assert buffer._file is None  # caught up: the file is gone
    assert buffer.total == len(written)
    buffer.write(b"again")
    assert buffer.read() == b"again"
    buffer.close()
