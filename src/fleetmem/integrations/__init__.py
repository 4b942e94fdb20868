"""Adapters that let other frameworks use a fleetmem store.

Each adapter is a module of its own behind an extra (``fleetmem.integrations.langgraph``: the
``langgraph`` extra); importing :mod:`fleetmem` or this package imports none of them.
"""
