"""Real PostgreSQL and Redis servers for tests, with fault handles: one module per technology."""

from __future__ import annotations

from fleetmem.testing.servers._process import (
    HarnessError,
    NotOwnedError,
    ServerNotFoundError,
    find_free_port,
)
from fleetmem.testing.servers.cluster import RedisCluster, start_local_redis_cluster
from fleetmem.testing.servers.docker import POSTGRES_IMAGE as POSTGRES_IMAGE
from fleetmem.testing.servers.docker import REDIS_IMAGE as REDIS_IMAGE
from fleetmem.testing.servers.docker import (
    docker_available,
    new_postgres_server,
    new_redis_server,
    start_postgres_container,
    start_redis_container,
)
from fleetmem.testing.servers.postgres import POSTGRES_BIN_GLOBS as POSTGRES_BIN_GLOBS
from fleetmem.testing.servers.postgres import (
    PostgresServer,
    find_postgres_bindir,
    postgres_accepts,
    start_local_postgres,
)
from fleetmem.testing.servers.redis import (
    RedisServer,
    find_redis_binary,
    redis_command,
    start_local_redis,
)

__all__ = [
    "HarnessError",
    "NotOwnedError",
    "PostgresServer",
    "RedisCluster",
    "RedisServer",
    "ServerNotFoundError",
    "docker_available",
    "find_free_port",
    "find_postgres_bindir",
    "find_redis_binary",
    "new_postgres_server",
    "new_redis_server",
    "postgres_accepts",
    "redis_command",
    "start_local_postgres",
    "start_local_redis",
    "start_local_redis_cluster",
    "start_postgres_container",
    "start_redis_container",
]
