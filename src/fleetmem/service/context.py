"""What every route of the service shares: its settings, its store, and the access check.

A route module (``kv``, ``coordination``, ``changes``, ``portability``) is a list of Litestar
handlers. Each handler begins with :func:`access`, which authenticates the request, checks the
token's globs and scope for the namespace of the path, and returns the store view of that
namespace; anything it raises is a fleetmem error or a :class:`Problem`, which the app turns
into ``application/problem+json``. A primitive added later adds a module of the same shape and
lists it in :data:`fleetmem.service.app.ROUTE_MODULES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from fleetmem.errors import InvalidArgumentError, InvalidKeyError
from fleetmem.protocol import Lease
from fleetmem.service.auth import OPEN_ACCESS, Principal, Scope, TokenTable
from fleetmem.service.problems import Problem
from fleetmem.store import Store, user_namespace

if TYPE_CHECKING:
    from litestar import Request

__all__ = [
    "MAX_WAIT_SECONDS",
    "ServiceSettings",
    "ServiceState",
    "access",
    "fence_header",
    "path_rest",
    "state_of",
]

# The longest a long poll (claim, result) may wait, as the contract says.
MAX_WAIT_SECONDS = 60.0
_VIEW_CACHE = 4096
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_PREFIX = b"/v1/ns/"


@dataclass(frozen=True)
class ServiceSettings:
    """Limits of a service. Every field has a default fit for one machine.

    ``max_body_bytes`` caps a request body (a batch, a queue put) and ``max_import_bytes`` an
    import's; a single value's body may hold the store's ``max_value_bytes`` plus 64 KiB of
    envelope. ``request_timeout`` bounds every request but the transfers and the event stream,
    and a long poll gets its ``wait`` on top; an export or an import (which count as streams of
    their token) is bounded by ``transfer_timeout``; an event stream has no end but the
    client's, the server's shutdown, or a failure. ``max_in_flight`` requests run at once; beyond it
    the server answers ``503`` with ``Retry-After`` at once instead of queueing (streams and long
    polls are not counted there: they are capped per token by ``max_streams_per_token`` and
    ``max_polls_per_token``, beyond which a token gets ``429``). ``shutdown_grace`` is how long
    requests in flight may take to finish after SIGTERM.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_import_bytes: int = 1024 * 1024 * 1024
    request_timeout: float = 30.0
    max_in_flight: int = 1024
    max_streams_per_token: int = 16
    max_polls_per_token: int = 64
    retry_after: int = 1
    shutdown_grace: float = 10.0
    sse_heartbeat: float = 15.0
    transfer_timeout: float = 3600.0

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_import_bytes",
            "max_in_flight",
            "max_streams_per_token",
            "max_polls_per_token",
            "retry_after",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, not {value!r}")
        for name in ("request_timeout", "shutdown_grace", "sse_heartbeat", "transfer_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgumentError(f"{name} must be a positive number, not {value!r}")


class ServiceState:
    """The state of one app: its store, tokens, settings, per-token counters, shutdown flag."""

    def __init__(
        self,
        store: Store[Any] | None,
        tokens: TokenTable | None,
        settings: ServiceSettings,
    ) -> None:
        self._store = store
        self.tokens = tokens
        self.settings = settings
        self.views: OrderedDict[str, Store[Any]] = OrderedDict()
        self.streams: dict[str, int] = {}
        self.polls: dict[str, int] = {}
        self.in_flight = 0
        self.shutting_down = asyncio.Event()
        self.instrumentation: Any = None
        # Single-entry GET and PUT answered without the framework (kv.fast_kv); the framework's
        # routes answer the same (tests compare the two with this off).
        self.fast_path = True

    @property
    def store(self) -> Store[Any]:
        if self._store is None:
            raise Problem(503, "store-closed", "the service is starting or stopping")
        return self._store

    def attach(self, store: Store[Any] | None) -> None:
        self._store = store
        self.views.clear()

    def view(self, namespace: str) -> Store[Any]:
        """The store view of ``namespace`` (validated), cached for the most recent ones."""
        views = self.views
        found = views.get(namespace)
        if found is not None:
            return found
        store = self.store
        name = user_namespace(namespace)
        found = store if name == store.namespace else store.with_namespace(name)
        views[namespace] = found
        if len(views) > _VIEW_CACHE:
            views.popitem(last=False)
        return found

    def authenticate(self, request: Request[Any, Any, Any]) -> Principal:
        return self.principal(request.headers.get("authorization"))

    def principal(self, header: str | None) -> Principal:
        """The principal of an ``Authorization`` header's value; ``401`` without a valid one."""
        tokens = self.tokens
        if tokens is None:
            return OPEN_ACCESS
        if header is None:
            raise Problem(
                401,
                "unauthorized",
                "this server needs a token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="fleetmem"'},
            )
        scheme, _, token = header.partition(" ")
        principal = tokens.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            raise Problem(
                401,
                "unauthorized",
                "the token is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="fleetmem", error="invalid_token"'},
            )
        return principal

    def allowed(self, principal: Principal, namespace: str, scope: Scope) -> Store[Any]:
        """The store view of ``namespace`` if ``principal`` may use it at ``scope``, else
        ``403`` (the same answer whether the namespace exists, or is a valid name, or not)."""
        if not principal.allows(namespace, scope):
            raise Problem(403, "forbidden", f"this token may not {_VERBS[scope]} that namespace")
        return self.view(namespace)

    @contextlib.asynccontextmanager
    async def hold(self, principal: Principal, kind: str) -> AsyncIterator[None]:
        """Count a long poll (``kind="poll"``) or an event stream (``"stream"``) against the
        token's cap while it runs; over the cap: ``429`` with ``Retry-After``."""
        counts = self.polls if kind == "poll" else self.streams
        cap = (
            self.settings.max_polls_per_token
            if kind == "poll"
            else self.settings.max_streams_per_token
        )
        key = principal.key
        if counts.get(key, 0) >= cap:
            what = "long polls" if kind == "poll" else "streams"
            raise Problem(
                429,
                "too-many-requests",
                f"this token already has {cap} open {what}",
                headers={"Retry-After": str(self.settings.retry_after)},
            )
        counts[key] = counts.get(key, 0) + 1
        try:
            yield
        finally:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]

    async def wait_or_shutdown(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until shutdown begins; ``True`` if shutdown began."""
        if self.shutting_down.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shutting_down.wait(), seconds)
        return self.shutting_down.is_set()


# Every service state of this process, so that a shutdown can tell them all at once.
STATES: weakref.WeakSet[ServiceState] = weakref.WeakSet()


def state_of(request: Request[Any, Any, Any]) -> ServiceState:
    state: ServiceState = request.app.state["fleetmem"]
    return state


def access(request: Request[Any, Any, Any], namespace: str, scope: Scope) -> Store[Any]:
    """Authenticate ``request`` and return the store view of ``namespace`` if its token may
    use it at ``scope``. A namespace outside the token's globs is ``403`` whether it exists or
    not (and whether it is a valid name or not: the answer does not depend on the store); a
    token whose globs allow the namespace but whose scope is too low is ``403`` too."""
    state: ServiceState = request.app.state["fleetmem"]
    return state.allowed(state.authenticate(request), namespace, scope)


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    return state_of(request).authenticate(request)


_VERBS = {Scope.READ: "read", Scope.WRITE: "write to", Scope.ADMIN: "administer"}


def path_rest(request: Request[Any, Any, Any], marker: str) -> str:
    """The part of the request's *raw* path after ``marker`` (e.g. ``"/kv/"``), percent-decoded
    once as UTF-8. Working from the raw path means a key is exactly what the client encoded:
    ``%2F`` is a ``/`` inside the key, ``..`` and ``//`` are kept, nothing is normalised."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    return raw_rest(raw, marker)


def raw_rest(raw: bytes, marker: str) -> str:
    """:func:`path_rest` of a raw ``/v1/ns/{namespace}/…`` path: the marker is looked for after
    the namespace segment (a namespace may itself be called ``kv`` or ``leases``)."""
    start = raw.find(b"/", len(_PREFIX)) if raw.startswith(_PREFIX) else 0
    at = raw.find(marker.encode("ascii"), max(start, 0))
    if at < 0:  # pragma: no cover - the router matched the marker
        raise InvalidKeyError("the path holds no name")
    rest = raw[at + len(marker) :]
    try:
        return unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidKeyError("the key in the path is not valid percent-encoded UTF-8") from None


def fence_header(request: Request[Any, Any, Any], namespace: str) -> Lease | None:
    """:func:`parse_fence` of the request's ``Fleetmem-Fence`` header."""
    return parse_fence(request.headers.get("fleetmem-fence"), namespace)


def parse_fence(header: str | None, namespace: str) -> Lease | None:
    """The lease named by a ``Fleetmem-Fence: <name>; token=<n>`` header, or ``None``.

    The lease name is percent-decoded (so any lease name can be written); only the name and
    the token count: the write succeeds only while that token is the lease's current one."""
    if header is None:
        return None
    name, sep, params = header.partition(";")
    token_text = ""
    for param in params.split(";"):
        field, _, value = param.strip().partition("=")
        if field.strip().lower() == "token":
            token_text = value.strip()
    if not sep or not name.strip() or not (token_text.isascii() and token_text.isdigit()):
        raise InvalidArgumentError(
            "Fleetmem-Fence must be '<lease name>; token=<fencing token>', e.g. "
            "'Fleetmem-Fence: deploy; token=42'"
        )
    try:
        lease_name = unquote_to_bytes(name.strip()).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError("the lease name in Fleetmem-Fence is not UTF-8") from None
    return Lease(lease_name, "", int(token_text), _EPOCH, _EPOCH, namespace)
