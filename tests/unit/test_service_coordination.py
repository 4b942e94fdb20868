"""The leases, agents and queues routes of the HTTP service, in process, on memory and SQLite.

Each test drives the ASGI app through ``httpx`` the way a client would and checks what the
library underneath did: the routes are a thin layer over ``store.leases``, ``store.agents`` and
``store.queue(q)``, so the answers must be the library's (tokens, generations, claim order,
dead letters), with the contract's statuses around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio

pytest.importorskip("litestar")

from fleetmem import open_store
from fleetmem.service import ServiceSettings, create_app
from fleetmem.service.auth import TokenTable, make_entry, new_token
from fleetmem.service.context import ServiceState
from fleetmem.store import Store

BACKENDS = ["memory", "sqlite"]
# Names with a '/', a '%', spaces and non-ASCII characters: each must round-trip.
ODD_NAMES = ["build/main", "a/b/c", "d\u00e9ploiement/\u6f22\u5b57 x", "50%/ok", "x/acquire"]

# One app per backend serves the module (building an app is the slow part); each test works in
# a namespace of its own. Tests that end the app (shutdown) or need other settings build theirs.
pytestmark = pytest.mark.asyncio(loop_scope="module")
_namespaces = itertools.count(1)


def q(name: str) -> str:
    """``name`` percent-encoded for a path, '/' kept as is (the routes read the raw path)."""
    return quote(name, safe="/")


class Service:
    def __init__(self, client: httpx.AsyncClient, state: ServiceState, namespace: str) -> None:
        self.client = client
        self.state = state
        self.namespace = namespace

    def url(self, path: str) -> str:
        return f"/v1/ns/{self.namespace}{path}"

    @property
    def store(self) -> Store[Any]:
        """The library's view of the namespace the routes use."""
        return self.state.view(self.namespace)

    async def call(
        self, method: str, path: str, body: Any = None, status: int = 200, **kw: Any
    ) -> Any:
        kwargs: dict[str, Any] = dict(kw)
        if body is not None:
            kwargs["json"] = body
        r = await self.client.request(method, self.url(path), **kwargs)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        if r.status_code >= 400:
            assert r.headers["content-type"].startswith("application/problem+json")
        return r.json()

    async def problem(self, method: str, path: str, body: Any, status: int, kind: str) -> None:
        problem = await self.call(method, path, body, status)
        assert problem["type"] == kind, problem
        assert problem["status"] == status


@contextlib.asynccontextmanager
async def service(
    backend: str,
    tmp_path: Path,
    settings: ServiceSettings | None = None,
    tokens: TokenTable | None = None,
) -> AsyncIterator[Service]:
    url = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'svc.db'}"
    async with open_store(url) as store:
        app = create_app(store, metrics=False, settings=settings, tokens=tokens)
        async with app.lifespan():
            transport = httpx.ASGITransport(app=cast(Any, app))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield Service(client, app.state["fleetmem"], "fleet")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=BACKENDS)
async def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Service]:
    # The app's lifespan must be entered and left in one task; a fixture's setup and teardown
    # may run in different ones, so a task of its own holds the service open.
    ready: asyncio.Future[Service] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    where = tmp_path_factory.mktemp(request.param)

    async def hold() -> None:
        async with service(request.param, where) as s:
            ready.set_result(s)
            await stop.wait()

    task = asyncio.create_task(hold())
    waiters: list[asyncio.Future[Any]] = [task, ready]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        await task  # raises what opening the service raised
    yield ready.result()
    stop.set()
    await task


@pytest.fixture
def svc(shared: Service) -> Service:
    """The shared service of a backend, seen through a namespace no other test uses."""
    return Service(shared.client, shared.state, f"t{next(_namespaces)}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ------------------------------------------------------------------ leases


@pytest.mark.parametrize("name", ODD_NAMES)
async def test_lease_lifecycle(svc: Service, name: str) -> None:
    path = f"/leases/{q(name)}"
    lease = await svc.call("POST", f"{path}/acquire", {"owner": "agent-7", "ttl": 30})
    assert lease["name"] == name and lease["owner"] == "agent-7"
    assert at(lease["expires_at"]) > at(lease["acquired_at"])
    # The store itself sees the lease the route granted.
    held = await svc.store.leases.holder(name)
    assert held is not None and held.token == lease["token"]
    assert await svc.call("GET", path) == lease
    # Held: refused at once, to the same owner too.
    await svc.problem("POST", f"{path}/acquire", {"owner": "agent-7"}, 409, "lease-unavailable")
    renewed = await svc.call("POST", f"{path}/renew", {"token": lease["token"], "ttl": 60})
    assert renewed["token"] == lease["token"]
    assert at(renewed["expires_at"]) > at(lease["expires_at"])
    await svc.problem("POST", f"{path}/renew", {"token": lease["token"] + 1}, 409, "lease-lost")
    # A wrong token never frees the lease.
    assert await svc.call("POST", f"{path}/release", {"token": lease["token"] + 1}) == {
        "released": False
    }
    assert await svc.call("POST", f"{path}/release", {"token": lease["token"]}) == {
        "released": True
    }
    assert await svc.call("POST", f"{path}/release", {"token": lease["token"]}) == {
        "released": False
    }
    await svc.problem("GET", path, None, 404, "key-not-found")
    await svc.problem("POST", f"{path}/renew", {"token": lease["token"]}, 409, "lease-lost")
    again = await svc.call("POST", f"{path}/acquire", {"owner": "agent-8"})
    assert again["token"] > lease["token"]


async def test_lease_names_are_percent_decoded(svc: Service) -> None:
    lease = await svc.call("POST", "/leases/a%2Fb/acquire", {"owner": "o"})
    assert lease["name"] == "a/b"
    assert (await svc.call("GET", "/leases/a/b"))["token"] == lease["token"]
    assert (await svc.call("GET", "/leases/a%2Fb"))["token"] == lease["token"]


BAD_LEASE_POSTS: list[tuple[str, dict[str, Any]]] = [
    ("acquire", {"owner": "o", "token": 1}),  # a field of another verb
    ("acquire", {}),  # no owner
    ("acquire", {"owner": ""}),  # bad owner
    ("acquire", {"owner": "o", "ttl": -1}),
    ("acquire", {"owner": "o", "ttl": 0}),
    ("acquire", {"owner": "o", "wait": 61}),  # above the service's cap
    ("acquire", {"owner": "o", "wait": -1}),
    ("acquire", {"owner": "o", "colour": "red"}),  # unknown field
    ("acquire", {"owner": 7}),  # wrong type
    ("renew", {}),
    ("renew", {"token": 1, "owner": "o"}),
    ("renew", {"token": 0}),
    ("renew", {"token": 2**70}),
    ("release", {"token": 1, "ttl": 5}),
    ("release", {"token": None}),
    ("frobnicate", {"owner": "o"}),
]


async def test_lease_bad_input_is_400(svc: Service) -> None:
    for verb, body in BAD_LEASE_POSTS:
        await svc.call("POST", f"/leases/x/{verb}", body, 400)
    assert await svc.store.leases.holder("x") is None


async def test_lease_bad_names_are_400(svc: Service) -> None:
    await svc.call("POST", "/leases//acquire", {"owner": "o"}, 400)
    await svc.problem("POST", "/leases/a%01/acquire", {"owner": "o"}, 400, "invalid-key")
    await svc.problem("GET", "/leases/a%01b", None, 400, "invalid-key")
    await svc.call("POST", "/leases/" + "k" * 1025 + "/acquire", {"owner": "o"}, 400)


async def test_acquire_wait_is_granted_on_release(svc: Service) -> None:
    first = await svc.call("POST", "/leases/job/acquire", {"owner": "a"})
    waiter = asyncio.create_task(
        svc.call("POST", "/leases/job/acquire", {"owner": "b", "wait": 20})
    )
    await asyncio.sleep(0.3)
    assert not waiter.done()
    await svc.call("POST", "/leases/job/release", {"token": first["token"]})
    second = await asyncio.wait_for(waiter, 10)
    assert second["owner"] == "b" and second["token"] > first["token"]


async def test_acquire_wait_runs_out_with_409(svc: Service) -> None:
    await svc.call("POST", "/leases/job/acquire", {"owner": "a"})
    problem = await svc.call("POST", "/leases/job/acquire", {"owner": "b", "wait": 0.3}, 409)
    assert problem["type"] == "lease-unavailable"
    assert (await svc.call("GET", "/leases/job"))["owner"] == "a"


@pytest.mark.parametrize("name", ["deploy", "fleet/lock \u00e9"])
async def test_fenced_kv_write(svc: Service, name: str) -> None:
    path = f"/leases/{q(name)}"
    old = await svc.call("POST", f"{path}/acquire", {"owner": "a"})
    header = {"Fleetmem-Fence": f"{quote(name, safe='')}; token={old['token']}"}
    await svc.call("PUT", "/kv/status", {"value": "a"}, 201, headers=header)
    await svc.call("POST", f"{path}/release", {"token": old["token"]})
    new = await svc.call("POST", f"{path}/acquire", {"owner": "b"})
    assert new["token"] > old["token"]
    # The paused holder wakes up with its old token: refused, nothing changed.
    problem = await svc.call("PUT", "/kv/status", {"value": "stale"}, 409, headers=header)
    assert problem["type"] == "lease-lost"
    assert await svc.store.get("status") == "a"
    current = {"Fleetmem-Fence": f"{quote(name, safe='')}; token={new['token']}"}
    entry = await svc.call("PUT", "/kv/status", {"value": "b"}, 200, headers=current)
    assert entry["value"] == "b" and entry["version"] == 2


# ------------------------------------------------------------------ agents


@pytest.mark.parametrize("agent_id", ODD_NAMES)
async def test_agent_lifecycle(svc: Service, agent_id: str) -> None:
    path = f"/agents/{q(agent_id)}"
    agent = await svc.call("PUT", path, {"info": {"role": "tester"}, "ttl": 30})
    assert agent["id"] == agent_id and agent["info"] == {"role": "tester"}
    assert agent["generation"] >= 1
    assert (await svc.store.agents.get(agent_id)) is not None
    assert await svc.call("GET", path) == agent
    # Re-register while live: same generation and registered_at, new info.
    again = await svc.call("PUT", path, {"info": {"role": "runner"}})
    assert again["generation"] == agent["generation"]
    assert again["registered_at"] == agent["registered_at"]
    assert again["info"] == {"role": "runner"}
    beat = await svc.call("POST", f"{path}/heartbeat")  # no body at all
    assert beat["info"] == {"role": "runner"}
    assert at(beat["last_seen"]) >= at(again["last_seen"])
    beat = await svc.call("POST", f"{path}/heartbeat", {"ttl": 60, "info": {"n": 1}})
    assert beat["info"] == {"n": 1}
    assert at(beat["expires_at"]) > at(again["expires_at"])
    assert await svc.call("DELETE", path) == {"deleted": True}
    await svc.problem("DELETE", path, None, 404, "agent-gone")
    await svc.problem("GET", path, None, 404, "agent-gone")
    await svc.problem("POST", f"{path}/heartbeat", {}, 404, "agent-gone")
    reborn = await svc.call("PUT", path, {})
    assert reborn["generation"] > agent["generation"] and reborn["info"] == {}


async def test_agent_list_pages(svc: Service) -> None:
    ids = ["w/1", "w/2", "w/3", "z"]
    for agent_id in ids:
        await svc.call("PUT", f"/agents/{agent_id}", {"info": {"id": agent_id}})
    everything = await svc.call("GET", "/agents")
    assert [a["id"] for a in everything["agents"]] == ids and everything["next"] is None
    page = await svc.call("GET", "/agents", params={"prefix": "w/", "limit": 2})
    assert [a["id"] for a in page["agents"]] == ["w/1", "w/2"] and page["next"] == "w/2"
    rest = await svc.call("GET", "/agents", params={"prefix": "w/", "limit": 2, "after": "w/2"})
    assert [a["id"] for a in rest["agents"]] == ["w/3"] and rest["next"] is None
    await svc.call("GET", "/agents", status=400, params={"limit": -1})


BAD_REGISTRATIONS: list[dict[str, Any]] = [
    {"info": [1, 2]},
    {"info": "x"},
    {"ttl": -5},
    {"ttl": 0},
    {"colour": "red"},
]


async def test_agent_bad_register_is_400(svc: Service) -> None:
    for body in BAD_REGISTRATIONS:
        await svc.call("PUT", "/agents/a", body, 400)
    await svc.problem("GET", "/agents/a", None, 404, "agent-gone")


async def test_agent_bad_heartbeat_and_route(svc: Service) -> None:
    await svc.call("PUT", "/agents/a", {})
    await svc.call("POST", "/agents/a/heartbeat", {"ttl": -1}, 400)
    await svc.call("POST", "/agents/a/heartbeat", {"generation": 3}, 400)
    await svc.call("POST", "/agents/a/beat", {}, 400)  # not a verb of agents
    await svc.problem("PUT", "/agents/a%01b", {}, 400, "invalid-key")


# ------------------------------------------------------------------ queues


@pytest.mark.parametrize("queue", ["tasks", "ci/unit \u00e9", "a/jobs/0000000000000001", "x/stats"])
async def test_queue_lifecycle(svc: Service, queue: str) -> None:
    path = f"/queues/{q(queue)}"
    low = await svc.call("POST", f"{path}/jobs", {"payload": {"n": 1}})
    high = await svc.call("POST", f"{path}/jobs", {"payload": {"n": 2}, "priority": 5})
    many = await svc.call("POST", f"{path}/jobs", {"payloads": [{"n": 3}, None]})
    assert len(many["ids"]) == 2
    assert await svc.call("GET", "/queues") == {"queues": [queue]}
    stats = await svc.call("GET", f"{path}/stats")
    assert stats == {"ready": 4, "delayed": 0, "claimed": 0, "dead": 0, "done": 0}

    claimed = await svc.call("POST", f"{path}/claim", {"consumer": "c1", "lease": 30, "limit": 2})
    jobs = claimed["jobs"]
    # Higher priority first, then put order.
    assert [j["id"] for j in jobs] == [high["id"], low["id"]]
    assert [j["payload"] for j in jobs] == [{"n": 2}, {"n": 1}]
    first = jobs[0]
    assert first["queue"] == queue and first["consumer"] == "c1" and first["attempts"] == 1
    job_path = f"{path}/jobs/{first['id']}"

    extended = await svc.call("POST", f"{job_path}/extend", {"token": first["token"], "lease": 60})
    assert extended["job"]["token"] == first["token"]
    assert at(extended["job"]["lease_expires_at"]) > at(first["lease_expires_at"])
    acked = await svc.call("POST", f"{job_path}/ack", {"token": first["token"], "result": [1]})
    assert acked == {"acked": True}
    assert await svc.call("POST", f"{job_path}/ack", {"token": first["token"]}) == {"acked": False}
    await svc.problem("POST", f"{job_path}/extend", {"token": first["token"]}, 409, "lease-lost")
    result = await svc.call("GET", f"{job_path}/result")
    assert result["status"] == "done" and result["value"] == [1] and result["id"] == first["id"]
    assert result["attempts"] == 1 and result["error"] is None

    # Cancel a ready job: gone; a second cancel is 404.
    ready_id = many["ids"][1]
    assert await svc.call("DELETE", f"{path}/jobs/{ready_id}") == {"cancelled": True}
    await svc.problem("DELETE", f"{path}/jobs/{ready_id}", None, 404, "key-not-found")

    second = jobs[1]
    nacked = await svc.call(
        "POST",
        f"{path}/jobs/{second['id']}/nack",
        {"token": second["token"], "retry_in": 0, "error": "flaky"},
    )
    assert nacked == {"nacked": True}
    again = (await svc.call("POST", f"{path}/claim", {"consumer": "c2", "limit": 5}))["jobs"]
    assert [j["id"] for j in again] == [many["ids"][0], second["id"]]
    retried = again[1]
    assert retried["attempts"] == 2 and retried["last_error"] == "flaky"
    assert retried["token"] > second["token"] and retried["consumer"] == "c2"
    # The superseded claim can neither finish nor fail the job.
    stale = {"token": second["token"]}
    assert await svc.call("POST", f"{path}/jobs/{second['id']}/ack", stale) == {"acked": False}
    assert await svc.call("POST", f"{path}/jobs/{second['id']}/nack", stale) == {"nacked": False}
    pending = await svc.call("GET", f"{path}/jobs/{second['id']}/result", status=202)
    assert pending["status"] == "pending" and pending["finished_at"] is None
    # A claimed job cannot be cancelled.
    await svc.problem("DELETE", f"{path}/jobs/{second['id']}", None, 404, "key-not-found")
    stats = await svc.call("GET", f"{path}/stats")
    assert stats == {"ready": 0, "delayed": 0, "claimed": 2, "dead": 0, "done": 1}


async def test_put_options_and_dedupe(svc: Service) -> None:
    first = await svc.call("POST", "/queues/t/jobs", {"payload": 1, "dedupe_key": "k"})
    same = await svc.call("POST", "/queues/t/jobs", {"payload": 2, "dedupe_key": "k"})
    assert same == first
    await svc.call("POST", "/queues/t/jobs", {"payload": 3, "delay": 3600})
    await svc.call("POST", "/queues/t/jobs", {"payloads": [4, 5], "delay": 3600, "priority": 2})
    assert (await svc.call("GET", "/queues/t/stats"))["delayed"] == 3
    assert await svc.call("POST", "/queues/t/jobs", {"payloads": []}) == {"ids": []}
    null = await svc.call("POST", "/queues/t/jobs", {"payload": None, "priority": -1})
    jobs = (await svc.call("POST", "/queues/t/claim", {"consumer": "c", "limit": 5}))["jobs"]
    assert [j["id"] for j in jobs] == [first["id"], null["id"]]
    assert jobs[1]["payload"] is None


async def test_dead_letter_and_retry(svc: Service) -> None:
    ids = (await svc.call("POST", "/queues/d/jobs", {"payloads": [1, 2, 3], "max_attempts": 1}))[
        "ids"
    ]
    jobs = (await svc.call("POST", "/queues/d/claim", {"consumer": "c", "limit": 3}))["jobs"]
    for job in jobs:
        body = {"token": job["token"], "error": f"boom {job['payload']}"}
        await svc.call("POST", f"/queues/d/jobs/{job['id']}/nack", body)
    dead = await svc.call("GET", "/queues/d/dead")
    assert [j["id"] for j in dead["jobs"]] == ids and dead["next"] is None
    page = await svc.call("GET", "/queues/d/dead", params={"limit": 2})
    assert [j["id"] for j in page["jobs"]] == ids[:2] and page["next"] == ids[1]
    tail = await svc.call("GET", "/queues/d/dead", params={"limit": 2, "after": ids[1]})
    assert [j["id"] for j in tail["jobs"]] == ids[2:] and tail["next"] is None
    result = await svc.call("GET", f"/queues/d/jobs/{ids[0]}/result")
    assert result["status"] == "dead" and result["error"] == "boom 1"
    assert await svc.call("POST", "/queues/d/dead/retry", {"ids": [ids[0]]}) == {"count": 1}
    assert await svc.call("POST", "/queues/d/dead/retry") == {"count": 2}
    stats = await svc.call("GET", "/queues/d/stats")
    assert stats["dead"] == 0 and stats["ready"] == 3


async def test_nack_default_backoff_uses_attempts(svc: Service) -> None:
    await svc.call("POST", "/queues/b/jobs", {"payload": 1})
    job = (await svc.call("POST", "/queues/b/claim", {"consumer": "c"}))["jobs"][0]
    body = {"token": job["token"], "attempts": 6}  # 2**5 = 32 s backoff
    assert await svc.call("POST", f"/queues/b/jobs/{job['id']}/nack", body) == {"nacked": True}
    dead_or_delayed = await svc.call("GET", "/queues/b/stats")
    assert dead_or_delayed["delayed"] == 1
    assert (await svc.call("POST", "/queues/b/claim", {"consumer": "c"}))["jobs"] == []
    back = await svc.store.queue("b").stats()
    assert back.delayed == 1


BAD_QUEUE_POSTS: list[tuple[str, dict[str, Any]]] = [
    ("/queues/t/jobs", {}),  # neither payload nor payloads
    ("/queues/t/jobs", {"payload": 1, "consumer": "c"}),  # a field of another verb
    ("/queues/t/jobs", {"payloads": [1], "dedupe_key": "k"}),
    ("/queues/t/jobs", {"payload": 1, "priority": 2**31}),
    ("/queues/t/jobs", {"payload": 1, "max_attempts": 0}),
    ("/queues/t/jobs", {"payload": 1, "delay": -1}),
    ("/queues/t/jobs", {"payload": 1, "colour": "red"}),
    ("/queues/t/jobs", {"payloads": "abc"}),
    ("/queues/t/claim", {}),  # no consumer
    ("/queues/t/claim", {"consumer": "c", "limit": 1001}),
    ("/queues/t/claim", {"consumer": "c", "limit": -1}),
    ("/queues/t/claim", {"consumer": "c", "wait": 60.5}),
    ("/queues/t/claim", {"consumer": "c", "wait": -1}),
    ("/queues/t/claim", {"consumer": "c", "lease": 0}),
    ("/queues/t/claim", {"consumer": "c", "token": 1}),
    ("/queues/t/jobs/0000000000000001/ack", {}),  # no token
    ("/queues/t/jobs/0000000000000001/ack", {"token": 0}),
    ("/queues/t/jobs/not-a-job-id/ack", {"token": 1}),
    ("/queues/t/jobs/0000000000000001/nack", {"token": 1, "retry_in": -1}),
    ("/queues/t/jobs/0000000000000001/nack", {"token": 1, "result": 5}),
    ("/queues/t/jobs/0000000000000001/extend", {"token": 1, "lease": -1}),
    ("/queues/t/dead/retry", {"ids": ["nope"]}),
    ("/queues/t/dead/retry", {"payload": 1}),
    ("/queues/t/stats", {}),  # not a POST verb
    ("/queues//jobs", {"payload": 1}),  # empty queue name
    ("/queues/" + "q" * 256 + "/jobs", {"payload": 1}),  # longer than 255 bytes
]


async def test_queue_bad_posts_are_400(svc: Service) -> None:
    for path, body in BAD_QUEUE_POSTS:
        await svc.call("POST", path, body, 400)
    assert await svc.store.list_queues() == []


async def test_queue_bad_gets_are_400(svc: Service) -> None:
    await svc.call("GET", "/queues/t/jobs/0000000000000001/result", status=400, params={"wait": 61})
    await svc.call("GET", "/queues/t/jobs/xyz/result", status=400)
    await svc.call("GET", "/queues/t/stats", status=400, params={"wait": 1})
    await svc.call("GET", "/queues/t/stats", status=400, params={"limit": 1})
    await svc.call("GET", "/queues/t/dead", status=400, params={"after": "nope"})
    await svc.call("GET", "/queues/t/dead", status=400, params={"limit": -1})
    await svc.call("GET", "/queues/t/frob", status=400)
    await svc.call("DELETE", "/queues/t/jobs/xyz", status=400)
    await svc.call("DELETE", "/queues/t/stats", status=400)


# ------------------------------------------------------------------ long polls


async def test_claim_long_poll_returns_when_a_job_is_put(svc: Service) -> None:
    waiter = asyncio.create_task(
        svc.call("POST", "/queues/lp/claim", {"consumer": "c", "wait": 20})
    )
    await asyncio.sleep(0.3)
    assert not waiter.done()
    put = await svc.call("POST", "/queues/lp/jobs", {"payload": "hello"})
    jobs = (await asyncio.wait_for(waiter, 10))["jobs"]
    assert [j["id"] for j in jobs] == [put["id"]] and jobs[0]["payload"] == "hello"


async def test_claim_long_poll_runs_out_empty(svc: Service) -> None:
    got = await svc.call("POST", "/queues/lp/claim", {"consumer": "c", "wait": 0.3})
    assert got == {"jobs": []}


async def test_result_long_poll_returns_on_ack(svc: Service) -> None:
    put = await svc.call("POST", "/queues/r/jobs", {"payload": 1})
    waiter = asyncio.create_task(
        svc.call("GET", f"/queues/r/jobs/{put['id']}/result", params={"wait": 20})
    )
    job = (await svc.call("POST", "/queues/r/claim", {"consumer": "c"}))["jobs"][0]
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await svc.call("POST", f"/queues/r/jobs/{job['id']}/ack", {"token": job["token"], "result": 7})
    result = await asyncio.wait_for(waiter, 10)
    assert result["status"] == "done" and result["value"] == 7


async def test_long_polls_end_early_on_shutdown(backend: str, tmp_path: Path) -> None:
    async with service(backend, tmp_path) as svc:
        await _shutdown_ends_long_polls(svc)


async def _shutdown_ends_long_polls(svc: Service) -> None:
    await svc.call("POST", "/leases/busy/acquire", {"owner": "a"})
    put = await svc.call("POST", "/queues/s/jobs", {"payload": 1, "delay": 3600})
    claim = asyncio.create_task(svc.call("POST", "/queues/s/claim", {"consumer": "c", "wait": 50}))
    result = asyncio.create_task(
        svc.call("GET", f"/queues/s/jobs/{put['id']}/result", status=202, params={"wait": 50})
    )
    acquire = asyncio.create_task(
        svc.call("POST", "/leases/busy/acquire", {"owner": "b", "wait": 50}, 409)
    )
    await asyncio.sleep(0.3)
    assert not (claim.done() or result.done() or acquire.done())
    assert svc.state.polls  # the three long polls are counted
    svc.state.shutting_down.set()
    # Generous bound: each ends within its current one-second step.
    done = await asyncio.wait_for(asyncio.gather(claim, result, acquire), 10)
    assert done[0] == {"jobs": []}
    assert done[1]["status"] == "pending"
    assert done[2]["type"] == "lease-unavailable"
    assert not svc.state.polls
    # Nothing was claimed or granted behind the clients' backs.
    assert (await svc.store.queue("s").stats()).claimed == 0
    holder = await svc.store.leases.holder("busy")
    assert holder is not None and holder.owner == "a"
    # Once shutdown began a long poll does not wait, yet still answers what there is.
    ready = await svc.call("POST", "/queues/s/jobs", {"payload": 2})
    body = {"consumer": "c", "wait": 50}
    jobs = (await asyncio.wait_for(svc.call("POST", "/queues/s/claim", body), 5))["jobs"]
    assert [j["id"] for j in jobs] == [ready["id"]]
    ack = {"token": jobs[0]["token"], "result": "ok"}
    await svc.call("POST", f"/queues/s/jobs/{ready['id']}/ack", ack)
    url = f"/queues/s/jobs/{ready['id']}/result"
    finished = await asyncio.wait_for(svc.call("GET", url, params={"wait": 50}), 5)
    assert finished["status"] == "done" and finished["value"] == "ok"


async def test_poll_cap_per_token_is_429(backend: str, tmp_path: Path) -> None:
    settings = ServiceSettings(max_polls_per_token=1)
    async with service(backend, tmp_path, settings) as svc:
        first = asyncio.create_task(
            svc.call("POST", "/queues/cap/claim", {"consumer": "c", "wait": 20})
        )
        await asyncio.sleep(0.2)
        r = await svc.client.post(svc.url("/queues/cap/claim"), json={"consumer": "d", "wait": 1})
        assert r.status_code == 429 and r.json()["type"] == "too-many-requests"
        assert r.headers["retry-after"] == "1"
        r = await svc.client.get(svc.url("/queues/cap/jobs/0000000000000001/result?wait=1"))
        assert r.status_code == 429
        r = await svc.client.post(svc.url("/leases/l/acquire"), json={"owner": "o", "wait": 1})
        assert r.status_code == 429
        # Calls that do not wait are not long polls.
        await svc.call("POST", "/queues/cap/claim", {"consumer": "d"})
        await svc.call("POST", "/leases/l/acquire", {"owner": "o"})
        put = await svc.call("POST", "/queues/cap/jobs", {"payload": 1})
        assert (await asyncio.wait_for(first, 10))["jobs"][0]["id"] == put["id"]
        # The first poll ended: its slot is free again.
        again = await svc.call("POST", "/queues/cap/claim", {"consumer": "d", "wait": 0.1})
        assert again == {"jobs": []}


# ------------------------------------------------------------------ scopes


async def test_scopes(tmp_path: Path) -> None:
    reader, writer = new_token(), new_token()
    tokens = TokenTable(
        [make_entry(reader, ["fleet"], "read"), make_entry(writer, ["fleet"], "write")]
    )
    async with service("memory", tmp_path, tokens=tokens) as svc:
        read = {"Authorization": f"Bearer {reader}"}
        write = {"Authorization": f"Bearer {writer}"}
        await svc.call("POST", "/leases/l/acquire", {"owner": "o"}, headers=write)
        await svc.call("PUT", "/agents/a", {}, headers=write)
        await svc.call("POST", "/queues/q/jobs", {"payload": 1}, headers=write)
        for method, path in [
            ("GET", "/leases/l"),
            ("GET", "/agents/a"),
            ("GET", "/agents"),
            ("GET", "/queues"),
            ("GET", "/queues/q/stats"),
            ("GET", "/queues/q/dead"),
        ]:
            await svc.call(method, path, headers=read)
        for method, path, body in [
            ("POST", "/leases/m/acquire", {"owner": "o"}),
            ("PUT", "/agents/b", {}),
            ("POST", "/agents/a/heartbeat", {}),
            ("DELETE", "/agents/a", None),
            ("POST", "/queues/q/jobs", {"payload": 1}),
            ("POST", "/queues/q/claim", {"consumer": "c"}),
            ("POST", "/queues/q/dead/retry", {}),
            ("DELETE", "/queues/q/jobs/0000000000000001", None),
        ]:
            problem = await svc.call(method, path, body, 403, headers=read)
            assert problem["type"] == "forbidden"
        await svc.call("GET", "/queues", status=401)
        assert (await svc.store.queue("q").stats()).ready == 1
