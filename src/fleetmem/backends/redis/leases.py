"""``RedisLeases``: leases with fencing tokens on Redis, and the listener of their releases.

Layout (see ``lua/leases/_lib.lua``): a lease is the hash ``fm:{<ns>}:l:<name>`` (owner, token,
acquired, expires, TTL; times in ms on the server's ``TIME``), in its namespace's slot, with no
native TTL: it keeps the last token after a release (which sets the expiry to now) or an
expiry, so ``acquire`` (one script: ``HINCRBY`` of the token) always grants a greater one.
Fenced key-value writes read the same hash in their own script (``lua/kv/_fence.lua``).

Tokens grow across releases, expiries and client restarts. Across a restart of Redis they
grow only as far as Redis's persistence keeps the hash: with AOF ``appendfsync always`` every
grant survives; with ``everysec`` or RDB snapshots, a crash may lose the last grants and a
token may be granted twice; without persistence, tokens start again from 1. A failover to a
replica that had not received the last grants has the same effect (replication is
asynchronous). See docs/backends/redis.md.

Wake-ups: ``release`` publishes ``<ns>\\0<name>`` on the channel ``fm:leases``. The first
waiting ``acquire`` of a connector starts ONE :class:`ReleaseListener` (one pub/sub
connection, shared by every view and namespace) that wakes the waiters of the connector's
:class:`~fleetmem._notify.Notifier`; a waiter is also woken by a release made in its own
process at once, and polls at least once a second (``poll_interval``) whatever happens. On a
Cluster a classic ``PUBLISH`` reaches every node, so the listener subscribes on one node of its
choice. A lost subscription is opened again with a backoff (up to 2 s), and every waiter is
woken then, since releases may have been missed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fleetmem.backends.redis.connector import RedisConnector
from fleetmem.backends.redis.entries import ms_datetime
from fleetmem.backends.redis.scripts import LEASE_SCRIPTS
from fleetmem.backends.seam import LeaseBackend, lease_lost
from fleetmem.protocol import Lease

__all__ = ["CHANNEL", "RedisLeases", "ReleaseListener"]

_log = logging.getLogger("fleetmem.redis")

#: The channel every release is published on (``lua/leases/_lib.lua``).
CHANNEL = b"fm:leases"

_ACQUIRE, _RENEW = LEASE_SCRIPTS["acquire"], LEASE_SCRIPTS["renew"]
_RELEASE, _HOLDER = LEASE_SCRIPTS["release"], LEASE_SCRIPTS["holder"]

#: Seconds without any message after which the listener pings its connection, and after which
#: (without even the pong) it takes the connection for dead and opens another.
_IDLE_PING, _IDLE_DEAD = 15.0, 30.0
#: The first and the longest pause before the listener subscribes again after a failure.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0


class ReleaseListener:
    """One pub/sub subscription to :data:`CHANNEL` per connector: every release published by
    any process wakes this process's waiters of that ``(namespace, name)``.

    Started by :meth:`start` (the first waiting ``acquire``), stopped by :meth:`aclose` (the
    connector's ``aclose``). Its task never outlives the connector.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self._connector = connector
        self._notifier = connector.notifier
        self._task: asyncio.Task[None] | None = None
        #: Set while the subscription is confirmed by the server.
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def subscribed(self) -> bool:
        """Whether the subscription is up (confirmed by the server) right now."""
        return self._ready.is_set()

    async def start(self, wait: float) -> None:
        """Start the listener if it is not running, and wait up to ``wait`` seconds for its
        subscription: a release published after this returns wakes the caller's watch. If the
        server cannot be reached, return anyway (the waiter polls; the listener keeps trying)."""
        if self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="fleetmem redis lease listener"
            )
        if not self._ready.is_set():
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ready.wait()), wait)

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    def _dispatch(self, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        namespace, sep, name = data.partition(b"\0")
        if sep:
            self._notifier.notify((namespace.decode(), name.decode()))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = _BACKOFF_FIRST
        while not self._closed:
            pubsub: Any = None
            owner: Any = None
            try:
                pubsub, owner = await self._connector.open_pubsub()
                await pubsub.subscribe(CHANNEL)
                last = loop.time()
                pinged = False
                while True:
                    message = await pubsub.get_message(timeout=0.5)
                    now = loop.time()
                    if message is None:
                        if now - last > _IDLE_DEAD:
                            raise ConnectionError("no reply to a PING on the lease channel")
                        if now - last > _IDLE_PING and not pinged:
                            await pubsub.ping()
                            pinged = True
                        continue
                    last, pinged = now, False
                    kind = message.get("type")
                    if kind in ("message", b"message"):
                        self._dispatch(message.get("data"))
                    elif kind in ("subscribe", b"subscribe") and not self._ready.is_set():
                        self._ready.set()
                        pause = _BACKOFF_FIRST
                        # Releases made while no subscription was up reached nobody.
                        self._notifier.notify_all()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: subscribe again after a pause
                if self._ready.is_set():
                    _log.info(
                        "Redis (%s): lease release channel lost (%s: %s); subscribing again",
                        self._connector.where,
                        type(exc).__name__,
                        exc,
                    )
                else:
                    _log.debug("Redis lease release channel: %s: %s", type(exc).__name__, exc)
            finally:
                self._ready.clear()
                await _close_quietly(pubsub, owner)
            self._notifier.notify_all()
            if self._closed or self._connector.is_closed():
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, _BACKOFF_MAX)


async def _close_quietly(pubsub: Any, owner: Any) -> None:
    """Close a PubSub and the client or pool it came from; errors do not matter here."""
    if pubsub is not None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
    if owner is not None:
        with contextlib.suppress(Exception):
            await owner.disconnect()


class RedisLeases(LeaseBackend):
    """The leases of one namespace on Redis (see the module docstring). Built by
    ``RedisKV.leases()``; shares its connector (client, deadline, error translation)."""

    def __init__(self, connector: RedisConnector, *, namespace: str) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._connector = connector
        self._keys = (f"fm:{{{namespace}}}:".encode(),)

    def _lease(self, name: str, owner: Any, token: Any, acquired: Any, expires: Any) -> Lease:
        who = owner.decode() if isinstance(owner, bytes) else str(owner)
        return Lease(
            name, who, int(token), ms_datetime(acquired), ms_datetime(expires), self._namespace
        )

    async def acquire(self, name: str, owner: str, ttl_ms: int) -> tuple[Lease | None, int | None]:
        res = await self._connector.call(_ACQUIRE, self._keys, name, owner, ttl_ms, write=True)
        if res[0] == 1:
            return self._lease(name, owner, res[1], res[2], res[3]), None
        return None, int(res[1])

    async def renew(self, name: str, token: int, ttl_ms: int | None) -> Lease:
        ttl = b"" if ttl_ms is None else ttl_ms
        res = await self._connector.call(_RENEW, self._keys, name, token, ttl, write=True)
        if res is None:
            raise lease_lost(name, token)
        return self._lease(name, res[0], token, res[1], res[2])

    async def release(self, name: str, token: int) -> bool:
        res = await self._connector.call(_RELEASE, self._keys, name, token, write=True)
        if res != 1:
            return False
        # This process's waiters at once (the published message wakes them again: harmless).
        self._notifier.notify((self._namespace, name))
        return True

    async def holder(self, name: str) -> Lease | None:
        res = await self._connector.call(_HOLDER, self._keys, name, write=False)
        if res is None:
            return None
        return self._lease(name, *res)

    async def listen(self) -> None:
        """Start the connector's :class:`ReleaseListener` (once) and wait, up to the
        connector's deadline, for its subscription."""
        connector = self._connector
        listener = connector.release_listener
        if listener is None:
            listener = connector.release_listener = ReleaseListener(connector)
        await listener.start(connector.timeout)
