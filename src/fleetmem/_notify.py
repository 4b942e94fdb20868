"""Wake-ups inside one process: coroutines waiting for a name to be freed.

A :class:`Notifier` maps names (a lease name, later a queue name) to the waiters watching them.
A waiter registers with :meth:`Notifier.watch` *before* it tries (acquire, claim), so a
notification that arrives between its failed try and its wait is not lost: the watch keeps it
and the next :meth:`Watch.wait` returns at once. Backends call :meth:`Notifier.notify` when a
release happens in this process, and from their listener (PostgreSQL ``LISTEN``, Redis pub/sub)
when it happens in another one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable
from types import TracebackType

__all__ = ["Notifier", "Watch"]


class Watch:
    """One waiter's interest in one name; a context manager that unregisters on exit."""

    __slots__ = ("_event", "_key", "_notifier")

    def __init__(self, notifier: Notifier, key: Hashable) -> None:
        self._notifier = notifier
        self._key = key
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> bool:
        """Wait until notified or ``timeout`` seconds passed; ``True`` when notified. A
        notification that came before the call counts (once)."""
        if not self._event.is_set() and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
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


class Notifier:
    """Waiters by name; :meth:`notify` wakes every waiter of a name."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: dict[Hashable, set[Watch]] = {}

    def watch(self, key: Hashable) -> Watch:
        w = Watch(self, key)
        self._waiters.setdefault(key, set()).add(w)
        return w

    def notify(self, key: Hashable) -> None:
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
        if waiters is not None:
            waiters.discard(w)
            if not waiters:
                del self._waiters[w.key]
