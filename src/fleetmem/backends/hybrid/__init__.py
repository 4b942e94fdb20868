"""The hybrid backend: Redis as a coherent cache in front of PostgreSQL (:class:`HybridStore`
on :class:`HybridKV`, which calls the PostgreSQL and Redis backends through their public seams)."""

from __future__ import annotations

from fleetmem.backends.hybrid.kv import HybridKV, HybridMetrics
from fleetmem.backends.hybrid.store import HybridStore

__all__ = ["HybridKV", "HybridMetrics", "HybridStore"]
