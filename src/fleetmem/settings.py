"""``FleetmemSettings``: configuration read from ``FLEETMEM_*`` environment variables.

Only :func:`fleetmem.open_store` and the CLI read the environment; stores take typed arguments.
URLs may hold passwords, so they are ``SecretStr``: they never appear in a ``repr`` or a log.

=============================  ==========================================================
variable                       meaning
=============================  ==========================================================
``FLEETMEM_URL``               the store URL: ``memory://``, ``sqlite:///path``,
                               ``postgresql://...``, ``redis://...``, or a hybrid's
                               ``hybrid+postgresql://...?cache=redis://...``; unset: the
                               embedded default ``sqlite:///./fleetmem.db``, a file in the
                               **current working directory** (another directory, another
                               store: set ``FLEETMEM_URL=sqlite:////abs/path/fleetmem.db``)
``FLEETMEM_BACKEND``           ``auto`` (from the URL) or ``hybrid`` (the hybrid from the
                               two variables below instead of one URL)
``FLEETMEM_POSTGRES_URL``      with ``FLEETMEM_BACKEND=hybrid``: the durable tier
``FLEETMEM_REDIS_URL``         with ``FLEETMEM_BACKEND=hybrid``: the cache tier
``FLEETMEM_NAMESPACE``         the namespace (default ``default``)
``FLEETMEM_MAX_VALUE_BYTES``   the largest serialized value (default 8 MiB)
``FLEETMEM_CACHE_TTL``         the hybrid cache's TTL in seconds (default 300); a
                               ``cache_ttl=`` in a hybrid URL wins over it
=============================  ==========================================================

The hybrid (PostgreSQL as the store of record, Redis as its cache) is configured either way::

    FLEETMEM_URL='hybrid+postgresql://app:pw@pg:5432/agents?cache=redis://cache:6379/0'

    FLEETMEM_BACKEND=hybrid
    FLEETMEM_POSTGRES_URL='postgresql://app:pw@pg:5432/agents'
    FLEETMEM_REDIS_URL='redis://cache:6379/0'

In a hybrid URL, ``cache=`` is the Redis URL as it is, last (its own ``?``/``&`` parameters
stay its own), or percent-encoded anywhere (see :func:`fleetmem._urls.split_hybrid_url`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetmem._codec import DEFAULT_MAX_VALUE_BYTES

__all__ = ["DEFAULT_URL", "FleetmemSettings"]

#: The embedded default store: ``fleetmem.db`` in the current working directory (relative to
#: wherever the process runs, not to any project or home directory).
DEFAULT_URL = "sqlite:///./fleetmem.db"


class FleetmemSettings(BaseSettings):
    """fleetmem's settings, from the environment (prefix ``FLEETMEM_``) or keyword arguments.

    ``url`` unset means the embedded default, ``sqlite:///./fleetmem.db``: relative to the
    current working directory, so a process started elsewhere opens another file. ``url`` may
    be a hybrid URL (``hybrid+postgresql://...?cache=redis://...``); ``backend="hybrid"`` with
    ``postgres_url`` and ``redis_url`` is the other way to configure the hybrid.
    """

    model_config = SettingsConfigDict(env_prefix="FLEETMEM_", extra="ignore")

    url: SecretStr | None = None
    backend: Literal["auto", "hybrid"] = "auto"
    postgres_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    namespace: str = "default"
    max_value_bytes: int = Field(default=DEFAULT_MAX_VALUE_BYTES, gt=0)
    cache_ttl: float = Field(default=300.0, gt=0)
