"""The fleetmem HTTP service (the ``service`` extra): ``create_app`` builds the ASGI app that
``fleetmem serve`` runs with uvicorn. See ``docs/service.md``."""

from __future__ import annotations

from fleetmem.service.app import create_app
from fleetmem.service.context import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
