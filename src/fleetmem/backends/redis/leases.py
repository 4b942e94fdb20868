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

Wake-ups: ``release`` publishes ``<ns>\\0<name>\\0<origin>`` on the channel ``fm:leases``
(``origin``: the releasing connector's random id, :attr:`RedisConnector.origin`). The first
waiting ``acquire`` of a connector starts ONE :class:`ReleaseListener` (one pub/sub
connection, shared by every view and namespace) that wakes the waiters of the connector's
:class:`~fleetmem._notify.Notifier`; a release made through the same connector wakes them at
once (so the listener skips that connector's own messages), and a waiter polls at least once a
second (``poll_interval``) whatever happens. On a Cluster a classic ``PUBLISH`` reaches every
node, so the listener subscribes on one node of its choice. A lost subscription is opened
again with a backoff (up to 2 s), and every waiter is woken then, since releases may have been
missed meanwhile.

The same subscription carries the work queues' wake-ups (``queues.py``): it subscribes to
:data:`QUEUE_CHANNEL` too, in the same ``SUBSCRIBE``, and wakes claim waiters
(``p\\0<ns>\\0<queue>\\0<origin>\\0<count>``: ``count`` of them) and result waiters
(``r\\0<ns>\\0<job id>\\0<origin>``: all of them), skipping its own connector's messages too.
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

__all__ = ["CHANNEL", "QUEUE_CHANNEL", "RedisLeases", "ReleaseListener"]

_log = logging.getLogger("fleetmem.redis")

#: The channel every release is published on (``lua/leases/_lib.lua``).
CHANNEL = b"fm:leases"
#: The channel of the work queues' wake-ups (``lua/queues/_lib.lua``).
QUEUE_CHANNEL = b"fm:queues"

_ACQUIRE, _RENEW = LEASE_SCRIPTS["acquire"], LEASE_SCRIPTS["renew"]
_RELEASE, _HOLDER = LEASE_SCRIPTS["release"], LEASE_SCRIPTS["holder"]

#: Seconds without any message after which the listener pings its connection, and after which
#: (without even the pong) it takes the connection for dead and opens another.
_IDLE_PING, _IDLE_DEAD = 15.0, 30.0
#: The first and the longest pause before the listener subscribes again after a failure.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0


class ReleaseListener:
    """One pub/sub subscription to :data:`CHANNEL` and :data:`QUEUE_CHANNEL` per connector:
    every release published by any process wakes this process's waiters of that
    ``(namespace, name)``; every put or awaited result, the waiters of that queue or job.

    Started by :meth:`start` (the first waiting ``acquire``), stopped by :meth:`aclose` (the
    connector's ``aclose``). Its task never outlives the connector. Every waiter is woken when
    a subscription is confirmed and when one fails: releases published while none was up
    reached nobody, so the waiters look again.
    """

    def __init__(self, connector: RedisConnector) -> None:
        self._connector = connector
        self._notifier = connector.notifier
        self._origin = connector.origin
        self._task: asyncio.Task[None] | None = None
        #: Set while the subscription is confirmed by the server.
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def subscribed(self) -> bool:
        """Whether the subscription is up (confirmed by the server) right now."""
        return self._ready.is_set()

    async def start(self, wait: float) -> None:
        """Start the listener if it is not running, and wait up to ``wait`` seconds (0: not at
        all) for its subscription. If the server cannot be reached, return anyway (the waiter
        polls; the listener keeps trying)."""
        if self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="fleetmem redis lease listener"
            )
        if wait > 0 and not self._ready.is_set():
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            # redis-py can swallow a cancellation that lands while it sets up a connection: the
            # task then goes on. Cancel again until it is done (the loop also stops on _closed).
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.1)

    def _dispatch(self, channel: Any, data: Any) -> None:
        if not isinstance(data, bytes):
            return
        parts = data.split(b"\0")
        if channel == QUEUE_CHANNEL:
            self._dispatch_queue(parts)
            return
        if len(parts) != 3 or parts[2] == self._origin:
            return  # not ours to read, or a release of this connector: its waiters know
        self._notifier.notify((parts[0].decode(), parts[1].decode()))

    def _dispatch_queue(self, parts: list[bytes]) -> None:
        """A work queue's wake-up; the keys are the seam's ``QueueBackend.claim_key`` and
        ``QueueBackend.result_key``. This connector's own messages are skipped: it woke its
        waiters when its call returned."""
        kind = parts[0]
        if kind == b"p" and len(parts) == 5 and parts[3] != self._origin:
            try:
                count = int(parts[4])
            except ValueError:
                return
            self._notifier.notify(("queue", parts[1].decode(), parts[2].decode()), count)
        elif kind == b"r" and len(parts) == 4 and parts[3] != self._origin:
            self._notifier.notify_every(("result", parts[1].decode(), parts[2].decode()))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pause = _BACKOFF_FIRST
        while not self._closed:
            pubsub: Any = None
            owner: Any = None
            try:
                pubsub, owner = await self._connector.open_pubsub()
                # One SUBSCRIBE: both channels are subscribed before its first confirmation.
                await pubsub.subscribe(CHANNEL, QUEUE_CHANNEL)
                last = loop.time()
                pinged = False
                while not self._closed:
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
                        self._dispatch(message.get("channel"), message.get("data"))
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
        """One ``acquire`` script call, unless another coroutine of this process is asking
        for the same lease right now and wins it: then this call is refused without a round
        trip (the lease was granted, and still held, at a moment inside this call).

        Without that, a release woke every waiter of the name in this process and each sent
        an ``acquire`` that all but one lose: 7 calls per grant with 8 waiters. A call that
        lost is never shared: it may have been sent before the release that woke this one."""
        key = (self._namespace, name)
        attempts = self._connector.lease_attempts
        pending = attempts.get(key)
        if pending is not None:
            won = await asyncio.shield(pending)
            if won is not None:
                return None, won
        attempt: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        attempts[key] = attempt
        won_ms = None
        try:
            res = await self._connector.call(_ACQUIRE, self._keys, name, owner, ttl_ms, write=True)
            if res[0] == 1:
                won_ms = ttl_ms
                return self._lease(name, owner, res[1], res[2], res[3]), None
            return None, int(res[1])
        finally:
            attempt.set_result(won_ms)
            if attempts.get(key) is attempt:
                del attempts[key]

    async def renew(self, name: str, token: int, ttl_ms: int | None) -> Lease:
        ttl = b"" if ttl_ms is None else ttl_ms
        res = await self._connector.call(_RENEW, self._keys, name, token, ttl, write=True)
        if res is None:
            raise lease_lost(name, token)
        return self._lease(name, res[0], token, res[1], res[2])

    async def release(self, name: str, token: int) -> bool:
        connector = self._connector
        try:
            res = await connector.call(
                _RELEASE, self._keys, name, token, connector.origin, write=True
            )
        except BaseException:
            # Maybe released (a reply lost in flight): wake this process's waiters to look.
            self._notifier.notify((self._namespace, name))
            raise
        if res != 1:
            return False
        # This process's waiters at once; the listener skips this connector's own message.
        self._notifier.notify((self._namespace, name))
        return True

    async def holder(self, name: str) -> Lease | None:
        res = await self._connector.call(_HOLDER, self._keys, name, write=False)
        if res is None:
            return None
        return self._lease(name, *res)

    async def listen(self) -> None:
        """Start the connector's :class:`ReleaseListener` (once), without waiting for its
        subscription: the waiter tries at once. A release it could miss (made before the
        subscription is up) cannot be lost, since the listener wakes every waiter when its
        subscription is confirmed (and whenever it fails); with no subscription possible
        (``SUBSCRIBE`` refused) waiters poll."""
        connector = self._connector
        listener = connector.release_listener
        if listener is None:
            listener = connector.release_listener = ReleaseListener(connector)
        await listener.start(0)
