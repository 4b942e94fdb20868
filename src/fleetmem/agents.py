"""The agent registry: ``store.agents`` (see ``docs/coordination.md``).

An agent registers with an ``info`` object and a TTL, heartbeats to stay live, and is gone on
every path (``get``, ``list``, ``count``) once its TTL passes on the server's clock. Its
``generation`` grows each time it registers again after it was gone, so a fleet can tell "this
agent restarted" from "still the same run"; a late heartbeat never revives a gone agent
(:class:`~fleetmem.errors.AgentGoneError`). Every argument is checked before any I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fleetmem._codec import encode_value
from fleetmem._validate import validate_limit, validate_name, validate_ttl
from fleetmem.backends.seam import AgentBackend
from fleetmem.errors import SerializationError
from fleetmem.protocol import Agent

__all__ = ["DEFAULT_AGENT_TTL", "AgentRegistry"]

#: The TTL of a registration when none is given, in seconds.
DEFAULT_AGENT_TTL = 30.0


def _agent_id(agent_id: object) -> str:
    return validate_name(agent_id, "agent id")


class AgentRegistry:
    """The agents of one namespace: ``store.agents``."""

    __slots__ = ("_backend", "_check_open", "_max_value_bytes")

    def __init__(
        self, backend: AgentBackend, check_open: Callable[[], None], max_value_bytes: int
    ) -> None:
        self._backend = backend
        self._check_open = check_open
        self._max_value_bytes = max_value_bytes

    @property
    def namespace(self) -> str:
        return self._backend.namespace

    @property
    def backend(self) -> AgentBackend:
        """The technology's agent registry (the typed seam)."""
        return self._backend

    def _info(self, info: object) -> bytes:
        if not isinstance(info, dict):
            raise SerializationError(
                f"agent info must be a dict (a JSON object), not {type(info).__name__}"
            )
        return encode_value(info, self._max_value_bytes)

    async def register(
        self,
        agent_id: str,
        *,
        info: dict[str, Any] | None = None,
        ttl: float | timedelta = DEFAULT_AGENT_TTL,
    ) -> Agent:
        """Register ``agent_id`` (live for ``ttl`` seconds). A live agent keeps its
        ``registered_at`` and ``generation`` and gets the new info and TTL; an absent or gone
        one is created with a generation greater than any earlier one of that id."""
        aid = _agent_id(agent_id)
        payload = self._info({} if info is None else info)
        ttl_ms = validate_ttl(ttl)
        self._check_open()
        return await self._backend.register(aid, payload, ttl_ms)

    async def heartbeat(
        self,
        agent_id: str,
        *,
        ttl: float | timedelta | None = None,
        info: dict[str, Any] | None = None,
    ) -> Agent:
        """Extend a live agent by ``ttl`` (``None``: the TTL last given to ``register`` or
        ``heartbeat``), replacing its info when ``info`` is given. An absent or expired agent
        raises :class:`~fleetmem.errors.AgentGoneError` and nothing changes."""
        aid = _agent_id(agent_id)
        payload = None if info is None else self._info(info)
        ttl_ms = None if ttl is None else validate_ttl(ttl)
        self._check_open()
        return await self._backend.heartbeat(aid, ttl_ms, payload)

    async def deregister(self, agent_id: str) -> bool:
        """Remove a live agent; ``True`` if it was live. Its generation is remembered."""
        aid = _agent_id(agent_id)
        self._check_open()
        return await self._backend.deregister(aid)

    async def get(self, agent_id: str) -> Agent | None:
        """The live agent ``agent_id``, or ``None``."""
        aid = _agent_id(agent_id)
        self._check_open()
        return await self._backend.get(aid)

    async def list(
        self, prefix: str = "", *, limit: int | None = None, after: str | None = None
    ) -> list[Agent]:
        """Live agents whose id starts with ``prefix``, ascending by id; pages like
        ``keys()`` (``after``: an exclusive cursor, the last id of a page)."""
        if prefix != "" or not isinstance(prefix, str):
            validate_name(prefix, "agent id prefix")
        lim = validate_limit(limit)
        if after is not None:
            _agent_id(after)
        self._check_open()
        if lim == 0:
            return []
        return await self._backend.list(prefix, lim, after)

    async def count(self) -> int:
        """The number of live agents."""
        self._check_open()
        return await self._backend.count()
