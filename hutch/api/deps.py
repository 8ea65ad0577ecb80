"""What the control plane uses, handed to it typed: `ControlPlane`, made by the composition root
(`hutch.asgi`) once the server has started, and `control_plane(request)`, how a route gets it.

The routes see exactly these collaborators and nothing else of the process they run in: the
sessions through their seam (`hutch.scheduler.interface.Sessions`), MetaDB, the tenants, the
metrics, the cluster's secret, the configuration, and this host's templates and scheduler where
the role has them (a cluster's gateway has neither).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request

from hutch.config import ServerConfig
from hutch.metadb.base import MetaDB
from hutch.metrics import Metrics
from hutch.scheduler.interface import Sessions
from hutch.templates.service import TemplateService
from hutch.tenants import TenantService


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """The collaborators of the control plane's routes."""

    config: ServerConfig
    metadb: MetaDB
    tenants: TenantService
    sessions: Sessions
    metrics: Metrics
    secret: bytes  # the cluster's secret (keyed hashes: upload tokens of template files)
    templates: TemplateService | None  # None: templates live on a cluster's nodes
    warm_pools: Callable[[], dict[str, int]]  # pool key -> warm instances now (`/health`)


class ControlPlaneApp(FastAPI):
    """The control plane's FastAPI app, which carries its `ControlPlane`."""

    def __init__(self, plane: ControlPlane, *, title: str, version: str, description: str) -> None:
        super().__init__(
            title=title,
            version=version,
            description=description,
            openapi_url="/openapi.json",
            docs_url="/docs",
            redoc_url=None,
        )
        self.plane = plane


def control_plane(request: Request) -> ControlPlane:
    """The collaborators of the app a request reached (usable as a FastAPI dependency)."""
    app = request.app
    if not isinstance(app, ControlPlaneApp):
        raise TypeError("a control-plane route outside hutch.api.app.create_app")
    return app.plane
