"""Coordination routes: leases, the agent registry and work queues.

Each route is one call of the library (``store.leases``, ``store.agents``, ``store.queue(q)``);
the behaviour is ``COORDINATION.md``'s. Lease names, agent ids and queue names follow the key
rules and may hold ``/``: like a key, the name is the rest of the path after ``leases/``,
``agents/`` or ``queues/``, taken from the raw path and percent-decoded once, and the route's
verb is its last segment(s), matched from the right (``POST leases/a/b/acquire`` acquires the
lease ``a/b``; ``GET queues/x/stats/stats`` reads the stats of the queue ``x/stats``). A name
may also be sent percent-encoded (``a%2Fb``).

Decisions where the contract is silent:

- **Statuses**: every success is ``200`` (also ``acquire``, ``PUT agents/{id}`` and a job
  ``put``: whether a registration created the agent or a ``put`` a job — a dedupe key may
  return an existing job — is not something the library reports; an agent's ``generation``
  and ``registered_at`` tell a restart). A lease held by someone else is ``409``
  ``lease-unavailable``; a lost lease or a superseded claim (``renew``, ``extend``) is ``409``
  ``lease-lost``; a missing agent (``GET``, ``heartbeat``, ``DELETE``) is ``404``
  ``agent-gone``; a lease nobody holds (``GET``) and a job ``DELETE`` that cancels nothing
  (unknown, claimed, done, dead or already cancelled: the library does not tell which) are
  ``404`` ``key-not-found``.
- ``release`` answers ``{"released": bool}`` like the library (``false``: the lease was not live
  with that token, e.g. a second release), never an error, so a cleanup step can always call it.
  ``ack`` and ``nack`` answer ``{"acked": bool}`` / ``{"nacked": bool}`` the same way
  (``false``: another claim superseded this one, or the job is dead; nothing changed).
- A lease (``renew``, ``release``) and a claim (``ack``, ``nack``, ``extend``) are named by
  their name or job id in the path and their ``token`` in the body: the token is what the
  library checks. ``nack`` without ``retry_in`` uses the library's backoff for the
  ``attempts`` sent in the body (the claimed job's ``attempts``; absent: 1, so a 1 s backoff).
- A POST body may hold only the fields of its verb (e.g. ``token`` on ``acquire`` is ``400``);
  one body type per method documents them all. The same goes for query parameters
  (``wait`` only on ``…/result``, ``limit``/``after`` only on ``…/dead``).
- **Putting jobs**: ``POST queues/{q}/jobs`` takes ``{"payload": X, "priority"?, "delay"?,
  "dedupe_key"?, "max_attempts"?}`` → ``{"id"}``, or ``{"payloads": [X, …], "priority"?,
  "delay"?, "max_attempts"?}`` (``put_many``, all or nothing) → ``{"ids": […]}``. ``payload``
  may be ``null`` but must be present.
- **Claiming**: ``POST queues/{q}/claim`` ``{"consumer", "lease"?, "wait"?, "limit"?}`` →
  ``{"jobs": […]}`` (``limit`` default 1, at most 1000; an empty list when nothing came).
  ``extend`` answers ``{"job": {…}}`` (the job wrapped, so that no two answers of one route
  share a shape).
- **Long polls** (``acquire`` and ``claim`` with ``wait``, ``…/result?wait``): ``wait`` is at
  most 60 s (``400`` above), and while one runs it counts against the token's cap of long
  polls (``429`` beyond it). When the server begins to shut down a long poll ends early and
  answers what it has: ``409`` for ``acquire``, ``{"jobs": []}`` for ``claim``, "pending" for
  ``result``. ``acquire`` and ``claim`` wait in steps of at most one second (a fresh library
  call each, so a release or a ``put`` still wakes them at once) and check for shutdown between
  steps; they are never cancelled in the middle of a library call, which could grant a lease
  or claim a job that no client receives.
- ``GET queues/{q}/jobs/{id}/result`` answers ``200`` with ``{"id", "status": "done"|"dead",
  "value", "error", "attempts", "finished_at"}`` once the job finished, and ``202`` with
  ``"status": "pending"`` (the other fields ``null``) when there is no result after ``wait``: the
  job is unknown, not finished yet, or its result expired (the library cannot tell these apart).
  A shell script loops on ``jq -r .status`` while it is ``pending``; ``curl -f`` still fails
  on every error.
- ``GET queues/{q}/dead?limit&after`` → ``{"jobs", "next"}`` (``limit`` default 100; ``next``
  is the ``after`` of the next page); ``POST queues/{q}/dead/retry`` ``{"ids"?}`` →
  ``{"count"}``; ``GET agents?prefix&limit&after`` → ``{"agents", "next"}``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, PathParameter, QueryParameter

from fleetmem._validate import validate_wait
from fleetmem.agents import DEFAULT_AGENT_TTL
from fleetmem.errors import (
    AgentGoneError,
    InvalidArgumentError,
    KeyNotFoundError,
    LeaseUnavailableError,
)
from fleetmem.leases import DEFAULT_LEASE_TTL
from fleetmem.protocol import Agent, Job, JobResult, Lease
from fleetmem.queues import DEFAULT_JOB_LEASE, DEFAULT_RESULT_TTL, Queue
from fleetmem.service.auth import Scope
from fleetmem.service.context import (
    MAX_WAIT_SECONDS,
    ServiceState,
    access,
    path_rest,
    principal_of,
    state_of,
)
from fleetmem.service.problems import Problem

__all__ = [
    "MAX_CLAIM",
    "ROUTES",
    "AgentOut",
    "JobOut",
    "LeaseOut",
    "ResultOut",
]

_NS = "/v1/ns/{namespace:str}"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# The longest single library wait of a stepped long poll (see the module docstring).
_STEP_SECONDS = 1.0
#: The most jobs one claim request may ask for.
MAX_CLAIM = 1000

T = TypeVar("T")


# ------------------------------------------------------------------ bodies and answers


class LeaseOut(msgspec.Struct):
    """A lease: ``token`` is its fencing token; times are RFC 3339 UTC (server clock)."""

    name: str
    owner: str
    token: int
    acquired_at: datetime
    expires_at: datetime


class ReleasedOut(msgspec.Struct):
    released: bool


class LeaseIn(msgspec.Struct, forbid_unknown_fields=True):
    """``…/acquire``: ``{"owner", "ttl"?, "wait"?}`` (``ttl`` default 30 s, ``wait`` at most
    60 s); ``…/renew``: ``{"token", "ttl"?}`` (``ttl`` default: the lease's last TTL);
    ``…/release``: ``{"token"}``."""

    owner: str | None = None
    token: int | None = None
    ttl: float | None = None
    wait: float | None = None


class AgentOut(msgspec.Struct):
    """An agent: ``generation`` grows each time it registers again after it was gone."""

    id: str
    info: dict[str, Any]
    generation: int
    registered_at: datetime
    last_seen: datetime
    expires_at: datetime


class AgentsOut(msgspec.Struct):
    """``next`` is the ``after`` of the next page, ``null`` on the last page."""

    agents: list[AgentOut]
    next: str | None


class RegisterIn(msgspec.Struct, forbid_unknown_fields=True):
    """``info`` a JSON object (default ``{}``); ``ttl`` seconds (default 30)."""

    info: dict[str, Any] | None = None
    ttl: float | None = None


class HeartbeatIn(msgspec.Struct, forbid_unknown_fields=True):
    """``ttl`` default: the TTL last given; ``info`` replaces the agent's info when given."""

    ttl: float | None = None
    info: dict[str, Any] | None = None


class DeletedOut(msgspec.Struct):
    deleted: bool


class JobOut(msgspec.Struct):
    """A job as the server last claimed (or dead-lettered) it. ``token`` identifies the claim:
    send it back to ``ack``, ``nack`` and ``extend``."""

    id: str
    queue: str
    payload: Any
    priority: int
    attempts: int
    max_attempts: int
    enqueued_at: datetime
    ready_at: datetime
    claimed_at: datetime | None
    lease_expires_at: datetime | None
    consumer: str | None
    token: int
    last_error: str | None


class JobIdOut(msgspec.Struct):
    id: str


class JobIdsOut(msgspec.Struct):
    ids: list[str]


class ClaimedOut(msgspec.Struct):
    jobs: list[JobOut]


class ExtendedOut(msgspec.Struct):
    job: JobOut


class AckedOut(msgspec.Struct):
    acked: bool


class NackedOut(msgspec.Struct):
    nacked: bool


class CountOut(msgspec.Struct):
    count: int


class QueuePostIn(msgspec.Struct, forbid_unknown_fields=True):
    """The body of a POST under ``queues/{q}/``, by verb (only that verb's fields):

    - ``…/jobs``: ``{"payload", "priority"?, "delay"?, "dedupe_key"?, "max_attempts"?}`` or
      ``{"payloads": [...], "priority"?, "delay"?, "max_attempts"?}``;
    - ``…/claim``: ``{"consumer", "lease"?, "wait"?, "limit"?}``;
    - ``…/jobs/{id}/ack``: ``{"token", "result"?, "result_ttl"?}``;
    - ``…/jobs/{id}/nack``: ``{"token", "retry_in"?, "error"?, "attempts"?}``;
    - ``…/jobs/{id}/extend``: ``{"token", "lease"?}``;
    - ``…/dead/retry``: ``{"ids"?}`` (or no body: every dead job).
    """

    payload: Any | msgspec.UnsetType = msgspec.UNSET
    payloads: list[Any] | None = None
    priority: int | None = None
    delay: float | None = None
    dedupe_key: str | None = None
    max_attempts: int | None = None
    consumer: str | None = None
    lease: float | None = None
    wait: float | None = None
    limit: int | None = None
    token: int | None = None
    result: Any | msgspec.UnsetType = msgspec.UNSET
    result_ttl: float | None = None
    retry_in: float | None = None
    error: str | None = None
    attempts: int | None = None
    ids: list[str] | None = None


class ResultOut(msgspec.Struct):
    """How a job ended (``done``: ``value`` is the ``ack``'s result; ``dead``: ``error`` is its
    last error), or ``pending`` (``202``): no result yet — the job is unknown, not finished, or
    its result expired."""

    id: str
    status: Literal["done", "dead", "pending"]
    value: Any
    error: str | None
    attempts: int | None
    finished_at: datetime | None


class QueueStatsOut(msgspec.Struct):
    ready: int
    delayed: int
    claimed: int
    dead: int
    done: int


class DeadOut(msgspec.Struct):
    """Dead jobs ascending by id; ``next`` is the ``after`` of the next page or ``null``."""

    jobs: list[JobOut]
    next: str | None


class QueuesOut(msgspec.Struct):
    queues: list[str]


class CancelledOut(msgspec.Struct):
    cancelled: bool


def _lease_out(lease: Lease) -> LeaseOut:
    return LeaseOut(lease.name, lease.owner, lease.token, lease.acquired_at, lease.expires_at)


def _agent_out(agent: Agent) -> AgentOut:
    return AgentOut(
        agent.id,
        agent.info,
        agent.generation,
        agent.registered_at,
        agent.last_seen,
        agent.expires_at,
    )


def _job_out(job: Job) -> JobOut:
    return JobOut(
        job.id,
        job.queue,
        job.payload,
        job.priority,
        job.attempts,
        job.max_attempts,
        job.enqueued_at,
        job.ready_at,
        job.claimed_at,
        job.lease_expires_at,
        job.consumer,
        job.token,
        job.last_error,
    )


def _result_out(result: JobResult) -> ResultOut:
    status: Literal["done", "dead"] = "dead" if result.status == "dead" else "done"
    return ResultOut(
        result.id, status, result.value, result.error, result.attempts, result.finished_at
    )


# ------------------------------------------------------------------ helpers


def _only(body: msgspec.Struct, verb: str, allowed: frozenset[str]) -> None:
    """Refuse a field that ``verb`` does not take (a field left at its default, ``null`` or
    absent, is not given)."""
    for field in msgspec.structs.fields(body):
        if field.name in allowed:
            continue
        if getattr(body, field.name) is not field.default:
            raise InvalidArgumentError(f"{verb} does not take {field.name!r}")


def _require(value: T | None, verb: str, field: str) -> T:
    if value is None:
        raise InvalidArgumentError(f"{verb} needs {field!r}")
    return value


def _wait_of(wait: float | None) -> float | None:
    """``wait`` checked under the library's rules and against the service's cap."""
    wait = validate_wait(wait)
    if wait is not None and wait > MAX_WAIT_SECONDS:
        raise InvalidArgumentError(
            f"wait must be at most {MAX_WAIT_SECONDS:g} seconds on this server, not {wait!r}"
        )
    return wait


async def _stepped(
    state: ServiceState,
    wait: float,
    attempt: Callable[[float | None], Awaitable[T]],
    got: Callable[[T], bool],
) -> T:
    """Call ``attempt(step)`` with library waits of at most one second until ``got`` says it
    succeeded, ``wait`` seconds passed, or shutdown began (then one last attempt without
    waiting). A library call is never cancelled halfway: what it granted or claimed always
    reaches the client."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        stopping = state.shutting_down.is_set()
        remaining = deadline - loop.time()
        step = None if stopping or remaining <= 0 else min(_STEP_SECONDS, remaining)
        value = await attempt(step)
        if got(value) or stopping or remaining <= _STEP_SECONDS:
            return value


async def _unless_shutdown(state: ServiceState, call: Coroutine[Any, Any, T]) -> T | None:
    """``await call``, or ``None`` as soon as shutdown begins (``call`` is then cancelled: use
    this only for reads)."""
    task = asyncio.ensure_future(call)
    stop = asyncio.ensure_future(state.shutting_down.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return None
    return task.result()


def _no_route(method: str, area: str, verbs: str) -> Problem:
    return Problem(404, "not-found", f"no such route: {method} under {area}/ takes {verbs}")


# ------------------------------------------------------------------ leases

_LEASES = ["leases"]
_LeasePath = Annotated[
    str, PathParameter(description="the lease name: the rest of the path, percent-decoded once")
]
_LeaseVerbPath = Annotated[
    str,
    PathParameter(
        description="the lease name followed by /acquire, /renew or /release",
        pattern=r"^.+/(acquire|renew|release)$",
    ),
]
_LEASE_VERB = re.compile(r"(?s)(.*)/(acquire|renew|release)")
_ACQUIRE_FIELDS = frozenset({"owner", "ttl", "wait"})
_RENEW_FIELDS = frozenset({"token", "ttl"})
_RELEASE_FIELDS = frozenset({"token"})


def _lease_of(name: str, token: int, namespace: str) -> Lease:
    """The lease ``name`` with ``token``, as renew and release need it (only the name and the
    token count)."""
    return Lease(name, "", token, _EPOCH, _EPOCH, namespace)


@post(
    f"{_NS}/leases/{{rest:path}}",
    tags=_LEASES,
    summary="Acquire, renew or release a lease",
    status_code=200,
)
async def post_lease(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    data: JSONBody[LeaseIn],
    rest: _LeaseVerbPath,
) -> Response[LeaseOut | ReleasedOut]:
    """``…/acquire`` ``{"owner", "ttl"?, "wait"?}`` → the lease, or ``409``
    ``lease-unavailable`` when someone holds it (after ``wait`` seconds, at most 60);
    ``…/renew`` ``{"token", "ttl"?}`` → the lease with its new expiry, or ``409``
    ``lease-lost``; ``…/release`` ``{"token"}`` → ``{"released": bool}``."""
    store = access(request, namespace, Scope.WRITE)
    found = _LEASE_VERB.fullmatch(path_rest(request, "/leases/"))
    if found is None:
        raise _no_route("POST", "leases", "…/acquire, …/renew or …/release")
    name, verb = found.group(1), found.group(2)
    leases = store.leases
    if verb == "acquire":
        _only(data, verb, _ACQUIRE_FIELDS)
        owner = _require(data.owner, verb, "owner")
        ttl = DEFAULT_LEASE_TTL if data.ttl is None else data.ttl
        wait = _wait_of(data.wait)
        if not wait:
            lease = await leases.acquire(name, owner=owner, ttl=ttl, wait=wait)
        else:
            state = state_of(request)
            async with state.hold(principal_of(request), "poll"):
                lease = await _stepped(
                    state,
                    wait,
                    lambda step: leases.acquire(name, owner=owner, ttl=ttl, wait=step),
                    lambda got: got is not None,
                )
        if lease is None:
            if wait and state_of(request).shutting_down.is_set():
                raise LeaseUnavailableError(
                    f"lease {name!r} is held by another holder (the server is shutting down: "
                    "the wait ended early)"
                )
            raise LeaseUnavailableError(
                f"lease {name!r} is held by another holder"
                + (f" (waited {wait:g} s)" if wait else "")
            )
        return Response(_lease_out(lease))
    token = _require(data.token, verb, "token")
    if verb == "renew":
        _only(data, verb, _RENEW_FIELDS)
        renewed = await leases.renew(_lease_of(name, token, store.namespace), ttl=data.ttl)
        return Response(_lease_out(renewed))
    _only(data, verb, _RELEASE_FIELDS)
    released = await leases.release(_lease_of(name, token, store.namespace))
    return Response(ReleasedOut(released))


@get(f"{_NS}/leases/{{rest:path}}", tags=_LEASES, summary="Read a lease's holder")
async def get_lease(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _LeasePath,
) -> LeaseOut:
    """The live lease of that name (its holder and token); ``404`` when nobody holds it."""
    store = access(request, namespace, Scope.READ)
    name = path_rest(request, "/leases/")
    lease = await store.leases.holder(name)
    if lease is None:
        raise KeyNotFoundError(f"nobody holds lease {name!r}")
    return _lease_out(lease)


# ------------------------------------------------------------------ agents

_AGENTS = ["agents"]
_AgentPath = Annotated[
    str, PathParameter(description="the agent id: the rest of the path, percent-decoded once")
]
_HeartbeatPath = Annotated[
    str,
    PathParameter(description="the agent id followed by /heartbeat", pattern=r"^.+/heartbeat$"),
]


@put(f"{_NS}/agents/{{rest:path}}", tags=_AGENTS, summary="Register an agent", status_code=200)
async def put_agent(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    data: JSONBody[RegisterIn],
    rest: _AgentPath,
) -> AgentOut:
    """``register``: a live agent keeps its ``registered_at`` and ``generation`` and gets the
    new info and TTL; an absent or gone one is created with a greater ``generation``."""
    store = access(request, namespace, Scope.WRITE)
    agent = await store.agents.register(
        path_rest(request, "/agents/"),
        info=data.info,
        ttl=DEFAULT_AGENT_TTL if data.ttl is None else data.ttl,
    )
    return _agent_out(agent)


@post(
    f"{_NS}/agents/{{rest:path}}",
    tags=_AGENTS,
    summary="Heartbeat an agent",
    status_code=200,
)
async def post_agent(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _HeartbeatPath,
    data: JSONBody[HeartbeatIn | None] = None,
) -> AgentOut:
    """``…/heartbeat`` ``{"ttl"?, "info"?}`` (or no body): extends a live agent; ``404``
    ``agent-gone`` when it is not live (a dead agent registers again)."""
    store = access(request, namespace, Scope.WRITE)
    raw = path_rest(request, "/agents/")
    if not raw.endswith("/heartbeat"):
        raise _no_route("POST", "agents", "…/heartbeat")
    body = data or HeartbeatIn()
    agent = await store.agents.heartbeat(raw[: -len("/heartbeat")], ttl=body.ttl, info=body.info)
    return _agent_out(agent)


@delete(f"{_NS}/agents/{{rest:path}}", tags=_AGENTS, summary="Deregister an agent", status_code=200)
async def delete_agent(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _AgentPath,
) -> DeletedOut:
    """``{"deleted": true}``; ``404`` ``agent-gone`` when the agent was not live."""
    store = access(request, namespace, Scope.WRITE)
    agent_id = path_rest(request, "/agents/")
    if not await store.agents.deregister(agent_id):
        raise AgentGoneError(f"agent {agent_id!r} is not registered")
    return DeletedOut(True)


@get(f"{_NS}/agents/{{rest:path}}", tags=_AGENTS, summary="Read an agent")
async def get_agent(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _AgentPath,
) -> AgentOut:
    """The live agent; ``404`` ``agent-gone`` when it is absent or expired."""
    store = access(request, namespace, Scope.READ)
    agent_id = path_rest(request, "/agents/")
    agent = await store.agents.get(agent_id)
    if agent is None:
        raise AgentGoneError(f"agent {agent_id!r} is not registered")
    return _agent_out(agent)


@get(f"{_NS}/agents", tags=_AGENTS, summary="List live agents")
async def list_agents(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    prefix: FromQuery[str] = "",
    limit: Annotated[int | None, QueryParameter(ge=0)] = None,
    after: FromQuery[str | None] = None,
) -> AgentsOut:
    """Live agents whose id starts with ``prefix``, ascending by id; ``next`` is the
    ``after`` of the next page when ``limit`` filled this one."""
    store = access(request, namespace, Scope.READ)
    agents = await store.agents.list(prefix, limit=limit, after=after)
    more = limit is not None and limit > 0 and len(agents) == limit
    return AgentsOut([_agent_out(a) for a in agents], agents[-1].id if more else None)


# ------------------------------------------------------------------ queues

_QUEUES = ["queues"]
_QueuePostPath = Annotated[
    str,
    PathParameter(
        description="the queue name followed by /jobs, /claim, /jobs/{id}/ack, "
        "/jobs/{id}/nack, /jobs/{id}/extend or /dead/retry",
        pattern=r"^.+/(jobs|claim|jobs/[^/]*/(ack|nack|extend)|dead/retry)$",
    ),
]
_QueueGetPath = Annotated[
    str,
    PathParameter(
        description="the queue name followed by /stats, /dead or /jobs/{id}/result",
        pattern=r"^.+/(stats|dead|jobs/[^/]*/result)$",
    ),
]
_QueueDeletePath = Annotated[
    str,
    PathParameter(description="the queue name followed by /jobs/{id}", pattern=r"^.+/jobs/[^/]*$"),
]
_POST_JOBS = re.compile(r"(?s)(.*)/jobs")
_POST_CLAIM = re.compile(r"(?s)(.*)/claim")
_POST_JOB_VERB = re.compile(r"(?s)(.*)/jobs/([^/]*)/(ack|nack|extend)")
_POST_RETRY = re.compile(r"(?s)(.*)/dead/retry")
_GET_STATS = re.compile(r"(?s)(.*)/stats")
_GET_DEAD = re.compile(r"(?s)(.*)/dead")
_GET_RESULT = re.compile(r"(?s)(.*)/jobs/([^/]*)/result")
_DELETE_JOB = re.compile(r"(?s)(.*)/jobs/([^/]*)")

_PUT_FIELDS = frozenset({"payload", "priority", "delay", "dedupe_key", "max_attempts"})
_PUT_MANY_FIELDS = frozenset({"payloads", "priority", "delay", "max_attempts"})
_CLAIM_FIELDS = frozenset({"consumer", "lease", "wait", "limit"})
_ACK_FIELDS = frozenset({"token", "result", "result_ttl"})
_NACK_FIELDS = frozenset({"token", "retry_in", "error", "attempts"})
_EXTEND_FIELDS = frozenset({"token", "lease"})
_RETRY_FIELDS = frozenset({"ids"})

_POST_VERBS = "…/jobs, …/claim, …/jobs/{id}/ack|nack|extend or …/dead/retry"


def _claim_arg(queue: Queue, job_id: str, token: int, attempts: int, namespace: str) -> Job:
    """The job as ``ack``/``nack``/``extend`` need it: its queue, id and claim token (and,
    for the default backoff of ``nack``, its attempts); the rest is not read."""
    return Job(
        job_id,
        queue.name,
        None,
        0,
        attempts,
        1,
        _EPOCH,
        _EPOCH,
        None,
        None,
        None,
        token,
        None,
        namespace,
    )


async def _claim(request: Request[Any, Any, Any], queue: Queue, data: QueuePostIn) -> list[Job]:
    _only(data, "claim", _CLAIM_FIELDS)
    consumer = _require(data.consumer, "claim", "consumer")
    lease = DEFAULT_JOB_LEASE if data.lease is None else data.lease
    limit = 1 if data.limit is None else data.limit
    if limit > MAX_CLAIM:
        raise InvalidArgumentError(f"limit must be at most {MAX_CLAIM}, not {limit}")
    wait = _wait_of(data.wait)
    if not wait:
        return await queue.claim_many(limit, consumer=consumer, lease=lease, wait=wait)
    state = state_of(request)
    async with state.hold(principal_of(request), "poll"):
        return await _stepped(
            state,
            wait,
            lambda step: queue.claim_many(limit, consumer=consumer, lease=lease, wait=step),
            bool,
        )


@post(
    f"{_NS}/queues/{{rest:path}}",
    tags=_QUEUES,
    summary="Put, claim, ack, nack, extend jobs; retry dead jobs",
    status_code=200,
)
async def post_queue(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _QueuePostPath,
    data: JSONBody[QueuePostIn | None] = None,
) -> Response[JobIdOut | JobIdsOut | ClaimedOut | AckedOut | NackedOut | ExtendedOut | CountOut]:
    """By the verb at the end of the path (see the body's fields):
    ``…/jobs`` → ``{"id"}`` (one ``payload``) or ``{"ids"}`` (a list of ``payloads``);
    ``…/claim`` (long poll, ``wait`` ≤ 60 s) → ``{"jobs": [...]}``, maybe empty;
    ``…/jobs/{id}/ack`` → ``{"acked": bool}``; ``…/jobs/{id}/nack`` → ``{"nacked": bool}``;
    ``…/jobs/{id}/extend`` → ``{"job"}`` or ``409`` ``lease-lost``;
    ``…/dead/retry`` → ``{"count"}``."""
    store = access(request, namespace, Scope.WRITE)
    raw = path_rest(request, "/queues/")
    body = data or QueuePostIn()
    found = _POST_JOB_VERB.fullmatch(raw)
    if found is not None:
        queue = store.queue(found.group(1))
        verb = found.group(3)
        token = _require(body.token, verb, "token")
        if verb == "ack":
            _only(body, verb, _ACK_FIELDS)
            job = _claim_arg(queue, found.group(2), token, 0, store.namespace)
            result = None if body.result is msgspec.UNSET else body.result
            ttl = DEFAULT_RESULT_TTL if body.result_ttl is None else body.result_ttl
            return Response(AckedOut(await queue.ack(job, result, result_ttl=ttl)))
        if verb == "nack":
            _only(body, verb, _NACK_FIELDS)
            attempts = 1 if body.attempts is None else body.attempts
            job = _claim_arg(queue, found.group(2), token, attempts, store.namespace)
            nacked = await queue.nack(job, retry_in=body.retry_in, error=body.error)
            return Response(NackedOut(nacked))
        _only(body, verb, _EXTEND_FIELDS)
        job = _claim_arg(queue, found.group(2), token, 0, store.namespace)
        lease = DEFAULT_JOB_LEASE if body.lease is None else body.lease
        return Response(ExtendedOut(_job_out(await queue.extend(job, lease=lease))))
    if (found := _POST_JOBS.fullmatch(raw)) is not None:
        queue = store.queue(found.group(1))
        priority = 0 if body.priority is None else body.priority
        if body.payloads is not None:
            _only(body, "put of payloads", _PUT_MANY_FIELDS)
            ids = await queue.put_many(
                body.payloads, priority=priority, delay=body.delay, max_attempts=body.max_attempts
            )
            return Response(JobIdsOut(ids))
        _only(body, "put", _PUT_FIELDS)
        if body.payload is msgspec.UNSET:
            raise InvalidArgumentError(
                "put needs 'payload' (one job) or 'payloads' (a list of jobs)"
            )
        job_id = await queue.put(
            body.payload,
            priority=priority,
            delay=body.delay,
            dedupe_key=body.dedupe_key,
            max_attempts=body.max_attempts,
        )
        return Response(JobIdOut(job_id))
    if (found := _POST_CLAIM.fullmatch(raw)) is not None:
        jobs = await _claim(request, store.queue(found.group(1)), body)
        return Response(ClaimedOut([_job_out(j) for j in jobs]))
    if (found := _POST_RETRY.fullmatch(raw)) is not None:
        queue = store.queue(found.group(1))
        _only(body, "retry", _RETRY_FIELDS)
        return Response(CountOut(await queue.retry_dead(body.ids)))
    raise _no_route("POST", "queues", _POST_VERBS)


@get(
    f"{_NS}/queues/{{rest:path}}",
    tags=_QUEUES,
    summary="A queue's stats, dead jobs, or a job's result",
    responses={
        202: ResponseSpec(
            data_container=ResultOut,
            description="No result after wait: status 'pending'",
        )
    },
)
async def get_queue(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _QueueGetPath,
    wait: Annotated[
        float | None,
        QueryParameter(description="…/result: seconds to wait for the job to finish (≤ 60)"),
    ] = None,
    limit: Annotated[
        int | None, QueryParameter(ge=0, description="…/dead: the most jobs to list (default 100)")
    ] = None,
    after: Annotated[
        str | None, QueryParameter(description="…/dead: the last id of the previous page")
    ] = None,
) -> Response[QueueStatsOut | DeadOut | ResultOut]:
    """``…/stats`` → ``{"ready", "delayed", "claimed", "dead", "done"}``;
    ``…/dead?limit&after`` → ``{"jobs", "next"}``; ``…/jobs/{id}/result?wait`` (long poll,
    ``wait`` ≤ 60 s) → ``200`` with the result (``status`` ``done`` or ``dead``), or ``202``
    with ``status`` ``pending`` when there is none (yet)."""
    store = access(request, namespace, Scope.READ)
    raw = path_rest(request, "/queues/")
    if (found := _GET_RESULT.fullmatch(raw)) is not None:
        if limit is not None or after is not None:
            raise InvalidArgumentError("…/result takes only 'wait'")
        queue = store.queue(found.group(1))
        job_id = found.group(2)
        seconds = _wait_of(wait)
        if not seconds:
            result = await queue.result(job_id, wait=seconds)
        else:
            state = state_of(request)
            async with state.hold(principal_of(request), "poll"):
                result = await _unless_shutdown(state, queue.result(job_id, wait=seconds))
            if result is None and state.shutting_down.is_set():
                # The wait was cut short: one last look, so a finished job is never "pending".
                result = await queue.result(job_id)
        if result is None:
            return Response(ResultOut(job_id, "pending", None, None, None, None), status_code=202)
        return Response(_result_out(result))
    if wait is not None:
        raise InvalidArgumentError("only …/jobs/{id}/result takes 'wait'")
    if (found := _GET_STATS.fullmatch(raw)) is not None:
        if limit is not None or after is not None:
            raise InvalidArgumentError("…/stats takes no parameters")
        s = await store.queue(found.group(1)).stats()
        return Response(QueueStatsOut(s.ready, s.delayed, s.claimed, s.dead, s.done))
    if (found := _GET_DEAD.fullmatch(raw)) is not None:
        size = 100 if limit is None else limit
        jobs = await store.queue(found.group(1)).dead(size, after)
        more = size > 0 and len(jobs) == size
        return Response(DeadOut([_job_out(j) for j in jobs], jobs[-1].id if more else None))
    raise _no_route("GET", "queues", "…/stats, …/dead or …/jobs/{id}/result")


@delete(f"{_NS}/queues/{{rest:path}}", tags=_QUEUES, summary="Cancel a job", status_code=200)
async def delete_job(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    rest: _QueueDeletePath,
) -> CancelledOut:
    """``cancel``: ``{"cancelled": true}`` when the job was ready or delayed (it is gone);
    ``404`` when it was unknown, claimed, done or dead (nothing changed)."""
    store = access(request, namespace, Scope.WRITE)
    found = _DELETE_JOB.fullmatch(path_rest(request, "/queues/"))
    if found is None:
        raise _no_route("DELETE", "queues", "…/jobs/{id}")
    job_id = found.group(2)
    if not await store.queue(found.group(1)).cancel(job_id):
        raise KeyNotFoundError(
            f"job {job_id!r} is not ready or delayed in that queue (unknown, claimed, done, "
            "dead or cancelled): nothing changed"
        )
    return CancelledOut(True)


@get(f"{_NS}/queues", tags=_QUEUES, summary="List queues")
async def list_queues(request: Request[Any, Any, Any], namespace: FromPath[str]) -> QueuesOut:
    """Names of the queues holding at least one job or a result still held, ascending."""
    store = access(request, namespace, Scope.READ)
    return QueuesOut(await store.list_queues())


ROUTES = [
    post_lease,
    get_lease,
    put_agent,
    post_agent,
    delete_agent,
    get_agent,
    list_agents,
    post_queue,
    get_queue,
    delete_job,
    list_queues,
]
