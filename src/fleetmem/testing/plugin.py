"""The fleetmem pytest plugin (entry point ``pytest11``): fixtures for stores and servers."""

from __future__ import annotations

import itertools
import os
import secrets

import pytest

_counter = itertools.count()


@pytest.fixture
def fleetmem_namespace() -> str:
    """A namespace no other test (in this run or a parallel xdist worker) uses."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"t{next(_counter)}-{worker}-{secrets.token_hex(4)}"
