"""Docker: throwaway containers through testcontainers, and the container-or-local choice."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fleetmem.testing.servers._process import (
    _LIVE,
    _START_ATTEMPTS,
    HarnessError,
    find_free_port,
    stop_signal,
)
from fleetmem.testing.servers.postgres import (
    PostgresServer,
    postgres_accepts,
    start_local_postgres,
)
from fleetmem.testing.servers.redis import RedisServer, _redis_answers, start_local_redis

__all__ = [
    "POSTGRES_IMAGE",
    "REDIS_IMAGE",
    "docker_available",
    "new_postgres_server",
    "new_redis_server",
    "start_postgres_container",
    "start_redis_container",
]

POSTGRES_IMAGE = "postgres:15"
REDIS_IMAGE = "redis:7"


def docker_available(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping (fast False when there is no socket at all).

    ``FLEETMEM_TEST_DOCKER=0`` turns containers off even when Docker runs.
    """
    if os.environ.get("FLEETMEM_TEST_DOCKER", "").lower() in ("0", "false", "no", "off"):
        return False
    if not os.environ.get("DOCKER_HOST"):
        sockets = [
            Path("/var/run/docker.sock"),
            Path.home() / ".docker/run/docker.sock",
            Path.home() / ".docker/desktop/docker.sock",
        ]
        if not any(path.exists() for path in sockets):
            return False
    try:
        docker = importlib.import_module("docker")
    except ImportError:
        return False
    with warnings.catch_warnings():
        # A failed docker.from_env() leaves an unclosed socket to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=max(1, round(timeout)))
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


class _ContainerControl:
    """Fault handles of a testcontainers container (ports bound fixed, so restarts keep them)."""

    def __init__(
        self,
        container: Any,
        *,
        ready: Callable[[], bool],
        stop_signals: Mapping[str, str],
        startup_timeout: float = 60.0,
    ) -> None:
        self._container = container
        self._ready = ready
        self._stop_signals = stop_signals
        self._startup_timeout = startup_timeout
        self._closed = False
        _LIVE.append(self)

    def _wrapped(self) -> Any:
        return self._container.get_wrapped_container()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._ready():
                return
            time.sleep(0.1)
        raise HarnessError(f"the container did not answer within {self._startup_timeout:.0f}s")

    def kill(self) -> None:
        self._wrapped().kill(signal="SIGKILL")
        self._wrapped().wait(timeout=30)

    def stop(self, mode: str = "fast") -> None:
        sig = stop_signal(self._stop_signals, mode)
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status == "paused":
            wrapped.unpause()
        if wrapped.status in ("running", "paused"):
            wrapped.kill(signal=sig)
            wrapped.wait(timeout=60)

    def start(self) -> None:
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status != "running":
            wrapped.start()
        self._wait_ready()

    def pause(self) -> None:
        self._wrapped().pause()

    def resume(self) -> None:
        wrapped = self._wrapped()
        wrapped.reload()
        if wrapped.status == "paused":
            wrapped.unpause()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            _LIVE.remove(self)
        self._container.stop()


def _start_container(container: Any, internal_port: int) -> tuple[Any, str, int]:
    """Start ``container`` with ``internal_port`` bound to a free host port (retry if taken)."""
    last: Exception | None = None
    for _ in range(_START_ATTEMPTS):
        host_port = find_free_port()
        container.with_bind_ports(internal_port, host_port)
        try:
            container.start()
        except Exception as exc:  # the Docker SDK's APIError on a port conflict
            message = str(exc).lower()
            if (
                "port is already allocated" not in message
                and "address already in use" not in message
            ):
                raise
            last = exc  # the created-but-unstarted container is left to testcontainers' reaper
            continue
        return container, container.get_container_host_ip(), host_port
    raise HarnessError("could not bind a free host port for the container") from last


def start_postgres_container(image: str = POSTGRES_IMAGE) -> PostgresServer:
    """A throwaway PostgreSQL container (trust auth, user and database ``postgres``)."""
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.postgres import PostgresContainer
    # The image wants a password; trust auth makes it unused, so the DSN carries none.
    container = PostgresContainer(
        image,
        username="postgres",
        password="unused",  # noqa: S106
        dbname="postgres",
        driver=None,
    ).with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
    container, host, port = _start_container(container, 5432)
    control = _ContainerControl(
        container,
        ready=lambda: postgres_accepts(host, port, "postgres", "postgres"),
        stop_signals={"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"},
    )
    server = PostgresServer(
        host=host, port=port, user="postgres", database="postgres", _control=control
    )
    control.start()  # wait until it answers through the bound port
    return server


def start_redis_container(
    image: str = REDIS_IMAGE,
    *,
    appendonly: bool = False,
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """A throwaway Redis container; with ``appendonly`` its AOF survives kill and start."""
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.10
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.redis import RedisContainer
    command = [
        "redis-server",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        appendfsync,
        *extra_args,
    ]
    container = RedisContainer(image).with_command(command)
    container, host, port = _start_container(container, 6379)
    control = _ContainerControl(
        container,
        ready=lambda: _redis_answers(host, port),
        stop_signals={"smart": "SIGTERM", "fast": "SIGTERM", "immediate": "SIGKILL"},
    )
    control.start()
    return RedisServer(host=host, port=port, _control=control)


# -- provider order -----------------------------------------------------------------------------


def new_postgres_server(
    *,
    durable: bool = False,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    use_docker: bool | None = None,
) -> PostgresServer:
    """A new owned PostgreSQL server: a container when Docker answers, else local binaries.

    Raises :class:`ServerNotFoundError` (with how to get a server) when neither is available.
    """
    if use_docker is None:
        use_docker = docker_available()
    if use_docker:
        return start_postgres_container()
    return start_local_postgres(search_dirs=search_dirs, durable=durable)


def new_redis_server(
    *,
    appendonly: bool = False,
    appendfsync: str = "always",
    extra_args: Sequence[str] = (),
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    use_docker: bool | None = None,
) -> RedisServer:
    """A new owned Redis server: a container when Docker answers, else ``redis-server``."""
    if use_docker is None:
        use_docker = docker_available()
    if use_docker:
        return start_redis_container(
            appendonly=appendonly, appendfsync=appendfsync, extra_args=extra_args
        )
    return start_local_redis(
        search_dirs=search_dirs,
        appendonly=appendonly,
        appendfsync=appendfsync,
        extra_args=extra_args,
    )
