"""A blocking facade over the async stores, for scripts and notebooks that do not use asyncio.

::

    import fleetmem.sync

    with fleetmem.sync.open_store("redis://localhost:6379/0", namespace="agents") as store:
        store.set("plan", {"step": 1}, ttl=60)
        store.get("plan")

:func:`open_store` takes the arguments of :func:`fleetmem.open_store` and returns a
:class:`SyncStore`: every method of the async :class:`~fleetmem.protocol.MemoryStore`, with the
same signature and the same behaviour, returning the result instead of a coroutine.

Threading model
    Each :class:`SyncStore` (with its ``with_namespace`` views) owns one private event loop,
    run by one daemon thread (``fleetmem-sync-N``). A call submits the async method to that loop
    with :func:`asyncio.run_coroutine_threadsafe` and blocks the calling thread until it is done.
    Any number of threads may call one store at once: their calls run concurrently on the loop,
    as concurrent coroutines would (concurrent single-key calls are merged into batches). A
    thread that runs an event loop of its own (a Jupyter cell, an ``async def``) may call it too:
    that loop is blocked for the duration of the call, and nothing else is needed.

Leases and agents
    ``store.leases`` (a :class:`SyncLeases`) and ``store.agents`` (a :class:`SyncAgents`) are
    the blocking twins of :class:`~fleetmem.leases.Leases` and
    :class:`~fleetmem.agents.AgentRegistry`. ``store.leases.lock(...)`` is a plain ``with``
    context manager: the lease is renewed in the background by a task on the store's loop
    thread, so it stays held while the calling thread blocks, sleeps or computes. It yields the
    same :class:`~fleetmem.leases.HeldLease` as the async lock; its ``lost`` is an
    :class:`asyncio.Event` of the loop thread, which another thread may read with
    ``held.lost.is_set()`` (a plain flag) but must not ``wait()`` on.

Errors
    Whatever the async method raises is raised in the calling thread: the same exception object,
    the same class, its traceback showing the frames of the loop thread where it was raised. A
    call made *on* the store's loop thread (code the store itself runs, such as a ``Mapping``
    handed to ``set_many`` that calls the store back) would wait for itself forever: it raises
    :class:`SyncDeadlockError` instead. Calls on a closed store raise
    :class:`~fleetmem.errors.StoreClosedError`, except ``health()``, which never raises.

Lifecycle
    ``close()`` closes the async store (calls in flight in other threads finish or fail as they
    would against a closing async store), cancels whatever still runs on the loop (those callers
    get :class:`~fleetmem.errors.StoreClosedError`), stops the loop and joins its thread. It is
    idempotent and safe from any thread but the loop's. A store never closed is closed at
    interpreter exit (waiting at most :data:`EXIT_CLOSE_TIMEOUT` seconds), or, when it is
    garbage-collected first, closed in the background without blocking the collecting thread,
    with a :class:`ResourceWarning` as for an unclosed file.

Processes
    The loop thread does not survive ``os.fork()``: in a forked child (``multiprocessing`` with
    the ``fork`` start method) a store opened by the parent is closed, and a call raises
    :class:`~fleetmem.errors.StoreClosedError` saying so instead of waiting forever. Open stores
    in the process that uses them.

This module imports only the standard library and fleetmem; ``import fleetmem`` does not import
it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import os
import threading
import warnings
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from fleetmem.backends.seam import DEFAULT_JOB_LEASE, DEFAULT_RESULT_TTL
from fleetmem.errors import FleetmemError, StoreClosedError
from fleetmem.leases import DEFAULT_LEASE_TTL, HeldLease, LeaseLock, Leases
from fleetmem.protocol import (
    TTL,
    Agent,
    Change,
    ChangeBatch,
    Entry,
    Health,
    Job,
    JobResult,
    JSONValue,
    Lease,
    QueueStats,
    Snapshot,
    SnapshotDiff,
    StoreStats,
)

if TYPE_CHECKING:
    from fleetmem.agents import AgentRegistry
    from fleetmem.changes import Changes
    from fleetmem.portability import ExportReport, ImportReport, Progress
    from fleetmem.queues import Queue
    from fleetmem.settings import FleetmemSettings
    from fleetmem.snapshots import Snapshots
    from fleetmem.store import Store

__all__ = [
    "EXIT_CLOSE_TIMEOUT",
    "SyncAgents",
    "SyncChanges",
    "SyncDeadlockError",
    "SyncLeaseLock",
    "SyncLeases",
    "SyncQueue",
    "SyncSnapshots",
    "SyncStore",
    "open_store",
]

_T = TypeVar("_T")
_ClosedError = Callable[[], BaseException]

#: Seconds the interpreter waits, at exit, for each store left open to close its connections.
EXIT_CLOSE_TIMEOUT = 5.0

_thread_numbers = itertools.count(1)

# ``fleetmem.agents.DEFAULT_AGENT_TTL``, not imported: that module loads the JSON codec's
# dependency, and importing this module loads nothing beyond the standard library (a test
# keeps the two equal through the signatures).
_DEFAULT_AGENT_TTL = 30.0


class SyncDeadlockError(FleetmemError, RuntimeError):
    """A SyncStore was called from its own event loop thread, where waiting for the result would
    never end."""


# ------------------------------------------------------------------------------- the loop thread


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread's body. It holds the loop only (never the :class:`_LoopThread`), so that a
    forgotten store can be garbage-collected while its thread runs."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


async def _shutdown(store: Store[Any] | None) -> None:
    """Close ``store``, then cancel what is still running on this loop. The caller stops the
    loop once this is done (stopping it here would leave this task's waiter unanswered)."""
    loop = asyncio.get_running_loop()
    try:
        if store is not None:
            await store.close()
    finally:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()


def _shutdown_in_background(store: Store[Any] | None) -> None:
    """On the loop: :func:`_shutdown` for a store nobody closed, then stop the loop. A failure
    to close has nobody to go to: it is dropped."""
    loop = asyncio.get_running_loop()

    async def quietly() -> None:
        with contextlib.suppress(Exception):
            await _shutdown(store)

    loop.create_task(quietly()).add_done_callback(lambda _: loop.stop())


class _LoopThread:
    """One event loop on one daemon thread, and the async store that lives on it.

    Shared by a :class:`SyncStore` and its views; closing it closes the store. ``lock`` orders
    submissions against closing: a coroutine is submitted only while the loop is open, so every
    submitted call reaches the loop before the shutdown does (and is then cancelled or finishes).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=_run_forever,
            args=(self.loop,),
            name=f"fleetmem-sync-{next(_thread_numbers)}",
            daemon=True,
        )
        self.lock = threading.Lock()
        self.closed = False
        self.forked = False  # True in a child process: the loop thread stayed in the parent
        self.store: Store[Any] | None = None
        self.thread.start()
        self.ident = self.thread.ident
        _open_loops.add(self)

    def submit(
        self, coro: Coroutine[Any, Any, _T], closed: _ClosedError
    ) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop; ``closed()`` makes the error raised when it is closed."""
        if threading.get_ident() == self.ident:
            coro.close()
            raise SyncDeadlockError(
                "a SyncStore was called from its own event loop thread, which would wait for "
                "itself forever; code running on that loop must use the async store"
            )
        with self.lock:
            if self.closed:
                coro.close()
                raise closed()
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], closed: _ClosedError) -> _T:
        """Run ``coro`` on the loop and wait for its result (or exception) in this thread."""
        future = self.submit(coro, closed)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self.closed:  # cancelled by close() while in flight
                raise closed() from None
            raise
        except BaseException:
            # KeyboardInterrupt while waiting (a notebook's stop button): stop the call too.
            future.cancel()
            raise

    def close(self) -> None:
        """Close the store, stop the loop and join its thread. Idempotent."""
        with self.lock:
            first = not self.closed
            if first and threading.get_ident() == self.ident:
                raise SyncDeadlockError(
                    "a SyncStore cannot be closed from its own event loop thread"
                )
            self.closed = True
        _open_loops.discard(self)
        if first:
            try:
                asyncio.run_coroutine_threadsafe(_shutdown(self.store), self.loop).result()
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join()
        elif threading.get_ident() != self.ident:
            self.thread.join()  # another thread is closing: return once it is done

    def close_in_background(self) -> None:
        """Close without waiting: schedule the shutdown on the loop and return."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        _open_loops.discard(self)
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self.loop.call_soon_threadsafe(_shutdown_in_background, self.store)

    def __del__(self) -> None:
        # Never block here: the collector may run on any thread, the loop's own included.
        if not self.closed:
            name = type(self.store).__name__ if self.store is not None else "store"
            warnings.warn(
                f"unclosed fleetmem.sync.SyncStore ({name}): call close() or use `with`",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )
            self.close_in_background()


_open_loops: weakref.WeakSet[_LoopThread] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: its stores' loops do not run here, and
    a call would wait forever. Mark them closed (without touching the loop, whose file
    descriptors the parent still uses) so that a call raises at once."""
    for loop_thread in list(_open_loops):
        loop_thread.lock = threading.Lock()  # another thread may have held it at the fork
        loop_thread.closed = True
        loop_thread.forked = True
    _open_loops.clear()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    """Close the stores left open, each within :data:`EXIT_CLOSE_TIMEOUT` seconds: their loop
    threads are daemons, so the interpreter would otherwise drop connections mid-conversation."""
    for loop_thread in list(_open_loops):
        loop_thread.close_in_background()
        loop_thread.thread.join(EXIT_CLOSE_TIMEOUT)


# ------------------------------------------------------------------------------------ the facade


class SyncStore:
    """A blocking :class:`~fleetmem.protocol.MemoryStore`: each method runs the async method of
    the same name on the store's private event loop and returns its result.

    Build one with :func:`open_store` or :meth:`wrap`. Safe to call from several threads at once;
    see the module docstring for the threading model.
    """

    __slots__ = ("__weakref__", "_agents", "_leases", "_loop_thread", "_owner", "_store")

    def __init__(self, store: Store[Any], loop_thread: _LoopThread, *, owner: bool) -> None:
        # Private: the store must live on loop_thread's loop. Use open_store() or wrap().
        self._store = store
        self._loop_thread = loop_thread
        self._owner = owner
        self._leases: SyncLeases | None = None
        self._agents: SyncAgents | None = None

    @classmethod
    def wrap(cls, store: Store[Any]) -> SyncStore:
        """A :class:`SyncStore` over ``store``, an async store that no event loop has used yet
        (built by its constructor, e.g. ``SQLiteStore(path, namespace=...)``). It is connected
        on the new private loop and closed with the :class:`SyncStore`."""

        async def connect() -> Store[Any]:
            try:
                await store.connect()
            except BaseException:
                await store.close()
                raise
            return store

        return cls._start(connect())

    @classmethod
    def _start(cls, opening: Coroutine[Any, Any, Store[Any]]) -> SyncStore:
        loop_thread = _LoopThread()
        try:
            store = loop_thread.run(opening, _closed_while_opening)
        except BaseException:
            loop_thread.close()
            raise
        loop_thread.store = store
        return cls(store, loop_thread, owner=True)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._loop_thread.run(coro, self._closed_error)

    def _closed_error(self) -> StoreClosedError:
        name = f"{type(self._store).__name__} for namespace {self.namespace!r}"
        if self._loop_thread.forked:
            return StoreClosedError(
                f"{name} was opened before this process was forked and its loop thread stayed "
                "in the parent: open a store in this process"
            )
        return StoreClosedError(f"{name} is closed")

    # ------------------------------------------------------------ identity and lifecycle

    @property
    def namespace(self) -> str:
        """The namespace this store reads and writes."""
        return self._store.namespace

    @property
    def backend(self) -> str:
        """The backend's name: ``memory``, ``sqlite``, ``postgres``, ``redis`` or ``hybrid``."""
        return self._store.backend

    @property
    def max_value_bytes(self) -> int:
        """The largest serialized value this store accepts."""
        return self._store.max_value_bytes

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called on this store (or on the store it is a view of)."""
        return self._store.closed or self._loop_thread.closed

    @property
    def leases(self) -> SyncLeases:
        """Named leases with fencing tokens in this store's namespace: the blocking twin of
        :attr:`fleetmem.store.Store.leases` (no I/O until used)."""
        leases = self._leases
        if leases is None:
            leases = self._leases = SyncLeases(self)
        return leases

    @property
    def agents(self) -> SyncAgents:
        """The agent registry of this store's namespace: the blocking twin of
        :attr:`fleetmem.store.Store.agents` (no I/O until used)."""
        agents = self._agents
        if agents is None:
            agents = self._agents = SyncAgents(self)
        return agents

    def __repr__(self) -> str:
        return f"<SyncStore {self._store!r}>"

    def with_namespace(self, namespace: str) -> SyncStore:
        """A view bound to ``namespace`` sharing this store's connections and loop thread; see
        :meth:`fleetmem.protocol.MemoryStore.with_namespace`. Closing the view closes nothing
        shared; closing this store closes the view too."""
        store = self._store

        async def view() -> Store[Any]:  # on the loop, where the store's state lives
            return store.with_namespace(namespace)

        return SyncStore(self._run(view()), self._loop_thread, owner=False)

    def close(self) -> None:
        """Close the store, stop its loop and join its thread (a view closes only itself).

        Idempotent. Calls in flight in other threads finish or fail as against a closing async
        store; those still running once it is closed are cancelled and raise
        :class:`~fleetmem.errors.StoreClosedError`. See
        :meth:`fleetmem.protocol.MemoryStore.close`."""
        if self._owner:
            self._loop_thread.close()
        elif not self._loop_thread.closed:
            with contextlib.suppress(StoreClosedError):  # the owner was closed meanwhile
                self._run(self._store.close())

    def __enter__(self) -> SyncStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ reads

    def get(self, key: str, default: JSONValue = None) -> JSONValue:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.get`."""
        return self._run(self._store.get(key, default))

    def get_entry(self, key: str) -> Entry | None:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.get_entry`."""
        return self._run(self._store.get_entry(key))

    def get_many(self, keys: Iterable[str]) -> dict[str, JSONValue]:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.get_many`."""
        return self._run(self._store.get_many(_here(keys)))

    def exists(self, key: str) -> bool:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.exists`."""
        return self._run(self._store.exists(key))

    def ttl(self, key: str) -> float | None:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.ttl`."""
        return self._run(self._store.ttl(key))

    def keys(
        self,
        prefix: str = "",
        *,
        partition: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[str]:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.keys`."""
        return self._run(self._store.keys(prefix, partition=partition, limit=limit, after=after))

    def search(
        self,
        pattern: str,
        *,
        partition: str | None = None,
        limit: int | None = None,
    ) -> dict[str, JSONValue]:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.search`."""
        return self._run(self._store.search(pattern, partition=partition, limit=limit))

    def namespaces(
        self,
        prefix: str = "",
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[str]:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.namespaces`."""
        return self._run(self._store.namespaces(prefix, limit=limit, after=after))

    def partitions(self) -> list[str]:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.partitions`."""
        return self._run(self._store.partitions())

    def stats(self) -> StoreStats:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.stats`."""
        return self._run(self._store.stats())

    def list_queues(self) -> list[str]:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.list_queues`."""
        return self._run(self._store.list_queues())

    @property
    def changes(self) -> SyncChanges:
        """The change feed of this store's namespace: the blocking twin of
        :attr:`fleetmem.store.Store.changes` (no I/O until used)."""
        store = self._store

        async def make() -> Changes:  # on the loop, where the store builds its backend
            return store.changes

        return SyncChanges(self, self._run(make()))

    @property
    def snapshots(self) -> SyncSnapshots:
        """The named snapshots of this store's namespace: the blocking twin of
        :attr:`fleetmem.store.Store.snapshots` (no I/O until used)."""
        store = self._store

        async def make() -> Snapshots:  # on the loop, where the store builds its backend
            return store.snapshots

        return SyncSnapshots(self, self._run(make()))

    def queue(self, name: str) -> SyncQueue:
        """The durable work queue ``name`` of this store's namespace: the blocking twin of
        :meth:`fleetmem.store.Store.queue` (no I/O until used; the name is checked here)."""
        store = self._store

        async def make() -> Queue:  # on the loop, where the store builds its backend
            return store.queue(name)

        return SyncQueue(self, self._run(make()))

    def health(self) -> Health:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.health`: never raises, also once closed
        (except :class:`SyncDeadlockError` when called from the store's own loop thread)."""
        try:
            return self._run(self._store.health())
        except StoreClosedError:
            return Health(
                ok=False,
                backend=self.backend,
                latency_ms=None,
                details={"error": "store is closed", "namespace": self.namespace},
            )

    # ------------------------------------------------------------ writes

    def set(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        keep_ttl: bool = False,
        fence: Lease | HeldLease | None = None,
    ) -> Entry:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.set`."""
        return self._run(
            self._store.set(
                key, value, ttl=ttl, partition=partition, keep_ttl=keep_ttl, fence=fence
            )
        )

    def set_many(
        self,
        items: Mapping[str, JSONValue],
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> int:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.set_many`."""
        return self._run(self._store.set_many(items, ttl=ttl, partition=partition, fence=fence))

    def set_if_absent(
        self,
        key: str,
        value: JSONValue,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> bool:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.set_if_absent`."""
        return self._run(
            self._store.set_if_absent(key, value, ttl=ttl, partition=partition, fence=fence)
        )

    def compare_and_set(
        self,
        key: str,
        value: JSONValue,
        *,
        version: int,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> Entry:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.compare_and_set`."""
        return self._run(
            self._store.compare_and_set(
                key, value, version=version, ttl=ttl, partition=partition, fence=fence
            )
        )

    def incr(
        self,
        key: str,
        amount: int | float = 1,
        *,
        ttl: TTL | None = None,
        partition: str | None = None,
        fence: Lease | HeldLease | None = None,
    ) -> int | float:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.incr`."""
        return self._run(self._store.incr(key, amount, ttl=ttl, partition=partition, fence=fence))

    def delete(self, key: str, *, fence: Lease | HeldLease | None = None) -> bool:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.delete`."""
        return self._run(self._store.delete(key, fence=fence))

    def delete_many(self, keys: Iterable[str], *, fence: Lease | HeldLease | None = None) -> int:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.delete_many`."""
        return self._run(self._store.delete_many(_here(keys), fence=fence))

    def expire(self, key: str, ttl: TTL) -> bool:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.expire`."""
        return self._run(self._store.expire(key, ttl))

    def persist(self, key: str) -> bool:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.persist`."""
        return self._run(self._store.persist(key))

    def clear_partition(self, partition: str) -> int:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.clear_partition`."""
        return self._run(self._store.clear_partition(partition))

    def clear(self) -> int:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.clear`."""
        return self._run(self._store.clear())

    def cleanup_expired(self) -> int:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.cleanup_expired`."""
        return self._run(self._store.cleanup_expired())

    # ------------------------------------------------------------ portability

    def export_to(
        self,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        prefix: str = "",
        partition: str | None = None,
        snapshot: str | None = None,
        progress: Progress | None = None,
    ) -> ExportReport:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.export_to` (see
        :meth:`fleetmem.store.Store.export_to`). The file is written, and
        ``progress`` called, on the store's loop thread: a file object must not be used by
        another thread meanwhile, and ``progress`` must not call this store."""
        return self._run(
            self._store.export_to(
                dest, prefix=prefix, partition=partition, snapshot=snapshot, progress=progress
            )
        )

    def import_from(
        self,
        src: str | os.PathLike[str] | BinaryIO,
        *,
        mode: str = "merge",
        progress: Progress | None = None,
    ) -> ImportReport:
        """Blocking :meth:`fleetmem.protocol.MemoryStore.import_from` (see
        :meth:`fleetmem.store.Store.import_from`): read, and ``progress`` called, on the
        store's loop thread, as for :meth:`export_to`."""
        return self._run(self._store.import_from(src, mode=mode, progress=progress))


# ------------------------------------------------------------------- leases and agents


async def _with_leases(store: Store[Any], call: Callable[[Leases], Awaitable[_T]]) -> _T:
    # On the loop: the store builds its Leases (and the backend's) where its state lives.
    return await call(store.leases)


async def _with_agents(store: Store[Any], call: Callable[[AgentRegistry], Awaitable[_T]]) -> _T:
    return await call(store.agents)


class _Facet:
    """A blocking view of one coordination primitive of a :class:`SyncStore`."""

    __slots__ = ("_sync",)

    def __init__(self, sync: SyncStore) -> None:
        self._sync = sync

    @property
    def namespace(self) -> str:
        """The store's namespace: leases fence writes of it, agents are registered in it."""
        return self._sync.namespace

    def __repr__(self) -> str:
        return f"<{type(self).__name__} namespace={self.namespace!r}>"


class SyncLeases(_Facet):
    """Blocking :class:`fleetmem.leases.Leases`: ``sync_store.leases``.

    Each method runs the async method of the same name on the store's loop thread, with the same
    arguments, guarantees and errors. See ``docs/coordination.md``.
    """

    __slots__ = ()

    def acquire(
        self,
        name: str,
        *,
        owner: str,
        ttl: float | timedelta = DEFAULT_LEASE_TTL,
        wait: float | timedelta | None = None,
    ) -> Lease | None:
        """Blocking :meth:`fleetmem.leases.Leases.acquire`: the :class:`Lease`, or ``None``
        (at once without ``wait``, else once ``wait`` seconds passed)."""
        return self._sync._run(
            _with_leases(
                self._sync._store, lambda ls: ls.acquire(name, owner=owner, ttl=ttl, wait=wait)
            )
        )

    def renew(self, lease: Lease | HeldLease, *, ttl: float | timedelta | None = None) -> Lease:
        """Blocking :meth:`fleetmem.leases.Leases.renew`: the renewed lease (same token), or
        :class:`~fleetmem.errors.LeaseLostError`."""
        return self._sync._run(_with_leases(self._sync._store, lambda ls: ls.renew(lease, ttl=ttl)))

    def release(self, lease: Lease | HeldLease) -> bool:
        """Blocking :meth:`fleetmem.leases.Leases.release`."""
        return self._sync._run(_with_leases(self._sync._store, lambda ls: ls.release(lease)))

    def holder(self, name: str) -> Lease | None:
        """Blocking :meth:`fleetmem.leases.Leases.holder`."""
        return self._sync._run(_with_leases(self._sync._store, lambda ls: ls.holder(name)))

    def lock(
        self,
        name: str,
        *,
        owner: str,
        ttl: float | timedelta = DEFAULT_LEASE_TTL,
        wait: float | timedelta | None = None,
    ) -> SyncLeaseLock:
        """``with store.leases.lock(name, owner=..., ttl=..., wait=...) as held:``

        The blocking :meth:`fleetmem.leases.Leases.lock`: entering acquires (raising
        :class:`~fleetmem.errors.LeaseUnavailableError` when ``wait`` runs out, or at once
        without ``wait``) and returns a :class:`~fleetmem.leases.HeldLease`; a task on the
        store's loop thread renews it every ``ttl/3`` seconds while the body runs, whatever the
        calling thread does; leaving releases it (also on an exception). A failed renewal sets
        ``held.lost`` (read it with ``held.lost.is_set()``; it lives on the loop thread, so do
        not ``wait()`` on it) and every write fenced with ``held`` fails. Arguments are checked
        here, before any I/O.
        """
        store = self._sync._store

        async def make() -> LeaseLock:  # on the loop, where the store builds its Leases
            return store.leases.lock(name, owner=owner, ttl=ttl, wait=wait)

        return SyncLeaseLock(self._sync, self._sync._run(make()))


class SyncLeaseLock:
    """The ``with`` context manager :meth:`SyncLeases.lock` returns (single use).

    It enters and leaves the async :class:`~fleetmem.leases.LeaseLock` on the store's loop
    thread, where its renewal task runs between the two.
    """

    __slots__ = ("_lock", "_sync")

    def __init__(self, sync: SyncStore, lock: LeaseLock) -> None:
        self._sync = sync
        self._lock = lock

    def __enter__(self) -> HeldLease:
        lock = self._lock
        try:
            return self._sync._run(lock.__aenter__())
        except BaseException:
            # Interrupted while the lease was being granted (Ctrl-C): ``with`` will not call
            # __exit__, so stop the renewal and release here, without waiting, if it was.
            with contextlib.suppress(FleetmemError):
                self._sync._loop_thread.submit(
                    lock.__aexit__(None, None, None), self._sync._closed_error
                )
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The exit raises nothing extra, as the async lock's: on a store closed meanwhile the
        # renewal was cancelled with the loop, and the TTL frees the lease.
        with contextlib.suppress(StoreClosedError):
            self._sync._run(self._lock.__aexit__(exc_type, exc, tb))


class SyncAgents(_Facet):
    """Blocking :class:`fleetmem.agents.AgentRegistry`: ``sync_store.agents``.

    Each method runs the async method of the same name on the store's loop thread, with the same
    arguments, guarantees and errors. See ``docs/coordination.md``.
    """

    __slots__ = ()

    def register(
        self,
        agent_id: str,
        *,
        info: dict[str, Any] | None = None,
        ttl: float | timedelta = _DEFAULT_AGENT_TTL,
    ) -> Agent:
        """Blocking :meth:`fleetmem.agents.AgentRegistry.register`."""
        return self._sync._run(
            _with_agents(self._sync._store, lambda ag: ag.register(agent_id, info=info, ttl=ttl))
        )

    def heartbeat(
        self,
        agent_id: str,
        *,
        ttl: float | timedelta | None = None,
        info: dict[str, Any] | None = None,
    ) -> Agent:
        """Blocking :meth:`fleetmem.agents.AgentRegistry.heartbeat`: a gone agent raises
        :class:`~fleetmem.errors.AgentGoneError`."""
        return self._sync._run(
            _with_agents(self._sync._store, lambda ag: ag.heartbeat(agent_id, ttl=ttl, info=info))
        )

    def deregister(self, agent_id: str) -> bool:
        """Blocking :meth:`fleetmem.agents.AgentRegistry.deregister`."""
        return self._sync._run(_with_agents(self._sync._store, lambda ag: ag.deregister(agent_id)))

    def get(self, agent_id: str) -> Agent | None:
        """Blocking :meth:`fleetmem.agents.AgentRegistry.get`."""
        return self._sync._run(_with_agents(self._sync._store, lambda ag: ag.get(agent_id)))

    def count(self) -> int:
        """Blocking :meth:`fleetmem.agents.AgentRegistry.count`."""
        return self._sync._run(_with_agents(self._sync._store, lambda ag: ag.count()))

    def list(
        self, prefix: str = "", *, limit: int | None = None, after: str | None = None
    ) -> list[Agent]:
        """Blocking :meth:`fleetmem.agents.AgentRegistry.list`."""
        return self._sync._run(
            _with_agents(self._sync._store, lambda ag: ag.list(prefix, limit=limit, after=after))
        )


class SyncSnapshots:
    """Blocking :class:`fleetmem.snapshots.Snapshots`: ``sync_store.snapshots``.

    Each method runs the async method of the same name on the store's loop thread, with the
    same arguments, guarantees and errors. See ``docs/snapshots.md``.
    """

    __slots__ = ("_snapshots", "_sync")

    def __init__(self, sync: SyncStore, snapshots: Snapshots) -> None:
        self._sync = sync
        self._snapshots = snapshots

    def __repr__(self) -> str:
        return f"<SyncSnapshots namespace={self._snapshots.namespace!r}>"

    def create(self, name: str) -> Snapshot:
        """Blocking :meth:`fleetmem.snapshots.Snapshots.create`."""
        return self._sync._run(self._snapshots.create(name))

    def list(self) -> list[Snapshot]:
        """Blocking :meth:`fleetmem.snapshots.Snapshots.list`."""
        return self._sync._run(self._snapshots.list())

    def get(self, name: str) -> Snapshot | None:
        """Blocking :meth:`fleetmem.snapshots.Snapshots.get`."""
        return self._sync._run(self._snapshots.get(name))

    def diff(self, a: str, b: str | None = None) -> SnapshotDiff:
        """Blocking :meth:`fleetmem.snapshots.Snapshots.diff`."""
        return self._sync._run(self._snapshots.diff(a, b))

    def restore(self, name: str) -> int:
        """Blocking :meth:`fleetmem.snapshots.Snapshots.restore`."""
        return self._sync._run(self._snapshots.restore(name))

    def delete(self, name: str) -> bool:
        """Blocking :meth:`fleetmem.snapshots.Snapshots.delete`."""
        return self._sync._run(self._snapshots.delete(name))


class SyncChanges:
    """Blocking :class:`fleetmem.changes.Changes`: ``sync_store.changes``.

    Each method runs the async method of the same name on the store's loop thread, with the same
    arguments, guarantees and errors; :meth:`watch` is a blocking iterator. See
    ``docs/changes.md``.
    """

    __slots__ = ("_changes", "_sync")

    def __init__(self, sync: SyncStore, changes: Changes) -> None:
        self._sync = sync
        self._changes = changes

    def __repr__(self) -> str:
        return f"<SyncChanges namespace={self._changes.namespace!r}>"

    def enable(self, retention: float | timedelta = 3600.0) -> None:
        """Blocking :meth:`fleetmem.changes.Changes.enable`."""
        self._sync._run(self._changes.enable(retention))

    def disable(self) -> None:
        """Blocking :meth:`fleetmem.changes.Changes.disable`."""
        self._sync._run(self._changes.disable())

    def enabled(self) -> bool:
        """Blocking :meth:`fleetmem.changes.Changes.enabled`."""
        return self._sync._run(self._changes.enabled())

    def cursor(self) -> str:
        """Blocking :meth:`fleetmem.changes.Changes.cursor`."""
        return self._sync._run(self._changes.cursor())

    def read(
        self,
        since: str | None = None,
        limit: int = 1000,
        pattern: str | None = None,
        partition: str | None = None,
    ) -> ChangeBatch:
        """Blocking :meth:`fleetmem.changes.Changes.read`."""
        return self._sync._run(self._changes.read(since, limit, pattern, partition))

    def watch(
        self,
        pattern: str = "*",
        partition: str | None = None,
        since: str | None = None,
        *,
        reconnect_timeout: float = 30.0,
    ) -> Iterator[Change]:
        """Blocking :meth:`fleetmem.changes.Changes.watch`: each step waits on the store's loop
        for the next change. The arguments are checked here; closing the iterator (or
        leaving the ``for`` loop) ends the watch."""
        changes = self._changes

        async def start() -> AsyncIterator[Change]:
            return changes.watch(pattern, partition, since, reconnect_timeout=reconnect_timeout)

        agen = self._sync._run(start())
        return self._steps(agen)

    def _steps(self, agen: AsyncIterator[Change]) -> Iterator[Change]:
        async def step() -> Change | None:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return None

        async def close() -> None:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while (change := self._sync._run(step())) is not None:
                yield change
        finally:
            with contextlib.suppress(Exception):
                self._sync._run(close())


class SyncQueue:
    """Blocking :class:`fleetmem.queues.Queue`: ``sync_store.queue(name)``.

    Each method runs the async method of the same name on the store's loop thread, with the same
    arguments, guarantees and errors. See ``docs/queues.md``.
    """

    __slots__ = ("_queue", "_sync")

    def __init__(self, sync: SyncStore, queue: Queue) -> None:
        self._sync = sync
        self._queue = queue

    @property
    def name(self) -> str:
        """The queue's name."""
        return self._queue.name

    @property
    def namespace(self) -> str:
        """The store's namespace, which holds this queue."""
        return self._queue.namespace

    def __repr__(self) -> str:
        return f"<SyncQueue {self.name!r} namespace={self.namespace!r}>"

    def put(
        self,
        payload: Any,
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        dedupe_key: str | None = None,
        max_attempts: int | None = None,
    ) -> str:
        """Blocking :meth:`fleetmem.queues.Queue.put`: the job's id."""
        return self._sync._run(
            self._queue.put(
                payload,
                priority=priority,
                delay=delay,
                dedupe_key=dedupe_key,
                max_attempts=max_attempts,
            )
        )

    def put_many(
        self,
        payloads: Iterable[Any],
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        max_attempts: int | None = None,
    ) -> list[str]:
        """Blocking :meth:`fleetmem.queues.Queue.put_many`: the jobs' ids, in order."""
        items = list(payloads) if isinstance(payloads, Iterator) else payloads
        return self._sync._run(
            self._queue.put_many(items, priority=priority, delay=delay, max_attempts=max_attempts)
        )

    def claim(
        self,
        *,
        consumer: str | None = None,
        lease: float | timedelta = DEFAULT_JOB_LEASE,
        wait: float | timedelta | None = None,
    ) -> Job | None:
        """Blocking :meth:`fleetmem.queues.Queue.claim`."""
        return self._sync._run(self._queue.claim(consumer=consumer, lease=lease, wait=wait))

    def claim_many(
        self,
        n: int,
        *,
        consumer: str | None = None,
        lease: float | timedelta = DEFAULT_JOB_LEASE,
        wait: float | timedelta | None = None,
    ) -> list[Job]:
        """Blocking :meth:`fleetmem.queues.Queue.claim_many`."""
        return self._sync._run(self._queue.claim_many(n, consumer=consumer, lease=lease, wait=wait))

    def extend(self, job: Job, *, lease: float | timedelta = DEFAULT_JOB_LEASE) -> Job:
        """Blocking :meth:`fleetmem.queues.Queue.extend`."""
        return self._sync._run(self._queue.extend(job, lease=lease))

    def ack(
        self,
        job: Job,
        result: Any = None,
        *,
        result_ttl: float | timedelta = DEFAULT_RESULT_TTL,
    ) -> bool:
        """Blocking :meth:`fleetmem.queues.Queue.ack`."""
        return self._sync._run(self._queue.ack(job, result, result_ttl=result_ttl))

    def nack(
        self,
        job: Job,
        *,
        retry_in: float | timedelta | None = None,
        error: str | None = None,
    ) -> bool:
        """Blocking :meth:`fleetmem.queues.Queue.nack`."""
        return self._sync._run(self._queue.nack(job, retry_in=retry_in, error=error))

    def cancel(self, job_id: str) -> bool:
        """Blocking :meth:`fleetmem.queues.Queue.cancel`."""
        return self._sync._run(self._queue.cancel(job_id))

    def result(self, job_id: str, *, wait: float | timedelta | None = None) -> JobResult | None:
        """Blocking :meth:`fleetmem.queues.Queue.result`."""
        return self._sync._run(self._queue.result(job_id, wait=wait))

    def stats(self) -> QueueStats:
        """Blocking :meth:`fleetmem.queues.Queue.stats`."""
        return self._sync._run(self._queue.stats())

    def dead(self, limit: int = 100, after: str | None = None) -> list[Job]:
        """Blocking :meth:`fleetmem.queues.Queue.dead`."""
        return self._sync._run(self._queue.dead(limit, after))

    def retry_dead(self, ids: Iterable[str] | None = None) -> int:
        """Blocking :meth:`fleetmem.queues.Queue.retry_dead`."""
        chosen = list(ids) if isinstance(ids, Iterator) else ids
        return self._sync._run(self._queue.retry_dead(chosen))

    def purge_dead(self) -> int:
        """Blocking :meth:`fleetmem.queues.Queue.purge_dead`."""
        return self._sync._run(self._queue.purge_dead())


def _here(keys: Iterable[str]) -> Iterable[str]:
    """An iterator of keys drained in the calling thread: a generator that calls the store would
    otherwise run on the loop thread (and deadlock); other iterables go as given, for the store
    to validate."""
    return list(keys) if isinstance(keys, Iterator) else keys


def _closed_while_opening() -> StoreClosedError:
    return StoreClosedError("the store was closed while it was opening")


def open_store(
    url: str | None = None,
    *,
    namespace: str | None = None,
    hybrid: tuple[str, str] | None = None,
    settings: FleetmemSettings | None = None,
    **options: Any,
) -> SyncStore:
    """Open a store as :func:`fleetmem.open_store` does, on a private event loop thread, and
    return it as a blocking :class:`SyncStore` (also a context manager that closes it).

    The arguments are those of :func:`fleetmem.open_store`, and so are the errors (a bad URL or
    option raises :class:`~fleetmem.errors.ConfigurationError`, an unreachable server
    :class:`~fleetmem.errors.BackendUnavailableError`); nothing is left running when it raises.
    """
    from fleetmem.factory import open_store as open_async

    async def opening() -> Store[Any]:
        store: Store[Any] = await open_async(
            url, namespace=namespace, hybrid=hybrid, settings=settings, **options
        )
        return store

    return SyncStore._start(opening())
