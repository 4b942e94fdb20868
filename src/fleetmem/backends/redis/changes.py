"""``RedisChanges``: the change feed of a namespace on Redis (standalone or Cluster).

Layout (see ``lua/changes/_feed.lua``), in the namespace's slot like all of its keys:

* ``fm:{<ns>}:f`` -- the feed's hash: ``r`` the retention in ms, there only while the feed is
  enabled (the flag every write script looks up); ``e`` the epoch; ``l`` the id of the newest
  change; ``f`` the floor (the id of the newest change trimmed); ``n`` when writes next trim
  the log.
* ``fm:{<ns>}:s`` -- the log, a stream. Every key-value write script (``lua/kv/``) declares both
  keys and, when the flag is there, ``XADD``s its changes in the same script, so a change is
  recorded if and only if its write is applied (also with a ``clear()`` made of several script
  calls: see ``lua/kv/clear.lua``). Each change has an id of its own, ``<ms>-<seq>``, above
  ``l`` (``ms`` is the server's time, or ``l``'s when the clock went back); a script runs alone,
  so id order is the order the writes took effect. The position of a change is
  ``(ms << 32) | seq``, so positions sort like the ids. The changes of one script go out
  together, up to 1000 per stream entry, with consecutive ids: the entry's id is that of its
  last change. One ``XADD`` per change would make a ``set_many`` of 10,000 entries 1.7 times
  slower; an entry of 1000 changes, about 1.15 times.

Epochs: ``TIME`` in microseconds at the ``enable``, and above the last epoch of the namespace,
which ``disable`` keeps in the hash (the rest of it and the log go): a cursor from
before a ``disable`` is always of an older epoch.

Trimming: ``read`` first drops every change older than the retention, exactly (``XTRIM
MINID``), after reading the id of the newest change it drops: that is the floor, kept in the
hash (``XINFO STREAM``'s ``max-deleted-entry-id`` is not moved by trims). Writes do the same
at most once a second, so a feed nobody reads does not grow past its retention.

Waiting: ``XREAD BLOCK`` on the log from the reader's position: it answers as soon as anything
follows that position, including a change written between the read that found nothing and the
``XREAD``, so no wake-up is lost; changes written by this process also wake its watchers
through the connector's :class:`~fleetmem._notify.Notifier`. The blocking reads run on
connections of their own (:class:`BlockingReads`), never on the client's pool, whose
connections other calls need and whose socket timeout is shorter than a block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, ClassVar

import redis.asyncio as aioredis

from fleetmem._notify import Watch
from fleetmem.backends.redis.connector import RedisConnector
from fleetmem.backends.redis.entries import ms_datetime, partition_name, stored_value
from fleetmem.backends.redis.scripts import CHANGE_SCRIPTS
from fleetmem.backends.seam import ChangeBackend, ChangeEvent, ChangePage

__all__ = ["BlockingReads", "RedisChanges", "position", "stream_id"]

_log = logging.getLogger("fleetmem.redis")

_ENABLE, _DISABLE = CHANGE_SCRIPTS["enable"], CHANGE_SCRIPTS["disable"]
_HEAD, _READ = CHANGE_SCRIPTS["head"], CHANGE_SCRIPTS["read"]

#: The longest ``XREAD BLOCK`` (ms): a wait longer than that returns early (and reads again).
_MAX_BLOCK_MS = 30_000
#: Seconds between two looks at a watch when the blocking read failed.
_POLL_STEP = 0.05
_SEQ_MASK = (1 << 32) - 1


def position(sid: bytes) -> int:
    """The feed position of stream id ``sid`` (``b"<ms>-<seq>"``): ``(ms << 32) | seq``."""
    ms, _, seq = sid.partition(b"-")
    return (int(ms) << 32) | int(seq)


def stream_id(pos: int) -> bytes:
    """The stream id of feed position ``pos`` (the inverse of :func:`position`)."""
    return b"%d-%d" % (pos >> 32, pos & _SEQ_MASK)


_OPS = {ord("s"): "set", ord("d"): "delete", ord("t"): "ttl", ord("c"): "clear"}


def _events(groups: list[list[Any]]) -> list[ChangeEvent]:
    """The changes of a ``read`` reply: per stream entry, the id of its first change returned
    and its time, then a head and a value per change (``lua/changes/_feed.lua``); the changes
    of an entry have consecutive positions."""
    out: list[ChangeEvent] = []
    append = out.append
    for group in groups:
        pos = position(group[0])
        at = ms_datetime(int(group[1]))
        for i in range(2, len(group), 2):
            head = group[i]
            op = _OPS[head[0]]
            key, part, ver, exp = head[1:].split(b"\0")
            if op == "clear":
                append(
                    ChangeEvent(
                        pos,
                        op,
                        None,
                        partition_name(part[1:]) if part else None,
                        None,
                        None,
                        None,
                        at,
                    )
                )
            else:
                append(
                    ChangeEvent(
                        pos,
                        op,
                        key.decode(),
                        partition_name(part),
                        int(ver) if ver else None,
                        stored_value(group[i + 1]) if op == "set" else None,
                        ms_datetime(int(exp)) if exp and exp != b"-1" else None,
                        at,
                    )
                )
            pos += 1
    return out


class RedisChanges(ChangeBackend):
    """The change feed of one namespace on the connector of a :class:`RedisKV
    <fleetmem.backends.redis.kv.RedisKV>` (see the module)."""

    #: Seconds an idle watcher's ``XREAD BLOCK`` lasts before the watch loop reads again.
    poll_interval: ClassVar[float] = 1.0

    def __init__(
        self, connector: RedisConnector, *, namespace: str, blocking: BlockingReads
    ) -> None:
        super().__init__(namespace=namespace, notifier=connector.notifier)
        self._connector = connector
        self._blocking = blocking
        prefix = f"fm:{{{namespace}}}:".encode()
        self._keys = (prefix, *self.feed_keys(namespace))
        self._feed, self._log = self._keys[1], self._keys[2]

    @staticmethod
    def feed_keys(namespace: str) -> tuple[bytes, bytes]:
        """The feed's hash and log of ``namespace``, as every script that may touch them
        declares them in ``KEYS`` (after the namespace prefix)."""
        prefix = f"fm:{{{namespace}}}:"
        return (prefix + "f").encode(), (prefix + "s").encode()

    def _call(self, script: Any, *args: Any) -> Any:
        # Every feed script is safe to send twice (enable and disable are idempotent, a read
        # only trims what is past retention): retried like a read.
        return self._connector.call(script, self._keys, *args, write=False)

    async def enable(self, retention_ms: int) -> None:
        await self._call(_ENABLE, retention_ms)

    async def disable(self) -> None:
        if await self._call(_DISABLE):
            self._notifier.notify_every(self.wake_key())  # this process's watchers see it

    async def enabled(self) -> bool:
        return bool(await self._connector.execute(False, "HEXISTS", self._feed, "r"))

    async def head(self) -> tuple[int, int]:
        # In a task of its own, like read(): a watch loop calls both.
        return await asyncio.shield(self._head())

    async def _head(self) -> tuple[int, int]:
        res = await self._call(_HEAD)
        if res is None:
            raise self.not_enabled()
        return int(res[0]), position(res[1])

    async def read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        """:meth:`_read` in a task of its own: a watch loop reads again and again, and the
        cancellation of its task must end it. redis-py sends every command under
        ``asyncio.wait_for``, which on Python 3.11 loses a cancellation that lands as the
        send completes; ``asyncio.shield`` raises it in the caller whatever the read does
        (the read then finishes by itself, its result dropped)."""
        return await asyncio.shield(self._read(epoch, after, limit))

    async def _read(self, epoch: int | None, after: int | None, limit: int) -> ChangePage:
        start = b"" if after is None else stream_id(after)
        res = await self._call(_READ, start, limit)
        if res is None:
            raise self.not_enabled()
        current, floor, head = int(res[0]), position(res[1]), position(res[2])
        if after is None:
            after = floor
        else:
            assert epoch is not None
            self.check_after(epoch, after, current, floor, head)
        events = _events(res[3:])
        return ChangePage(current, events, events[-1].pos if events else after)

    async def wait(self, watch: Watch, epoch: int, after: int, timeout: float) -> None:
        """An ``XREAD BLOCK`` of the log from ``after``: it returns as soon as a change
        follows ``after`` (one written since the caller's read included), or after
        ``timeout``. A change made by this process may have woken ``watch`` already. If the
        blocking read fails (a lost connection, a slot that moved), the rest of ``timeout``
        is a wait for ``watch``, polled: the caller's next read finds out what is wrong.

        The read runs in a task of its own, which this coroutine waits for with
        ``asyncio.wait``: a cancellation of the caller is never lost, even one that lands
        where redis-py would swallow it or as the read returns (``asyncio.wait_for`` of
        Python 3.11 loses those); the read is then cancelled too."""
        if await watch.wait(0):
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        read = self._blocking.start(self._log, stream_id(after), timeout)
        try:
            done, _ = await asyncio.wait({read}, timeout=timeout + self._connector.timeout)
        finally:
            if not read.done():
                read.cancel()
        if done and not read.cancelled() and read.exception() is None:
            return
        # The blocking read failed: poll the watch for the rest of the time (asyncio.sleep,
        # not Watch.wait's asyncio.wait_for, which may lose a cancellation on Python 3.11).
        while not self._blocking.closed and not await watch.wait(0):
            rest = deadline - loop.time()
            if rest <= 0:
                return
            await asyncio.sleep(min(rest, _POLL_STEP))


class BlockingReads:
    """The connections of the change feeds' ``XREAD BLOCK`` calls for one connector: a pool
    of their own (on a Cluster, one per node), made on first use, whose socket timeout
    outlasts the longest block. :meth:`aclose` (the backend's, before the connector's)
    disconnects them all, in use or not: a blocked read then fails at once, so closing the
    store ends every watch without waiting for a block to run out."""

    def __init__(self, connector: RedisConnector) -> None:
        self._connector = connector
        #: Node name ("" for a standalone server) -> its pool.
        self._pools: dict[str, Any] = {}
        #: The reads in flight (see :meth:`start`).
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _pool(self, key: bytes) -> Any:
        client = self._connector.client
        if self._connector.cluster:
            # The node serving the log's slot, as the client knows it (the read before the
            # wait went through the client, so its slot map is loaded and current).
            node = client.get_node_from_key(key)
            name, cls, kwargs = node.name, node.connection_class, node.connection_kwargs
        else:
            pool = client.connection_pool
            name, cls, kwargs = "", pool.connection_class, pool.connection_kwargs
        made = self._pools.get(name)
        if made is None:
            options = {
                k: v
                for k, v in kwargs.items()
                if k not in ("redis_connect_func", "event_dispatcher")
            }
            options["socket_timeout"] = _MAX_BLOCK_MS / 1000.0 + self._connector.timeout
            made = self._pools[name] = aioredis.ConnectionPool(connection_class=cls, **options)
        return made

    def start(self, key: bytes, start: bytes, timeout: float) -> asyncio.Task[None]:
        """A task running :meth:`read` (kept until done: :meth:`aclose` ends it); a failure
        is logged at debug level (the waiter falls back to polling)."""
        task = asyncio.get_running_loop().create_task(
            self.read(key, start, timeout), name="fleetmem redis change wait"
        )
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            _log.debug("Redis change feed: a blocking read failed: %s: %s", type(exc).__name__, exc)

    async def read(self, key: bytes, start: bytes, timeout: float) -> None:
        """``XREAD BLOCK`` of stream ``key`` after id ``start`` for up to ``timeout`` seconds;
        returns when it answers (whatever it answers). Raises what the connection raises."""
        if self._closed:
            return
        pool = self._pool(key)
        block = max(1, min(round(timeout * 1000), _MAX_BLOCK_MS))
        conn = await pool.get_connection()
        try:
            if not self.closed:  # the property: aclose() may have run meanwhile
                await conn.send_command("XREAD", "BLOCK", block, "STREAMS", key, start)
                await conn.read_response()
        finally:
            await pool.release(conn)
            if self.closed:  # made or released after aclose() disconnected the pool
                await conn.disconnect()

    async def aclose(self) -> None:
        self._closed = True
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=True)
        # Their connections gone, the reads end at once; one that redis-py kept going (a
        # cancellation swallowed while connecting) is cancelled until it is done.
        tasks = list(self._tasks)
        for _ in range(20):
            pending = [t for t in tasks if not t.done()]
            if not pending:
                return
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.05)
