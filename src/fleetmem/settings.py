"""``FleetmemSettings``: configuration read from ``FLEETMEM_*`` environment variables.

Only :func:`fleetmem.open_store` and the CLI read the environment; stores take typed arguments.
URLs may hold passwords, so they are ``SecretStr``: they never appear in a ``repr`` or a log.

=========================  ==============================================================
variable                   meaning
=========================  ==============================================================
``FLEETMEM_URL``           the store URL (``memory://``, ``sqlite:///path``,
                           ``postgresql://...``, ``redis://...``); unset: the embedded
                           default ``sqlite:///./fleetmem.db``
``FLEETMEM_BACKEND``       ``auto`` (from the URL) or ``hybrid``
``FLEETMEM_POSTGRES_URL``  the durable tier of the hybrid backend
``FLEETMEM_REDIS_URL``     the cache tier of the hybrid backend
``FLEETMEM_NAMESPACE``     the namespace (default ``default``)
``FLEETMEM_MAX_VALUE_BYTES``  the largest serialized value (default 8 MiB)
``FLEETMEM_CACHE_TTL``     the hybrid cache's TTL in seconds (default 300)
=========================  ==============================================================
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES

__all__ = ["DEFAULT_URL", "FleetmemSettings"]

#: The embedded default store: a SQLite file in the working directory.
DEFAULT_URL = "sqlite:///./fleetmem.db"


class FleetmemSettings(BaseSettings):
    """fleetmem's settings, from the environment (prefix ``FLEETMEM_``) or keyword arguments."""

    model_config = SettingsConfigDict(env_prefix="FLEETMEM_", extra="ignore")

    url: SecretStr | None = None
    backend: Literal["auto", "hybrid"] = "auto"
    postgres_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    namespace: str = "default"
    max_value_bytes: int = Field(default=DEFAULT_MAX_VALUE_BYTES, gt=0)
    cache_ttl: float = Field(default=300.0, gt=0)
