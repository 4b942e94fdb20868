"""``InMemoryStore``: a process-local store for tests and single-process fleets."""

from __future__ import annotations

from typing import Any

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES
from fleetmem.backends.memory.kv import InMemoryKV
from fleetmem.store import Store, user_namespace

__all__ = ["InMemoryStore"]


class InMemoryStore(Store[InMemoryKV]):
    """A ``MemoryStore`` held in this process's memory; nothing survives the process."""

    backend_name = "memory"

    def __init__(
        self, *, namespace: str = "default", max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> None:
        super().__init__(
            InMemoryKV(namespace=user_namespace(namespace)), max_value_bytes=max_value_bytes
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> InMemoryStore:
        """``memory://`` (anything after the scheme is ignored)."""
        return cls(**options)
