"""fleetmem's test kit: a pytest plugin with real-server fixtures, and the conformance suite.

The plugin is registered through the ``pytest11`` entry point, so installing fleetmem with the
``test`` extra makes its fixtures available in any project.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["connected_store"]


@contextlib.asynccontextmanager
async def connected_store(store: Any) -> AsyncIterator[Any]:
    """Connect ``store``, yield it, then empty its namespace (if still open) and close it.

    The body of a ``store`` fixture for the conformance suite::

        @pytest.fixture
        async def store(fleetmem_namespace):
            async with connected_store(MyStore(namespace=fleetmem_namespace)) as s:
                yield s
    """
    await store.connect()
    try:
        yield store
    finally:
        if not store.closed:
            await store.clear()
        await store.close()
