"""``fleetmem serve``: the service under uvicorn, with a graceful shutdown.

On SIGTERM (or SIGINT) the server stops accepting connections, tells every long poll and event
stream to end (they return what they have, or close the stream), lets requests in flight finish
for up to ``shutdown_grace`` seconds, then closes the store (the app chains its own handler in
front of uvicorn's, see :mod:`fleetmem.service.app`, so this holds under any uvicorn command).
With ``workers > 1`` uvicorn runs that many processes on one socket; each builds its app from
the settings this module passes them in the environment (``FLEETMEM_SERVE_CONFIG``), so a
store URL, a tokens file and the limits reach every worker. ``memory://`` is refused with
several workers (each would hold a store of its own).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from typing import TYPE_CHECKING, Any

from fleetmem.errors import ConfigurationError
from fleetmem.service.context import ServiceSettings

if TYPE_CHECKING:
    from litestar import Litestar

__all__ = ["is_loopback", "serve"]

_CONFIG_ENV = "FLEETMEM_SERVE_CONFIG"


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def app_from_environment() -> Litestar:
    """The app a worker process runs, from the settings ``serve`` put in the environment."""
    from fleetmem.service.app import create_app

    config = json.loads(os.environ[_CONFIG_ENV])
    return create_app(
        config["url"],
        namespace=config["namespace"],
        tokens=config["tokens"],
        settings=ServiceSettings(**config["settings"]),
        metrics=config["metrics"],
    )


def serve(
    url: str | None = None,
    *,
    namespace: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    tokens: str | None = None,
    workers: int = 1,
    settings: ServiceSettings | None = None,
    metrics: bool = True,
    access_log: bool = False,
    log_level: str = "info",
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    forwarded_allow_ips: str | None = None,
) -> None:
    """Run the service until SIGTERM/SIGINT. Refuses to listen beyond loopback without a
    tokens file (:class:`ConfigurationError` saying why)."""
    settings = settings or ServiceSettings()
    if tokens is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without a tokens file: anyone who can reach it "
            "could read and write every namespace. Create one with 'fleetmem token new "
            "--namespaces GLOB --scope SCOPE --file tokens.toml' and pass --tokens "
            "tokens.toml, or listen on 127.0.0.1"
        )
    if tokens is not None:
        from fleetmem.service.auth import load_tokens

        load_tokens(tokens)  # a bad file fails here, before uvicorn starts
    if workers < 1:
        raise ConfigurationError(f"workers must be at least 1, not {workers}")
    if workers > 1 and (url or "").startswith("memory:"):
        raise ConfigurationError("memory:// cannot be shared by several workers; use one")
    import uvicorn

    os.environ[_CONFIG_ENV] = json.dumps(
        {
            "url": url,
            "namespace": namespace,
            "tokens": tokens,
            "settings": dataclasses.asdict(settings),
            "metrics": metrics,
        }
    )
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "workers": workers,
        "factory": True,
        "lifespan": "on",
        "access_log": access_log,
        "log_level": log_level,
        "timeout_graceful_shutdown": settings.shutdown_grace,
        "ssl_certfile": ssl_certfile,
        "ssl_keyfile": ssl_keyfile,
        "server_header": False,
        "proxy_headers": False,
    }
    if forwarded_allow_ips is not None:
        options["proxy_headers"] = True
        options["forwarded_allow_ips"] = forwarded_allow_ips
    config = uvicorn.Config("fleetmem.service.server:app_from_environment", **options)
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = _server_class()(config)
    server.run()
    if not server.started:
        raise ConfigurationError("the service did not start (its log above says why)")


def _server_class() -> type[Any]:
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):  # type: ignore[misc,unused-ignore]
        """uvicorn's server, but a stop on SIGTERM/SIGINT that shut down gracefully exits 0
        instead of re-raising the signal at the end (as ``systemd`` and ``docker stop``
        expect of a server that handles SIGTERM)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return Server
