"""Redis Cluster: cluster-enabled local nodes joined with redis-cli."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fleetmem.testing.servers._process import _LOCALHOST, HarnessError, _host_for_url
from fleetmem.testing.servers.redis import (
    RedisServer,
    _start_redis_process,
    find_redis_binary,
    redis_command,
)

__all__ = ["RedisCluster", "start_local_redis_cluster"]


@dataclass(eq=False)
class RedisCluster:
    """A Redis Cluster of masters started by the harness (``servers`` hold the fault handles)."""

    servers: list[RedisServer]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(server.host, server.port) for server in self.servers]

    @property
    def url(self) -> str:
        """``redis://host:port`` of the first node (a cluster client discovers the others)."""
        first = self.servers[0]
        return f"redis://{_host_for_url(first.host)}:{first.port}"

    @property
    def owned(self) -> bool:
        return all(server.owned for server in self.servers)

    def close(self) -> None:
        for server in self.servers:
            server.close()


def start_local_redis_cluster(
    *,
    masters: int = 3,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    timeout: float = 60.0,
) -> RedisCluster:
    """Start ``masters`` cluster-enabled nodes on free ports and join them with ``redis-cli``."""
    server_bin = find_redis_binary("redis-server", search_dirs)
    cli_bin = find_redis_binary("redis-cli", search_dirs)
    servers: list[RedisServer] = []
    try:
        for _ in range(masters):
            control = _start_redis_process(
                server_bin,
                prefix="fleetmem-redis-cluster-",
                options={
                    "save": "",
                    "appendonly": "no",
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": "5000",
                },
                extra_args=(),
                cluster_bus=True,
            )
            servers.append(RedisServer(host=_LOCALHOST, port=control.port, _control=control))
        create = subprocess.run(
            [
                str(cli_bin),
                "--cluster",
                "create",
                *(f"{s.host}:{s.port}" for s in servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            raise HarnessError(
                f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}"
            )
        deadline = time.monotonic() + timeout
        pending = list(servers)
        while pending and time.monotonic() < deadline:
            pending = [
                s
                for s in pending
                if b"cluster_state:ok" not in redis_command(s.host, s.port, "CLUSTER", "INFO")
            ]
            if pending:
                time.sleep(0.1)
        if pending:
            raise HarnessError(f"the Redis Cluster did not reach cluster_state:ok in {timeout}s")
    except BaseException:
        for server in servers:
            server.close()
        raise
    return RedisCluster(servers)
