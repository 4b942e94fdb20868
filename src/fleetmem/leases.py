"""Leases with fencing tokens: ``store.leases`` (see ``docs/coordination.md``).

:class:`Leases` validates every argument before any I/O and calls the technology's
:class:`~fleetmem.backends.seam.LeaseBackend`, which shares the store's connector. The
guarantees, identical on every backend:

* at most one live lease per name in a namespace, across processes and hosts sharing the
  backend; expiry is measured on the server's clock;
* a lease's ``token`` is strictly greater than every token granted before for that name (across
  releases, expiries and restarts of a durable backend);
* a lease passed as ``fence=`` to a key-value write makes the store itself refuse the write
  (``LeaseLostError``, nothing changed) once that lease is no longer live with that token;
* ``acquire(wait=...)`` is woken by a release in another process (PostgreSQL ``LISTEN``, Redis
  pub/sub; on SQLite, a poll of the file every 50 ms) and by an expiry, polling at least once a
  second as the fallback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

from fleetmem._validate import validate_name, validate_ttl, validate_wait
from fleetmem.backends.seam import Fence, LeaseBackend
from fleetmem.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    InvalidKeyError,
    LeaseLostError,
    LeaseUnavailableError,
    StoreClosedError,
)
from fleetmem.protocol import Lease

__all__ = ["MAX_OWNER_BYTES", "HeldLease", "LeaseLock", "Leases", "fence_of"]

#: The longest ``owner`` accepted, in UTF-8 bytes.
MAX_OWNER_BYTES = 255
#: The largest fencing token (a signed 64-bit integer on every backend).
_MAX_TOKEN = 2**63 - 1
#: The TTL of a lease when none is given, in seconds.
DEFAULT_LEASE_TTL = 30.0

_log = logging.getLogger("fleetmem.leases")


def _name(name: object) -> str:
    return validate_name(name, "lease name")


def _owner(owner: object) -> str:
    return validate_name(owner, "lease owner", MAX_OWNER_BYTES)


def _ttl_ms(ttl: float | timedelta | None) -> int | None:
    return None if ttl is None else validate_ttl(ttl)


class HeldLease:
    """A lease held by :meth:`Leases.lock` and renewed in the background.

    ``lease`` is the current :class:`~fleetmem.protocol.Lease` (its ``expires_at`` moves with
    each renewal; the token never changes). ``lost`` is set when a renewal fails: the lease may
    already belong to someone else, and every fenced write with this object fails (checked
    before any I/O, and by the store). The body of the ``async with`` is not interrupted.
    """

    __slots__ = ("lease", "lost")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost = asyncio.Event()

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else "held"
        return f"<HeldLease {self.lease.name!r} token={self.lease.token} {state}>"


def fence_of(fence: object, namespace: str) -> Fence | None:
    """The backend's :class:`Fence` for a ``fence=`` argument, checked before any I/O."""
    if fence is None:
        return None
    if isinstance(fence, HeldLease):
        if fence.lost.is_set():
            lease = fence.lease
            raise LeaseLostError(
                f"lease {lease.name!r} (token {lease.token}) was lost: a renewal failed; "
                "nothing was changed"
            )
        fence = fence.lease
    if not isinstance(fence, Lease):
        raise InvalidArgumentError(
            f"fence must be a Lease or a HeldLease, not {type(fence).__name__}"
        )
    _check_lease(fence)
    if fence.namespace != namespace:
        raise InvalidArgumentError(
            f"fence is a lease of namespace {fence.namespace!r}; it cannot fence a write in "
            f"namespace {namespace!r}"
        )
    return Fence(fence.name, fence.token)


def _check_lease(lease: Lease) -> None:
    """A ``Lease`` built by hand (``dataclasses.replace``) is checked like any argument: a name
    under the key rules and a token that a backend can have granted."""
    try:
        validate_name(lease.name, "lease name")
    except InvalidKeyError as exc:
        raise InvalidArgumentError(f"not a lease this store granted: {exc}") from None
    token = lease.token
    if isinstance(token, bool) or not isinstance(token, int) or not 1 <= token <= _MAX_TOKEN:
        raise InvalidArgumentError(
            f"not a lease this store granted: its token must be an int from 1 to 2**63 - 1, "
            f"not {token!r}"
        )


def _lease_arg(lease: object, namespace: str) -> Lease:
    if isinstance(lease, HeldLease):
        lease = lease.lease
    if not isinstance(lease, Lease):
        raise InvalidArgumentError(f"expected a Lease or a HeldLease, not {type(lease).__name__}")
    _check_lease(lease)
    if lease.namespace != namespace:
        raise InvalidArgumentError(
            f"lease {lease.name!r} belongs to namespace {lease.namespace!r}, not {namespace!r}"
        )
    return lease


class Leases:
    """Named leases of one namespace: ``store.leases``."""

    __slots__ = ("_backend", "_check_open")

    def __init__(self, backend: LeaseBackend, check_open: Callable[[], None]) -> None:
        self._backend = backend
        self._check_open = check_open

    @property
    def namespace(self) -> str:
        return self._backend.namespace

    @property
    def backend(self) -> LeaseBackend:
        """The technology's lease primitive (the typed seam)."""
        return self._backend

    async def acquire(
        self,
        name: str,
        *,
        owner: str,
        ttl: float | timedelta = DEFAULT_LEASE_TTL,
        wait: float | timedelta | None = None,
    ) -> Lease | None:
        """Grant lease ``name`` to ``owner`` for ``ttl`` seconds if nobody holds it.

        Returns the :class:`Lease` (its ``token`` greater than any earlier one of ``name``) or
        ``None``: at once when ``wait`` is ``None`` or 0, else after trying for up to ``wait``
        seconds. The same owner asking while it holds the lease is refused like anyone else.
        """
        lease_name = _name(name)
        who = _owner(owner)
        ttl_ms = validate_ttl(ttl)
        wait_s = validate_wait(wait)
        self._check_open()
        backend = self._backend
        if not wait_s:
            lease, _ = await backend.acquire(lease_name, who, ttl_ms)
            return lease
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        async with backend.watch(lease_name) as watch:
            # Waiters of this process take turns in arrival order: one that arrives behind
            # others waits for its turn (a release wakes the longest-waiting one) instead of
            # racing them to the server. It still tries at least once a poll interval.
            try_now = not watch.queued_behind
            while True:
                left_ms: int | None = None
                self._check_open()  # a store closed while this waited: no grant from it
                if try_now:
                    lease, left_ms = await backend.acquire(lease_name, who, ttl_ms)
                    if lease is not None:
                        watch.granted = True
                        return lease
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                pause = min(remaining, backend.poll_interval)
                if left_ms is not None:
                    pause = min(pause, left_ms / 1000 + 0.002)
                await watch.wait(pause)
                try_now = True

    async def renew(
        self, lease: Lease | HeldLease, *, ttl: float | timedelta | None = None
    ) -> Lease:
        """Extend ``lease`` (same token, later expiry) by ``ttl`` seconds (``None``: the TTL
        it was last acquired or renewed with). A lease that expired or was released, even if
        nobody took it since, is lost: :class:`~fleetmem.errors.LeaseLostError`, nothing
        changed."""
        held = _lease_arg(lease, self.namespace)
        ttl_ms = _ttl_ms(ttl)
        self._check_open()
        return await self._backend.renew(held.name, held.token, ttl_ms)

    async def release(self, lease: Lease | HeldLease) -> bool:
        """Free ``lease`` if it is still live with its token; ``False`` otherwise (released
        twice, expired, or held by someone else: never frees another holder's lease)."""
        held = _lease_arg(lease, self.namespace)
        self._check_open()
        return await self._backend.release(held.name, held.token)

    async def holder(self, name: str) -> Lease | None:
        """The live lease of ``name``, or ``None``."""
        lease_name = _name(name)
        self._check_open()
        return await self._backend.holder(lease_name)

    def lock(
        self,
        name: str,
        *,
        owner: str,
        ttl: float | timedelta = DEFAULT_LEASE_TTL,
        wait: float | timedelta | None = None,
    ) -> LeaseLock:
        """``async with store.leases.lock(name, owner=..., ttl=..., wait=...) as held:``

        Acquires (raising :class:`~fleetmem.errors.LeaseUnavailableError` when ``wait`` runs
        out, or at once without ``wait``), yields a :class:`HeldLease`, renews it every
        ``ttl/3`` seconds in the background, and releases it on exit (also on an exception or
        a cancellation). A failed renewal sets ``held.lost``; the exit raises nothing extra.
        Arguments are checked here, before any I/O.
        """
        lease_name = _name(name)
        who = _owner(owner)
        ttl_ms = validate_ttl(ttl)
        wait_s = validate_wait(wait)
        return LeaseLock(self, lease_name, who, ttl_ms, wait_s)


class LeaseLock:
    """The context manager :meth:`Leases.lock` returns (single use)."""

    __slots__ = ("_held", "_leases", "_name", "_owner", "_task", "_ttl_ms", "_wait")

    def __init__(
        self, leases: Leases, name: str, owner: str, ttl_ms: int, wait: float | None
    ) -> None:
        self._leases = leases
        self._name = name
        self._owner = owner
        self._ttl_ms = ttl_ms
        self._wait = wait
        self._held: HeldLease | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HeldLease:
        if self._held is not None:
            raise RuntimeError("a lease lock cannot be entered twice")
        lease = await self._leases.acquire(
            self._name, owner=self._owner, ttl=self._ttl_ms / 1000, wait=self._wait
        )
        if lease is None:
            raise LeaseUnavailableError(
                f"lease {self._name!r} is held by another holder"
                + (f" (waited {self._wait:g} s)" if self._wait else "")
            )
        held = self._held = HeldLease(lease)
        self._task = asyncio.get_running_loop().create_task(
            self._renew_loop(held), name=f"fleetmem lease renewal {self._name!r}"
        )
        return held

    async def _renew_loop(self, held: HeldLease) -> None:
        """Renew every ttl/3; a transient failure is retried while the lease can still be
        live (by this process's clock), a lost lease or a lease past its TTL sets ``lost``."""
        loop = asyncio.get_running_loop()
        period = self._ttl_ms / 3000
        backend = self._leases.backend
        renewed_at = loop.time()
        pause = period
        while True:
            await asyncio.sleep(pause)
            try:
                held.lease = await backend.renew(held.lease.name, held.lease.token, self._ttl_ms)
            except (LeaseLostError, StoreClosedError):
                held.lost.set()  # a closed store renews nothing: the lease runs out
                return
            except (BackendUnavailableError, OSError) as exc:
                # The server may be briefly unreachable: try again soon, while the lease can
                # still be live; past its TTL it may already belong to someone else.
                if loop.time() - renewed_at >= self._ttl_ms / 1000:
                    _log.warning("lease %r lost: renewals failed (%s)", held.lease.name, exc)
                    held.lost.set()
                    return
                pause = min(period, max(0.05, period / 4))
                continue
            except Exception:
                _log.exception("lease %r lost: renewal failed", held.lease.name)
                held.lost.set()
                return
            renewed_at = loop.time()
            pause = period

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, held = self._task, self._held
        if task is not None:
            task.cancel()
            # Wait for the renewal to stop without swallowing a cancellation of this task.
            await asyncio.wait([task])
        if held is None or held.lost.is_set():
            return
        try:
            await self._leases.backend.release(held.lease.name, held.lease.token)
        except Exception as err:  # the exit raises nothing extra: the TTL frees the lease
            _log.warning("lease %r not released (%s); it expires by its TTL", held.lease.name, err)
