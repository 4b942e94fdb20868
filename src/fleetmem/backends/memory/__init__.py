"""The in-memory backend: :class:`InMemoryStore` on :class:`InMemoryKV` (no connector: a dict)."""

from __future__ import annotations

from fleetmem.backends.memory.kv import InMemoryKV
from fleetmem.backends.memory.store import InMemoryStore

__all__ = ["InMemoryKV", "InMemoryStore"]
