"""Wake-ups inside one process: coroutines waiting for a name to be freed.

A :class:`Notifier` maps names (a lease name, later a queue name) to the waiters watching them,
in the order they arrived. A waiter registers with :meth:`Notifier.watch` *before* it tries
(acquire, claim), so a notification that arrives between its failed try and its wait is not
lost: the watch keeps it and the next :meth:`Watch.wait` returns at once. Backends call
:meth:`Notifier.notify` when a release happens in this process, and from their listener
(PostgreSQL ``LISTEN``, Redis pub/sub) when it happens in another one.

A release frees one lease, so :meth:`Notifier.notify` wakes one waiter: the one that has waited
longest (first in, first out). Waking them all would send one try per waiter to the server for
each release, all but one refused. The woken waiter holds the turn until it leaves: a waiter
that leaves without what it waited for (``granted`` unset: it timed out, failed or was
cancelled) passes the turn to the next one, so a wake-up is never lost with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from types import TracebackType

__all__ = ["Notifier", "Watch"]


class Watch:
    """One waiter's interest in one name; a context manager that unregisters on exit."""

    __slots__ = ("_event", "_key", "_notifier", "granted")

    def __init__(self, notifier: Notifier, key: Hashable) -> None:
        self._notifier = notifier
        self._key = key
        self._event = asyncio.Event()
        #: Set by the waiter once it got what it waited for: leaving then passes no turn on.
        self.granted = False

    async def wait(self, timeout: float) -> bool:
        """Wait until notified or ``timeout`` seconds passed; ``True`` when notified. A
        notification that came before the call counts (once)."""
        if not self._event.is_set() and timeout > 0:
            # Not asyncio.wait_for: before Python 3.12 it swallows a cancellation that arrives
            # as the event is set (it returns the result instead), and the waiter goes on
            # waiting after its task was cancelled. asyncio.wait never does.
            waiting = asyncio.ensure_future(self._event.wait())
            try:
                await asyncio.wait((waiting,), timeout=timeout)
            finally:
                waiting.cancel()
        notified = self._event.is_set()
        self._event.clear()
        return notified

    def _set(self) -> None:
        self._event.set()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._notifier._drop(self)

    @property
    def key(self) -> Hashable:
        return self._key

    @property
    def queued_behind(self) -> bool:
        """Whether waiters of the same name arrived before this one and still wait."""
        waiters = self._notifier._waiters.get(self._key)
        return waiters is not None and next(iter(waiters)) is not self


class Notifier:
    """Waiters by name, in arrival order; :meth:`notify` wakes the longest-waiting one."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        # A dict per name as an ordered set: arrival order, O(1) removal.
        self._waiters: dict[Hashable, dict[Watch, None]] = {}

    def watch(self, key: Hashable) -> Watch:
        w = Watch(self, key)
        self._waiters.setdefault(key, {})[w] = None
        return w

    def notify(self, key: Hashable, count: int = 1) -> None:
        """Wake the ``count`` longest-waiting waiters of ``key`` that are not awake already
        (one release or one job, one turn): a second wake-up of a waiter that has not used its
        first would be lost with it."""
        waiters = self._waiters.get(key)
        if waiters:
            for w in waiters:
                if count <= 0:
                    return
                if not w._event.is_set():
                    w._set()
                    count -= 1

    def notify_every(self, key: Hashable) -> None:
        """Wake every waiter of ``key`` (a job's result: all its waiters want it)."""
        for w in self._waiters.get(key, ()):
            w._set()

    def notify_all(self) -> None:
        """Wake every waiter (a listener that reconnected may have missed notifications)."""
        for waiters in self._waiters.values():
            for w in waiters:
                w._set()

    def watching(self, key: Hashable) -> bool:
        return bool(self._waiters.get(key))

    def __len__(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def _drop(self, w: Watch) -> None:
        waiters = self._waiters.get(w.key)
        if waiters is None:
            return
        waiters.pop(w, None)
        if not waiters:
            del self._waiters[w.key]
        elif not w.granted or w._event.is_set():
            # It may have held the turn of a release it did not use (it leaves without what it
            # waited for, or with a wake-up it never consumed): pass it on.
            self.notify(w.key)
