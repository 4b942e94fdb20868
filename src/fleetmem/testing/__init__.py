"""fleetmem's test kit: a pytest plugin with real-server fixtures, and the conformance suite.

The plugin is registered through the ``pytest11`` entry point, so installing fleetmem with the
``test`` extra makes its fixtures and markers available in any project, with no configuration.
See docs/testing.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fleetmem.errors import ConfigurationError

__all__ = ["connected_store", "delete_snapshots"]


@contextlib.asynccontextmanager
async def connected_store(store: Any) -> AsyncIterator[Any]:
    """Connect ``store``, yield it, then empty its namespace (if still open), delete its
    snapshots (which ``clear()`` keeps by contract; skipped for a backend without snapshots)
    and close it.

    The body of a ``store`` fixture for the conformance suite::

        @pytest_asyncio.fixture
        async def store(fleetmem_namespace):
            async with connected_store(MyStore(namespace=fleetmem_namespace)) as s:
                yield s

    (``@pytest_asyncio.fixture`` runs it in pytest-asyncio's default strict mode; with
    ``asyncio_mode = auto`` a plain ``@pytest.fixture`` does too.)
    """
    await store.connect()
    try:
        yield store
    finally:
        if not store.closed:
            await store.clear()
            await delete_snapshots(store)
        await store.close()


async def delete_snapshots(store: Any) -> None:
    """Delete every snapshot of ``store``'s namespace; nothing for a backend that has none."""
    try:
        snapshots = await store.snapshots.list()
    except ConfigurationError:
        return
    for snapshot in snapshots:
        await store.snapshots.delete(snapshot.name)
