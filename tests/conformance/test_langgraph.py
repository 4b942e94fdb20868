"""The LangGraph adapter (``FleetmemStore``) on every backend in the ``BACKENDS`` table."""

from __future__ import annotations

from fleetmem.testing.conformance.langgraph import LangGraphConformance


class TestLangGraph(LangGraphConformance):
    """The adapter's conformance class on the ``store`` fixture (one run per backend)."""
