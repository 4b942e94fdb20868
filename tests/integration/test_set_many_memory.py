"""``set_many(100_000)`` holds no more than about one encoded chunk beyond its input.

Measured with ``tracemalloc`` (Python allocations, the drivers' buffers included) on the
backends that keep their data outside the process.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from typing import Any

import pytest

from fleetmem._codec import encode_value
from fleetmem.store import SET_MANY_CHUNK

pytestmark = pytest.mark.slow


async def test_set_many_of_100k_holds_about_one_chunk(out_of_process_store: Any) -> None:
    store = out_of_process_store
    n = 100_000
    items = {
        f"m/{i:06d}": {"agent": f"a-{i % 64}", "step": i, "notes": "x" * 150} for i in range(n)
    }
    payload = encode_value(items["m/000000"])
    # One encoded item as the chunk holds it: the payload, its (key, payload) tuple, a list slot.
    per_item = sys.getsizeof(payload) + sys.getsizeof(("m/000000", payload)) + 8
    one_chunk = SET_MANY_CHUNK * per_item
    assert n * per_item >= 10 * one_chunk  # encoding everything first would be 10 chunks
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert await store.set_many(items) == n
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    # Measured 1.4-1.7 chunks (the chunk, the driver's buffers, the hybrid's list of keys).
    assert peak < 2 * one_chunk, f"peak {peak / 1e6:.1f} MB, one chunk {one_chunk / 1e6:.1f} MB"
    assert await store.get("m/099999") == items["m/099999"]
    assert (await store.stats()).keys == n
