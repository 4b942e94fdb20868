"""Every backend in the ``BACKENDS`` table against the whole store contract: key-value,
leases, fenced writes and the agent registry (``StoreConformance`` includes them all)."""

from __future__ import annotations

from fleetmem.testing.conformance import StoreConformance


class TestConformance(StoreConformance):
    """The conformance suite on the ``store`` fixture (one run per backend)."""
