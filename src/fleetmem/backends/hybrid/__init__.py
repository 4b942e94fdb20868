"""The hybrid backend: Redis as a coherent cache in front of PostgreSQL."""

from __future__ import annotations

from fleetmem.backends.hybrid.store import HybridMetrics, HybridStore

__all__ = ["HybridMetrics", "HybridStore"]
