"""Key-value routes: entries with ``ETag``/``If-Match`` compare-and-set, batches, listing.

The key is the rest of the path after ``/kv/``, taken from the raw path and percent-decoded
once: ``GET /v1/ns/fleet/kv/a%2Fb`` and ``GET /v1/ns/fleet/kv/a/b`` both name ``a/b``; ``%25``
is ``%``; ``.`` and ``..`` segments are kept as written (send them percent-encoded if a client
would normalise them). Every entry read or write answers with ``ETag: "<version>"``.

Decisions where the contract is silent: a ``PUT`` answers ``201`` when it created the entry
(version 1) and ``200`` otherwise; ``DELETE`` of a missing key is ``404`` (like ``GET``);
``If-Match`` takes one version (``*`` means "exists", checked as a compare-and-set against the
current version); a weak ETag (``W/"3"``) is read as ``"3"``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post, put
from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import (
    FromPath,
    FromQuery,
    HeaderParameter,
    JSONBody,
    PathParameter,
    QueryParameter,
)

from fleetmem.errors import (
    FleetmemError,
    InvalidArgumentError,
    KeyNotFoundError,
)
from fleetmem.protocol import Entry, Lease
from fleetmem.service.auth import Scope
from fleetmem.service.context import (
    ServiceState,
    access,
    fence_header,
    parse_fence,
    path_rest,
    raw_rest,
)
from fleetmem.service.problems import Problem, problem_for, send_problem
from fleetmem.store import Store

__all__ = ["ROUTES", "EntryOut"]

_NS = "/v1/ns/{namespace:str}"
_TAGS = ["kv"]


class EntryOut(msgspec.Struct):
    """An entry: its value and metadata. Times are RFC 3339 UTC."""

    key: str
    value: Any
    partition: str
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


class PutIn(msgspec.Struct, forbid_unknown_fields=True):
    """``value`` is any JSON value; ``ttl`` seconds (> 0) or absent for no expiry."""

    value: Any
    ttl: float | None = None
    partition: str | None = None
    keep_ttl: bool = False


class IncrIn(msgspec.Struct, forbid_unknown_fields=True):
    amount: int | float = 1
    ttl: float | None = None
    partition: str | None = None


class ExpireIn(msgspec.Struct, forbid_unknown_fields=True):
    ttl: float


class NumberOut(msgspec.Struct):
    key: str
    value: int | float


class UpdatedOut(msgspec.Struct):
    updated: bool


class DeletedOut(msgspec.Struct):
    deleted: bool


class CountOut(msgspec.Struct):
    count: int


class KeysOut(msgspec.Struct):
    """``next`` is the ``after`` of the next page, ``null`` on the last page."""

    keys: list[str]
    next: str | None


class ValuesOut(msgspec.Struct):
    values: dict[str, Any]


class KeysIn(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[str]


class ItemsIn(msgspec.Struct, forbid_unknown_fields=True):
    items: dict[str, Any]
    ttl: float | None = None
    partition: str | None = None


class PartitionsOut(msgspec.Struct):
    partitions: list[str]


class StatsOut(msgspec.Struct):
    namespace: str
    keys: int
    partitions: dict[str, int]
    expired_pending: int
    bytes: int
    backend: str


def _out(entry: Entry) -> EntryOut:
    return EntryOut(
        entry.key,
        entry.value,
        entry.partition,
        entry.version,
        entry.created_at,
        entry.updated_at,
        entry.expires_at,
    )


def _entry_response(entry: Entry, status: int = 200) -> Response[EntryOut]:
    return Response(_out(entry), status_code=status, headers={"ETag": f'"{entry.version}"'})


def _version_of(header: str, name: str) -> int | None:
    """The version of an ``If-Match`` header (``None`` for ``*``)."""
    text = header.strip()
    if text == "*":
        return None
    if text.startswith("W/"):
        text = text[2:]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not text.isdigit() or not text.isascii():
        raise InvalidArgumentError(
            f'{name} must be one entity tag holding a version, like "3" (or *), not {header!r}'
        )
    return int(text)


def _key(request: Request[Any, Any, Any], suffix: str = "") -> str:
    key = path_rest(request, "/kv/")
    if suffix:
        key = key[: -len(suffix)]
    return key


_KEY_DOC = "the key: the rest of the path, percent-decoded once"


async def read_entry(store: Store[Any], name: str) -> Entry:
    entry = await store.get_entry(name)
    if entry is None:
        raise KeyNotFoundError(f"no entry {name!r}")
    return entry


async def write_entry(
    store: Store[Any],
    name: str,
    data: PutIn,
    if_match: str | None,
    if_none_match: str | None,
    fence: Lease | None,
) -> Entry:
    """``PUT kv/{key}``: a ``set``, or with ``If-Match``/``If-None-Match`` a
    ``compare_and_set``."""
    expected: int | None = None
    exists_only = False
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise InvalidArgumentError("If-None-Match takes only * (create only)")
        expected = 0
    if if_match is not None:
        if expected is not None:
            raise InvalidArgumentError("send If-Match or If-None-Match, not both")
        expected = _version_of(if_match, "If-Match")
        exists_only = expected is None
    if exists_only:
        current = await store.get_entry(name)
        if current is None:
            raise Problem(
                412,
                "version-conflict",
                f"no entry {name!r}: If-Match: * needs one",
                current_version=0,
            )
        expected = current.version
    if expected is None:
        return await store.set(
            name,
            data.value,
            ttl=data.ttl,
            partition=data.partition,
            keep_ttl=data.keep_ttl,
            fence=fence,
        )
    if data.keep_ttl:
        raise InvalidArgumentError("keep_ttl cannot be combined with If-Match")
    return await store.compare_and_set(
        name, data.value, version=expected, ttl=data.ttl, partition=data.partition, fence=fence
    )


# ------------------------------------------------------------------ the fast path

_JSON = b"application/json"
# Lax like the framework's own body decoding ("5" is read as 5 for a number field), so that
# the same body gets the same answer on both paths.
_PUT_DECODER = msgspec.json.Decoder(PutIn, strict=False)
_ENCODER = msgspec.json.Encoder()


async def fast_kv(
    state: ServiceState,
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> bool:
    """Answer ``GET`` and ``PUT kv/{key}`` without the framework, or return ``False`` to let
    the framework's routes (:func:`get_entry`, :func:`put_entry`, which document these in the
    OpenAPI) answer. Same checks, same statuses, same bodies and headers: the framework costs
    about as much CPU per request as everything else together, and these two are most of a
    fleet's traffic (``docs/benchmarks.md#service``)."""
    method = scope["method"]
    if (method != "GET" and method != "PUT") or scope.get("query_string"):
        return False
    raw: bytes | None = scope.get("raw_path")
    if raw is None or not raw.startswith(b"/v1/ns/"):
        return False
    end = raw.find(b"/", 7)
    if end < 0 or raw[end : end + 4] != b"/kv/" or len(raw) == end + 4 or b"%" in raw[7:end]:
        return False
    namespace = raw[7:end].decode("latin-1")
    authorization = if_match = if_none_match = fence_text = None
    for header, value in scope["headers"]:
        if header == b"authorization":
            authorization = value.decode("latin-1")
        elif header == b"if-match":
            if_match = value.decode("latin-1")
        elif header == b"if-none-match":
            if_none_match = value.decode("latin-1")
        elif header == b"fleetmem-fence":
            fence_text = value.decode("latin-1")
    try:
        principal = state.principal(authorization)
        if method == "GET":
            store = state.allowed(principal, namespace, Scope.READ)
            entry = await read_entry(store, raw_rest(raw, "/kv/"))
            status = 200
        else:
            store = state.allowed(principal, namespace, Scope.WRITE)
            name = raw_rest(raw, "/kv/")
            chunks = []
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return True  # the client went away
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            try:
                data = _PUT_DECODER.decode(b"".join(chunks))
            except msgspec.DecodeError as exc:  # also a ValidationError
                raise Problem(400, "invalid-argument", f"body: {exc}"[:500]) from None
            except RecursionError:
                raise Problem(
                    400, "serialization", "the JSON body is nested too deeply to be read"
                ) from None
            fence = parse_fence(fence_text, store.namespace)
            entry = await write_entry(store, name, data, if_match, if_none_match, fence)
            status = 201 if entry.version == 1 else 200
    except Problem as problem:
        await send_problem(send, problem)
        return True
    except FleetmemError as exc:
        await send_problem(send, problem_for(exc))
        return True
    body = _ENCODER.encode(_out(entry))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                (b"etag", b'"%d"' % entry.version),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return True


_ETAG = [
    ResponseHeader(
        name="ETag",
        description='the entry\'s version as an entity tag, e.g. "3"',
        documentation_only=True,
    )
]


@get(f"{_NS}/kv/{{key:path}}", tags=_TAGS, summary="Read an entry", response_headers=_ETAG)
async def get_entry(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    key: Annotated[str, PathParameter(description=_KEY_DOC)],
) -> Response[EntryOut]:
    """The entry (value and metadata); ``404`` if missing or expired."""
    store = access(request, namespace, Scope.READ)
    return _entry_response(await read_entry(store, _key(request)))


@put(
    f"{_NS}/kv/{{key:path}}",
    tags=_TAGS,
    summary="Write an entry",
    status_code=200,
    response_headers=_ETAG,
    responses={201: ResponseSpec(data_container=EntryOut, description="the entry was created")},
)
async def put_entry(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    data: JSONBody[PutIn],
    key: Annotated[str, PathParameter(description=_KEY_DOC)],
    if_match: Annotated[str | None, HeaderParameter(name="If-Match")] = None,
    if_none_match: Annotated[str | None, HeaderParameter(name="If-None-Match")] = None,
    fleetmem_fence: Annotated[
        str | None,
        HeaderParameter(
            name="Fleetmem-Fence",
            description="'<lease name>; token=<n>': write only while that lease token is current",
        ),
    ] = None,
) -> Response[EntryOut]:
    """``set``; with ``If-Match: "<v>"`` a ``compare_and_set`` (``"0"`` or
    ``If-None-Match: *``: create only); a mismatch is ``412`` with ``current_version``."""
    store = access(request, namespace, Scope.WRITE)
    name = _key(request)
    fence = fence_header(request, store.namespace)
    entry = await write_entry(store, name, data, if_match, if_none_match, fence)
    return _entry_response(entry, 201 if entry.version == 1 else 200)


@delete(f"{_NS}/kv/{{key:path}}", tags=_TAGS, summary="Delete an entry", status_code=200)
async def delete_entry(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    key: Annotated[str, PathParameter(description=_KEY_DOC)],
    fleetmem_fence: Annotated[str | None, HeaderParameter(name="Fleetmem-Fence")] = None,
) -> DeletedOut:
    """``{"deleted": true}``; ``404`` if there was nothing to delete. ``If-Match`` is refused
    (``400``): the store has no compare-and-delete, and ignoring the header would delete
    whatever version is there."""
    store = access(request, namespace, Scope.WRITE)
    if request.headers.get("if-match") is not None:
        raise InvalidArgumentError(
            "DELETE does not take If-Match: the store has no compare-and-delete"
        )
    name = _key(request)
    fence = fence_header(request, store.namespace)
    if not await store.delete(name, fence=fence):
        raise KeyNotFoundError(f"no entry {name!r}")
    return DeletedOut(True)


# ``incr``, ``expire`` and ``persist`` are POSTs on ``kv/{key}/<verb>``. The router sends every
# POST under ``kv/`` here, and the verb is the last segment.
_VERBS = ("/incr", "/expire", "/persist")


@post(f"{_NS}/kv/{{key:path}}", tags=_TAGS, summary="incr, expire or persist", status_code=200)
async def post_entry(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    key: Annotated[
        str,
        PathParameter(
            description="the key followed by /incr, /expire or /persist",
            pattern=r"^.+/(incr|expire|persist)$",
        ),
    ],
    data: JSONBody[dict[str, Any] | None] = None,
    fleetmem_fence: Annotated[str | None, HeaderParameter(name="Fleetmem-Fence")] = None,
) -> Response[NumberOut | UpdatedOut]:
    """``…/incr`` ``{"amount"?, "ttl"?, "partition"?}`` → ``{"key", "value"}``;
    ``…/expire`` ``{"ttl"}`` and ``…/persist`` → ``{"updated": bool}``; ``404`` when the key
    is missing (expire, persist)."""
    store = access(request, namespace, Scope.WRITE)
    raw = _key(request)
    verb = next((v for v in _VERBS if raw.endswith(v)), None)
    if verb is None:
        raise KeyNotFoundError("POST under kv/ takes …/incr, …/expire or …/persist")
    name = raw[: -len(verb)]
    body = data or {}
    if verb == "/incr":
        args = msgspec.convert(body, IncrIn, strict=True)
        fence = fence_header(request, store.namespace)
        value = await store.incr(
            name, args.amount, ttl=args.ttl, partition=args.partition, fence=fence
        )
        return Response(NumberOut(name, value))
    if verb == "/expire":
        ttl = msgspec.convert(body, ExpireIn, strict=True).ttl
        updated = await store.expire(name, ttl)
    else:
        if body:
            raise InvalidArgumentError("persist takes no body")
        updated = await store.persist(name)
    if not updated:
        raise KeyNotFoundError(f"no entry {name!r}")
    return Response(UpdatedOut(True))


@get(f"{_NS}/keys", tags=_TAGS, summary="List keys")
async def list_keys(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    prefix: FromQuery[str] = "",
    partition: FromQuery[str | None] = None,
    limit: Annotated[int | None, QueryParameter(ge=0)] = None,
    after: FromQuery[str | None] = None,
) -> KeysOut:
    """Keys in ascending order; ``next`` is the ``after`` of the next page when ``limit``
    filled this one."""
    store = access(request, namespace, Scope.READ)
    keys = await store.keys(prefix, partition=partition, limit=limit, after=after)
    more = limit is not None and limit > 0 and len(keys) == limit
    return KeysOut(keys, keys[-1] if more else None)


@get(f"{_NS}/search", tags=_TAGS, summary="Search keys by glob")
async def search(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    pattern: FromQuery[str],
    partition: FromQuery[str | None] = None,
    limit: Annotated[int | None, QueryParameter(ge=0)] = None,
) -> ValuesOut:
    """The entries whose key matches the glob ``pattern`` (``*``, ``?``, ``[...]``)."""
    store = access(request, namespace, Scope.READ)
    return ValuesOut(await store.search(pattern, partition=partition, limit=limit))


@post(f"{_NS}/batch/get", tags=_TAGS, summary="Read many", status_code=200)
async def batch_get(
    request: Request[Any, Any, Any], namespace: FromPath[str], data: JSONBody[KeysIn]
) -> ValuesOut:
    """The values of the keys that exist (missing keys are absent from ``values``)."""
    store = access(request, namespace, Scope.READ)
    return ValuesOut(await store.get_many(data.keys))


@post(f"{_NS}/batch/set", tags=_TAGS, summary="Write many", status_code=200)
async def batch_set(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    data: JSONBody[ItemsIn],
    fleetmem_fence: Annotated[str | None, HeaderParameter(name="Fleetmem-Fence")] = None,
) -> CountOut:
    """``set_many``: atomic where the backend's ``set_many`` is; ``count`` entries written."""
    store = access(request, namespace, Scope.WRITE)
    fence = fence_header(request, store.namespace)
    n = await store.set_many(data.items, ttl=data.ttl, partition=data.partition, fence=fence)
    return CountOut(n)


@post(f"{_NS}/batch/delete", tags=_TAGS, summary="Delete many", status_code=200)
async def batch_delete(
    request: Request[Any, Any, Any],
    namespace: FromPath[str],
    data: JSONBody[KeysIn],
    fleetmem_fence: Annotated[str | None, HeaderParameter(name="Fleetmem-Fence")] = None,
) -> CountOut:
    """``delete_many``: ``count`` entries deleted."""
    store = access(request, namespace, Scope.WRITE)
    fence = fence_header(request, store.namespace)
    return CountOut(await store.delete_many(data.keys, fence=fence))


@get(f"{_NS}/partitions", tags=_TAGS, summary="List partitions")
async def partitions(request: Request[Any, Any, Any], namespace: FromPath[str]) -> PartitionsOut:
    store = access(request, namespace, Scope.READ)
    return PartitionsOut(await store.partitions())


@delete(
    f"{_NS}/partitions/{{partition:str}}", tags=_TAGS, summary="Clear a partition", status_code=200
)
async def clear_partition(
    request: Request[Any, Any, Any], namespace: FromPath[str], partition: FromPath[str]
) -> CountOut:
    """``clear_partition`` (admin): ``count`` entries deleted."""
    store = access(request, namespace, Scope.ADMIN)
    return CountOut(await store.clear_partition(partition))


@post(f"{_NS}/clear", tags=_TAGS, summary="Clear the namespace", status_code=200)
async def clear(request: Request[Any, Any, Any], namespace: FromPath[str]) -> CountOut:
    """``clear`` (admin): every entry of the namespace deleted (snapshots are kept)."""
    store = access(request, namespace, Scope.ADMIN)
    return CountOut(await store.clear())


@get(f"{_NS}/stats", tags=_TAGS, summary="Namespace statistics")
async def stats(request: Request[Any, Any, Any], namespace: FromPath[str]) -> StatsOut:
    store = access(request, namespace, Scope.READ)
    s = await store.stats()
    return StatsOut(s.namespace, s.keys, dict(s.partitions), s.expired_pending, s.bytes, s.backend)


ROUTES = [
    get_entry,
    put_entry,
    delete_entry,
    post_entry,
    list_keys,
    search,
    batch_get,
    batch_set,
    batch_delete,
    partitions,
    clear_partition,
    clear,
    stats,
]
