"""The change-feed routes: SSE watch over a real uvicorn, paged reads, enable/disable.

The SSE tests run a real uvicorn on a free port (``httpx.ASGITransport`` buffers a streamed
response whole), parametrized over the memory and SQLite backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn

from fleetmem import open_store
from fleetmem.service import create_app
from fleetmem.service.app import state_of_app
from fleetmem.service.context import ServiceSettings, ServiceState
from fleetmem.store import Store

NS = "/v1/ns/fleet"
DEADLINE = 10.0


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store[Any]]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/fleet.db"
    async with open_store(url, namespace="fleet") as opened:
        yield opened


class Served:
    def __init__(self, base: str, state: ServiceState) -> None:
        self.base = base
        self.state = state

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, timeout=DEADLINE)


@contextlib.asynccontextmanager
async def serve(store: Store[Any], **settings: Any) -> AsyncIterator[Served]:
    app = create_app(store, metrics=False, settings=ServiceSettings(**settings))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_level="warning",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not server.started:
            if task.done():
                task.result()
            assert asyncio.get_running_loop().time() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://127.0.0.1:{port}", state_of_app(app))
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, DEADLINE)


class Events:
    """The SSE events of a streamed response: dicts of ``id``, ``event``, ``data``, or a
    ``comment`` for a comment line."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = DEADLINE) -> dict[str, str] | None:
        """The next event or comment; ``None`` when the stream ended."""
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> dict[str, str] | None:
        event: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if event:
                    return event
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")
        return event or None

    async def changes(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` change events (skipping keepalives), each its data with its id."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            event = await self.next()
            assert event is not None, f"the stream ended after {len(out)} of {n} changes"
            if "comment" in event:
                continue
            assert event["event"] == "change", event
            data = json.loads(event["data"])
            assert data["cursor"] == event["id"]
            out.append(data)
        return out


async def wait_for(predicate: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
        await asyncio.sleep(0.02)


async def test_events_in_order_with_cursor_ids_and_filters(store: Store[Any]) -> None:
    await store.changes.enable()
    await store.set("before", 0)  # before the stream: not sent (it starts at the head)
    async with serve(store) as served, served.client() as client:
        async with client.stream("GET", f"{NS}/changes/watch") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            events = Events(response)
            ready = await events.next()
            assert ready is not None and ready["event"] == "ready"
            assert json.loads(ready["data"]) == {"cursor": ready["id"]}
            await store.set("a", 1)
            await store.set("b", {"x": [1, 2]}, ttl=60, partition="p")
            await store.expire("a", 30)
            await store.delete("a")
            await store.clear()
            got = await events.changes(5)
        assert [(c["op"], c["key"]) for c in got] == [
            ("set", "a"),
            ("set", "b"),
            ("ttl", "a"),
            ("delete", "a"),
            ("clear", None),
        ]
        cursors = [c["cursor"] for c in got]
        assert cursors == sorted(cursors) and len(set(cursors)) == 5
        assert cursors[0] > ready["id"]
        assert got[1]["value"] == {"x": [1, 2]} and got[1]["partition"] == "p"
        assert got[1]["version"] == 1 and got[1]["expires_at"] is not None
        assert got[0]["at"].endswith("Z") and got[3]["value"] is None
        # The same changes, read as a page, carry the same cursors.
        page = (await client.get(f"{NS}/changes", params={"since": ready["id"]})).json()
        assert [c["cursor"] for c in page["changes"]] == cursors
        assert page["cursor"] == cursors[-1]

        # pattern, partition and since
        start = await store.changes.cursor()
        await store.set("results/1", 1)
        await store.set("plans/1", 1)
        await store.set("results/2", 2, partition="other")
        params = {"pattern": "results/*", "partition": "default", "since": start}
        async with client.stream("GET", f"{NS}/changes/watch", params=params) as response:
            events = Events(response)
            ready = await events.next()
            assert ready is not None and ready["id"] == start
            filtered = await events.changes(1)
            await store.set("plans/2", 2)
            await store.set("results/3", 3)
            await store.clear_partition("other")  # a clear always passes
            filtered += await events.changes(2)
        assert [(c["op"], c["key"]) for c in filtered] == [
            ("set", "results/1"),
            ("set", "results/3"),
            ("clear", None),
        ]
        assert filtered[2]["partition"] == "other"


async def test_reconnect_with_last_event_id_misses_and_repeats_nothing(store: Store[Any]) -> None:
    await store.changes.enable()
    async with serve(store) as served, served.client() as client:
        async with client.stream("GET", f"{NS}/changes/watch") as response:
            events = Events(response)
            await events.next()  # ready
            for i in range(5):
                await store.set(f"k{i}", i)
            first = await events.changes(3)  # the client drops with two changes unread
        await wait_for(lambda: not served.state.streams, "the stream's hold released")
        for i in range(5, 12):  # written while disconnected
            await store.set(f"k{i}", i)
        headers = {"Last-Event-ID": first[-1]["cursor"]}
        params = {"since": first[0]["cursor"]}  # overridden by Last-Event-ID
        async with client.stream(
            "GET", f"{NS}/changes/watch", headers=headers, params=params
        ) as response:
            events = Events(response)
            ready = await events.next()
            assert ready is not None and ready["id"] == first[-1]["cursor"]
            second = await events.changes(9)
            await store.set("k12", 12)
            second += await events.changes(1)
        keys = [c["key"] for c in first + second]
        assert keys == [f"k{i}" for i in range(13)]

        # A client that drops before any change resumes from the ready event's id.
        async with client.stream("GET", f"{NS}/changes/watch") as response:
            ready = await Events(response).next()
        assert ready is not None
        await store.set("missed?", 1)
        headers = {"Last-Event-ID": ready["id"]}
        async with client.stream("GET", f"{NS}/changes/watch", headers=headers) as response:
            events = Events(response)
            await events.next()
            assert [c["key"] for c in await events.changes(1)] == ["missed?"]


async def test_heartbeat_cap_and_error_event(store: Store[Any]) -> None:
    await store.changes.enable()
    async with (
        serve(store, sse_heartbeat=0.1, max_streams_per_token=1) as served,
        served.client() as client,
    ):
        async with client.stream("GET", f"{NS}/changes/watch") as response:
            events = Events(response)
            await events.next()
            # Idle: keepalive comments.
            for _ in range(2):
                assert await events.next() == {"comment": "keepalive"}
            # The token's one stream is taken.
            r = await client.get(f"{NS}/changes/watch")
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert r.json()["type"] == "too-many-requests"
            assert served.state.streams == {"-": 1}
            await store.set("a", 1)
            assert [c["key"] for c in await events.changes(1)] == ["a"]
            # Disabled meanwhile: the stream ends with an error event holding the problem.
            await store.changes.disable()
            event = await events.next()
            while event is not None and "comment" in event:
                event = await events.next()
            assert event is not None and event["event"] == "error"
            problem = json.loads(event["data"])
            assert problem["status"] == 409 and problem["type"] == "changes-not-enabled"
            assert await events.next() is None  # the stream ended
        await wait_for(lambda: not served.state.streams, "the stream's hold released")
        await store.changes.enable()
        # A client that goes away releases its hold too.
        async with client.stream("GET", f"{NS}/changes/watch") as response:
            assert response.status_code == 200
            await Events(response).next()
        await wait_for(lambda: not served.state.streams, "the disconnected stream's hold")
        async with client.stream("GET", f"{NS}/changes/watch") as again:
            assert again.status_code == 200
            await Events(again).next()


async def test_stream_ends_on_shutdown(store: Store[Any]) -> None:
    await store.changes.enable()
    async with serve(store) as served, served.client() as client:
        async with client.stream("GET", f"{NS}/changes/watch") as response:
            events = Events(response)
            await events.next()
            await store.set("a", 1)
            await events.changes(1)
            served.state.shutting_down.set()
            assert await events.next() is None  # ends normally, no error event
        await wait_for(lambda: not served.state.streams, "the stream's hold released")


async def test_stream_ends_when_the_store_closes() -> None:
    async with open_store("memory://", namespace="fleet") as store:
        await store.changes.enable()
        async with (
            serve(store) as served,
            served.client() as client,
            client.stream("GET", f"{NS}/changes/watch") as response,
        ):
            events = Events(response)
            await events.next()
            await store.close()
            event = await events.next()
            while event is not None and "comment" in event:
                event = await events.next()
            assert event is None


# ------------------------------------------------------------------ in process


@contextlib.asynccontextmanager
async def in_process(store: Store[Any]) -> AsyncIterator[tuple[httpx.AsyncClient, ServiceState]]:
    app = create_app(store, metrics=False)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=cast(Any, app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, state_of_app(app)


async def test_enable_read_disable_and_refusals(store: Store[Any]) -> None:
    async with in_process(store) as (client, state):
        # Not enabled: 409 everywhere, before any stream starts.
        r = await client.get(f"{NS}/changes/watch")
        assert r.status_code == 409
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "changes-not-enabled"
        assert (await client.get(f"{NS}/changes")).status_code == 409
        assert (await client.get(f"{NS}/changes/cursor")).status_code == 409

        r = await client.post(f"{NS}/changes/enable", json={"retention": 120})
        assert r.status_code == 200 and r.json() == {"enabled": True}
        assert await store.changes.enabled()
        assert (await client.post(f"{NS}/changes/enable")).status_code == 200  # body optional
        for body in ({"retention": 0}, {"retention": -1}, {"retention": "x"}, {"other": 1}):
            r = await client.post(f"{NS}/changes/enable", json=body)
            assert r.status_code == 400, body
            assert r.headers["content-type"] == "application/problem+json"
        head = (await client.get(f"{NS}/changes/cursor")).json()["cursor"]
        assert head == await store.changes.cursor()
        for i in range(5):
            await store.set(f"k{i}", i)
        page = (await client.get(f"{NS}/changes", params={"since": head, "limit": 2})).json()
        assert [c["key"] for c in page["changes"]] == ["k0", "k1"]
        page = (await client.get(f"{NS}/changes", params={"since": page["cursor"]})).json()
        assert [c["key"] for c in page["changes"]] == ["k2", "k3", "k4"]
        last = page["cursor"]
        page = (await client.get(f"{NS}/changes", params={"since": last})).json()
        assert page == {"changes": [], "cursor": last}
        everything = (await client.get(f"{NS}/changes")).json()  # from the oldest retained
        assert [c["key"] for c in everything["changes"]] == [f"k{i}" for i in range(5)]
        filtered = (await client.get(f"{NS}/changes", params={"pattern": "k[13]"})).json()
        assert [c["key"] for c in filtered["changes"]] == ["k1", "k3"]
        for limit in (0, 10_001, "x"):
            r = await client.get(f"{NS}/changes", params={"limit": limit})
            assert r.status_code == 400

        # A cursor from before a disable() has expired: 410 with oldest.
        r = await client.post(f"{NS}/changes/disable")
        assert r.status_code == 200 and r.json() == {"enabled": False}
        assert not await store.changes.enabled()
        assert (await client.post(f"{NS}/changes/disable")).status_code == 200  # idempotent
        assert (await client.get(f"{NS}/changes")).status_code == 409
        await client.post(f"{NS}/changes/enable")
        for headers, params in (({}, {"since": last}), ({"Last-Event-ID": last}, {})):
            r = await client.get(f"{NS}/changes/watch", headers=headers, params=params)
            assert r.status_code == 410
            body = r.json()
            assert body["type"] == "changes-expired" and isinstance(body["oldest"], str)
        assert (await client.get(f"{NS}/changes", params={"since": last})).status_code == 410

        # Bad arguments: 400.
        for params in ({"since": "garbage"}, {"pattern": "["}, {"partition": ""}):
            r = await client.get(f"{NS}/changes/watch", params=params)
            assert r.status_code == 400, (params, r.text)
        assert (await client.post("/v1/ns/other/changes/enable")).status_code == 200
        r = await client.get("/v1/ns/other/changes/watch", params={"since": last})
        assert r.status_code == 400  # a cursor of another namespace
        assert not state.streams  # refused streams released their hold


async def test_scopes(store: Store[Any]) -> None:
    from fleetmem.service.auth import TokenTable, make_entry, new_token

    reader, admin = new_token(), new_token()
    table = TokenTable([make_entry(reader, ["fleet"], "read"), make_entry(admin, ["*"], "admin")])
    app = create_app(store, metrics=False, tokens=table)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=cast(Any, app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            as_reader = {"Authorization": f"Bearer {reader}"}
            as_admin = {"Authorization": f"Bearer {admin}"}
            assert (await client.get(f"{NS}/changes")).status_code == 401
            r = await client.post(f"{NS}/changes/enable", headers=as_reader)
            assert r.status_code == 403
            r = await client.post(f"{NS}/changes/enable", headers=as_admin)
            assert r.status_code == 200
            assert (await client.get(f"{NS}/changes", headers=as_reader)).status_code == 200
            r = await client.get("/v1/ns/other/changes/watch", headers=as_reader)
            assert r.status_code == 403
            r = await client.post(f"{NS}/changes/disable", headers=as_reader)
            assert r.status_code == 403
