"""Templates over HTTP (`/v1/templates`): list, inspect, build (with a log to follow), delete.

Templates belong to the host's template store and are usable by every tenant's functions;
building and deleting them is an admin's (a build runs as root on the host: mmdebstrap).
Routes stay thin: parse, call `TemplateService`, render.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hutch.api.auth import caller
from hutch.api.deps import control_plane
from hutch.api.native import iso
from hutch.errors import Unimplemented
from hutch.metadb.records import Tenant
from hutch.templates.model import HOST, Template
from hutch.templates.service import Build, TemplateService

router = APIRouter(prefix="/v1")
Caller = Annotated[Tenant, Depends(caller)]


class DebianSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    packages: list[str] = Field(default_factory=list, max_length=500)


class TemplateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    debian: DebianSource = Field(description="a Debian system of the configured suite with these packages")
    user: str = Field("user", pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="who runs commands by default")
    workdir: str = Field("/home/user", pattern=r"^/\S{0,4095}$", description="where commands start by default")
    env: dict[str, str] = Field(default_factory=dict, alias="environmentVariables")


def service(request: Request) -> TemplateService:
    templates = control_plane(request).templates
    if templates is None:
        raise Unimplemented("templates live on the nodes of a cluster; ask a `hutch serve` or a node")
    return templates


def template_json(template: Template) -> dict:
    return {
        "name": template.name,
        "source": template.source,
        "layers": list(template.layers),
        "user": template.user,
        "workdir": template.workdir,
        "environmentVariables": template.env,
        "startCmd": template.start_cmd,
        "readyCmd": template.ready_cmd,
        "memory": template.memory,  # a memory snapshot: its sandboxes start from its processes
        "createdTime": iso(template.created_at),
    }


def build_json(build: Build, offset: int = 0) -> dict:
    return {
        "buildId": build.build_id,
        "template": build.template,
        "status": build.status,
        "error": build.error,
        "startedTime": iso(build.started_at),
        "finishedTime": iso(build.finished_at),
        "logs": [{"timestamp": iso(ts), "level": level, "line": line} for ts, level, line in build.since(offset)],
        "nextOffset": build.total_lines,
    }


@router.get("/templates", tags=["templates"], summary="The templates instances can boot from")
async def list_templates(request: Request, tenant: Caller) -> dict:
    host = {"name": HOST, "source": "the host's own system, read-only (no root inside)"}
    return {"templates": [host, *(template_json(t) for t in service(request).templates())]}


@router.get("/templates/{name}", tags=["templates"], summary="A template, or one build of it (`name:tag`)")
async def get_template(name: str, request: Request, tenant: Caller) -> dict:
    store = service(request).store
    template = store.get(name)
    return {**template_json(template), "tags": sorted(store.tags(name.partition(":")[0]))}


@router.post("/templates", status_code=202, tags=["templates"], summary="Build a template (admin); follow its build")
async def build_template(body: TemplateIn, request: Request, tenant: Caller) -> dict:
    control_plane(request).tenants.require_admin(tenant)
    build = service(request).start_debian(body.name, body.debian.packages, body.user, body.workdir, body.env)
    return build_json(build)


@router.get("/templates/builds/{build_id}", tags=["templates"], summary="A build's status and log lines")
async def get_build(build_id: str, request: Request, tenant: Caller, offset: Annotated[int, Query(ge=0)] = 0) -> dict:
    return build_json(service(request).build(build_id), offset)


@router.delete("/templates/{name}", status_code=204, tags=["templates"], summary="Delete a template (admin)")
async def delete_template(name: str, request: Request, tenant: Caller) -> Response:
    control_plane(request).tenants.require_admin(tenant)
    service(request).delete(name)
    return Response(status_code=204)
