"""The fleetmem conformance suite: the store contract as pytest tests.

The contract is written in the docstrings of :mod:`fleetmem.protocol` (the module's rules and
each :class:`~fleetmem.protocol.MemoryStore` method) and, for leases, fenced writes and the
agent registry and work queues (``store.leases``, ``fence=``, ``store.agents``,
``store.queue(name)``), in ``docs/coordination.md``, and for the change feed
(``store.changes``) in ``docs/changes.md``, and for export, import and copy
(``store.export_to``, ``store.import_from``, ``fleetmem.copy_namespace``) and for named
snapshots (``store.snapshots``) in ``docs/portability.md`` and ``docs/snapshots.md``; this suite
is its executable form. Check
any ``MemoryStore`` implementation by subclassing :class:`StoreConformance` in a test module
where a ``store`` fixture yields a fresh, empty store in a namespace no other test uses::

    import pytest_asyncio
    from fleetmem.testing import connected_store
    from fleetmem.testing.conformance import StoreConformance

    @pytest_asyncio.fixture
    async def store(fleetmem_namespace):
        async with connected_store(MyStore(namespace=fleetmem_namespace)) as s:
            yield s  # a fresh, empty store; emptied and closed afterwards

    class TestMyStore(StoreConformance):
        pass

``fleetmem_namespace`` (a fixture of fleetmem's pytest plugin) is a namespace no other test of
the run uses; ``connected_store`` connects the store, and afterwards clears its namespace (if the
store is still open) and closes it. The tests are ``async`` and marked ``asyncio``: they run with
pytest-asyncio in strict or auto mode. They use only the public ``MemoryStore`` API and never
look at the backend's type. Some tests derive extra namespaces from the fixture's by appending
a suffix (``x``, ``xb``, ``x.b``, ...), write to them and clear them afterwards, so the
fixture's namespace must be unique (including as a prefix) and at most 60 characters long.
Other namespaces may exist on the same server (other tests, other runs): no test assumes it is
alone there. The coordination tests leave lease and agent records and queued jobs in the
fixture's namespace (``clear()`` keeps them, by contract); they are small, and no lease, agent
or claim stays live longer than the longest TTL the tests grant (200 s).
:class:`LeasesConformance`, :class:`FencedWritesConformance`, :class:`AgentsConformance`,
:class:`QueueConformance`, :class:`ChangesConformance`, :class:`PortabilityConformance` and
:class:`SnapshotConformance` are part of :class:`StoreConformance` and can also be run on their
own. The change-feed tests
enable the feed of the fixture's namespace (or of a sibling) and disable it again when they are
done. The portability tests use the store's ``export_to`` and ``import_from`` and pytest's
``tmp_path`` for the files they write; they import into the fixture's namespace and into
siblings of it, which they clear afterwards. The snapshot tests create snapshots of the
fixture's namespace and of siblings of it and delete every one of them afterwards (``clear()``
keeps snapshots, by contract); they read the snapshots' storage through
``store.kv.snapshots().usage()``. Tolerances and optional capabilities are
class attributes, documented on :class:`StoreConformance`; override them in the subclass.
"""

from __future__ import annotations

import pytest

from fleetmem.testing.conformance._agents import AgentsConformance
from fleetmem.testing.conformance._changes import ChangesConformance
from fleetmem.testing.conformance._concurrency import ConcurrencyConformance
from fleetmem.testing.conformance._expiry import ExpiryConformance
from fleetmem.testing.conformance._fences import FencedWritesConformance
from fleetmem.testing.conformance._keys import KeyConformance
from fleetmem.testing.conformance._leases import LeasesConformance
from fleetmem.testing.conformance._lifecycle import LifecycleConformance
from fleetmem.testing.conformance._namespaces import NamespacesConformance
from fleetmem.testing.conformance._portability import PortabilityConformance
from fleetmem.testing.conformance._queues import QueueConformance
from fleetmem.testing.conformance._search import SearchConformance
from fleetmem.testing.conformance._snapshots import SnapshotConformance
from fleetmem.testing.conformance._values import ValueConformance
from fleetmem.testing.conformance._writes import WriteConformance

__all__ = [
    "AgentsConformance",
    "ChangesConformance",
    "FencedWritesConformance",
    "LeasesConformance",
    "PortabilityConformance",
    "QueueConformance",
    "SnapshotConformance",
    "StoreConformance",
]


class StoreConformance(
    KeyConformance,
    ValueConformance,
    WriteConformance,
    ExpiryConformance,
    SearchConformance,
    NamespacesConformance,
    LifecycleConformance,
    ConcurrencyConformance,
    LeasesConformance,
    FencedWritesConformance,
    AgentsConformance,
    QueueConformance,
    ChangesConformance,
    PortabilityConformance,
    SnapshotConformance,
):
    """Every rule of the store contract, as tests of the ``store`` fixture.

    Class attributes (override in a subclass):

    ``ttl_slack``
        Seconds of tolerance on TTL measurements (``ttl()``, ``expires_at``).
    ``expiry_ttl``
        The short TTL (seconds) used by the expiry tests; they wait a little longer than that.
        Raise it for a slow remote server, where writing a test's entries takes longer.
    ``clock_skew``
        Seconds the store's clock may differ from this process's (``created_at`` and friends).
    ``max_value_bytes``
        The ``max_value_bytes`` of the fixture's store (default 8 MiB).
    ``exact_expiry_accounting``
        ``stats().expired_pending`` and ``cleanup_expired()`` count exactly the expired entries
        not freed yet. Turn off for a server that evicts expired entries by itself (then those
        numbers are upper bounds and the exact checks are skipped).
    ``pathological_pattern_seconds``
        A generous bound for matching 16 ``*`` against a 1 KiB key (backtracking blows it up).
    ``concurrency``
        How many coroutines the atomicity tests run at once (and race for one lease).
    ``lease_ttl``
        The short TTL (seconds) of the leases and agents the coordination tests let expire.
    ``lease_expiry_margin``
        How much longer than ``lease_ttl`` those tests sleep before counting on the expiry.
    ``lease_wake_slack``
        The bound (seconds) on "a waiter is granted within 100 ms of a release"; keep it under
        one second, the fallback poll, so that passing proves a notification.
    ``change_wake_slack``
        The bound (seconds) on a watcher receiving a change written in this process.
    ``change_retention``
        The short retention (seconds) the change-feed retention test enables.
    ``change_patience``
        How long (seconds) a change-feed test waits for something due (a trim, which the
        contract allows up to 10 s after the retention; a watch to end) before it fails.
    ``portability_slack``
        Seconds of tolerance on an imported entry's absolute expiry (the export's instant,
        blurred by the store's clock and the write's duration).
    ``portability_ttl``
        The TTL (seconds) of the entries the export test lets expire before it exports.
    ``snapshot_slack``
        Seconds of tolerance on a restored entry's absolute expiry.
    ``snapshot_patience``
        How long (seconds) a snapshot test waits for a short-TTL entry to expire before it
        fails.
    """

    pytestmark = [pytest.mark.asyncio]
