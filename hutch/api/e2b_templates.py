"""E2B's template API, as the official SDK's `Template.build`, `build_in_background`, `exists`
and `get_build_status` call it.

1. `POST /v3/templates {name, tags, cpuCount, memoryMB}` → 202 `{templateID, buildID, …}`: a build
   waiting for its steps. The template's id is its name (hutch's templates are named).
2. For each COPY step, `GET /templates/{id}/files/{hash}` → `{present, url}`; the SDK uploads a
   gzipped tar of the step's files to `url` with a plain PUT (no API key: the URL carries a token
   made for that tenant and hash).
3. `POST /v2/templates/{id}/builds/{buildID} {fromTemplate | fromImage, steps, startCmd,
   readyCmd, force}` → 202: the steps run (`hutch.templates.builder`).
4. `GET /templates/{id}/builds/{buildID}/status?logsOffset` until `ready` or `error` (with the
   failed step and its last lines in `reason`).

`GET /templates/aliases/{name}` tells whether a template exists; `DELETE /templates/{id}`
deletes one with its tags. Tags name builds (`name:tag`; the bare name is the `default` tag, the
newest build): a build is registered under the tag of its name and its `tags`;
`POST /templates/tags {target, tags}` points more tags at the build `target` names,
`DELETE /templates/tags {name, tags}` removes some, `GET /templates/{id}/tags` lists them.
A tenant may build and delete its own templates and the unowned ones only an admin.
`fromImage` pulls the image (`hutch.templates.oci`; `fromImageRegistry` gives a registry's
credentials); a Dockerfile comes as such an image plus steps (the SDK translates it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hutch.api.auth import caller
from hutch.api.deps import control_plane
from hutch.api.native import iso
from hutch.api.templates import service
from hutch.errors import InvalidArgument, NotFound, PermissionDenied, TooLarge
from hutch.metadb.records import Tenant
from hutch.templates.builder import Step
from hutch.templates.model import DEFAULT_TAG, HOST, Template, check_name, check_tag, split_ref

router = APIRouter(tags=["e2b templates"])
Caller = Annotated[Tenant, Depends(caller)]
HASH_LENGTH = 64


class NewTemplate(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=128)
    tags: list[str] | None = None
    cpu_count: int | None = Field(None, alias="cpuCount", ge=1, le=64)
    memory_mb: int | None = Field(None, alias="memoryMB", ge=128, le=1 << 20)


class BuildStart(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    from_template: str | None = Field(None, alias="fromTemplate")
    from_image: str | None = Field(None, alias="fromImage")
    from_image_registry: dict[str, Any] | None = Field(None, alias="fromImageRegistry")
    force: bool = False
    steps: list[dict[str, Any]] = Field(default_factory=list, max_length=1000)
    start_cmd: str | None = Field(None, alias="startCmd", max_length=65536)
    ready_cmd: str | None = Field(None, alias="readyCmd", max_length=65536)


def _template_name(name: str) -> str:
    """E2B names may carry a tag (`name:tag`); hutch's template is the name."""
    return check_name(name.split(":", 1)[0].lower())


def _tags_of(name: str, extra: list[str] | None) -> tuple[str, ...]:
    """The tags a build of `name` (maybe `name:tag`) with E2B's `tags` is registered under."""
    _, has_tag, tag = name.partition(":")
    tags = [tag.lower()] if has_tag else []
    tags += [check_tag(t.lower()) for t in extra or []]
    return tuple(dict.fromkeys(tags)) or (DEFAULT_TAG,)


def _build_id(template: Template) -> str:
    """The build a tag names (E2B's ids are UUIDs; built-ins and snapshots get one from their layers)."""
    return template.build_id or str(uuid.uuid5(uuid.NAMESPACE_URL, "hutch-layers:" + ",".join(template.layers)))


def _may_write(request: Request, tenant: Tenant, name: str) -> None:
    templates = service(request)
    if templates.store.exists(name):
        owner = templates.store.get(name).owner
        if owner != tenant.tenant_id and not tenant.is_admin:
            raise PermissionDenied(f"template {name!r} belongs to someone else")


def _upload_token(request: Request, tenant_id: str, files_hash: str) -> str:
    secret = control_plane(request).secret
    return hmac.new(secret, f"template-files|{tenant_id}|{files_hash}".encode(), hashlib.sha256).hexdigest()


def _check_hash(files_hash: str) -> str:
    if len(files_hash) != HASH_LENGTH or any(c not in "0123456789abcdef" for c in files_hash):
        raise InvalidArgument("a files hash is 64 lowercase hex digits")
    return files_hash


@router.post("/v3/templates", status_code=202, summary="Start a template build (E2B)")
async def request_build(body: NewTemplate, request: Request, tenant: Caller) -> dict:
    name = _template_name(body.name)
    _may_write(request, tenant, name)
    tags = _tags_of(body.name, body.tags)
    build = service(request).new_build(name, owner=tenant.tenant_id, waiting=True, tags=tags)
    return {"templateID": name, "buildID": build.build_id, "public": False, "names": [name], "tags": list(tags),
            "aliases": [name]}  # fmt: skip


@router.get("/templates/{template_id}/files/{files_hash}", status_code=201, summary="Where to upload a COPY's files")
async def file_upload_link(template_id: str, files_hash: str, request: Request, tenant: Caller) -> dict:
    _template_name(template_id)
    _check_hash(files_hash)
    present = (service(request).files_for(tenant.tenant_id) / files_hash).is_file()
    token = _upload_token(request, tenant.tenant_id, files_hash)
    base = str(request.base_url).rstrip("/")
    url = f"{base}/templates/{template_id}/files/{files_hash}/upload?tenant={tenant.tenant_id}&token={token}"
    return {"present": present, "url": url}


@router.put("/templates/{template_id}/files/{files_hash}/upload", status_code=200, summary="Upload a COPY's files")
async def upload_files(
    template_id: str, files_hash: str, request: Request, tenant: Annotated[str, Query()], token: Annotated[str, Query()]
) -> Response:
    _check_hash(files_hash)
    if not hmac.compare_digest(token, _upload_token(request, tenant, files_hash)):
        raise PermissionDenied("this upload URL is not valid")
    limit_mb = service(request).config.max_upload_mb
    limit = limit_mb * 1024 * 1024
    too_large = TooLarge(f"the files of one COPY may be at most {limit_mb} MiB ([templates] max_upload_mb)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    directory = service(request).files_for(tenant)
    target = directory / files_hash
    scratch = directory / f".{uuid.uuid4().hex}.part"
    size = 0
    try:
        with open(scratch, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                out.write(chunk)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    return Response(status_code=200)


@router.post("/v2/templates/{template_id}/builds/{build_id}", status_code=202, summary="Run a build's steps (E2B)")
async def start_build(template_id: str, build_id: str, body: BuildStart, request: Request, tenant: Caller) -> Response:
    templates = service(request)
    build = templates.build(build_id)
    if build.template != _template_name(template_id) or (build.owner != tenant.tenant_id and not tenant.is_admin):
        raise NotFound(f"build {build_id} of template {template_id} not found")
    steps = [Step.parse(step) for step in body.steps]
    if body.from_image:
        templates.start_steps(
            build, None, steps, body.force, body.start_cmd, body.ready_cmd, image=body.from_image,
            image_credentials=_registry_credentials(body.from_image_registry),
        )  # fmt: skip
        return Response(status_code=202)
    parent = body.from_template or "base"
    if _template_name(parent) == HOST:
        raise InvalidArgument("the 'host' template is the host's own system: templates build on a root file system")
    templates.start_steps(build, _template_name(parent), steps, body.force, body.start_cmd, body.ready_cmd)
    return Response(status_code=202)


def _registry_credentials(registry: dict[str, Any] | None) -> str | None:
    """E2B's `fromImageRegistry` for a plain registry: {"type": "registry", "username", "password"}."""
    if not registry:
        return None
    if registry.get("type") != "registry":
        raise InvalidArgument(f"registry type {registry.get('type')!r} is not supported here (only 'registry')")
    username, password = registry.get("username"), registry.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise InvalidArgument("a registry needs a username and a password")
    return f"{username}:{password}"


@router.get("/templates/{template_id}/builds/{build_id}/status", summary="A build's status and logs (E2B)")
async def build_status(
    template_id: str,
    build_id: str,
    request: Request,
    tenant: Caller,
    logs_offset: Annotated[int, Query(alias="logsOffset", ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    build = service(request).build(build_id)
    if build.template != _template_name(template_id) or (build.owner != tenant.tenant_id and not tenant.is_admin):
        raise NotFound(f"build {build_id} of template {template_id} not found")
    entries = build.since(logs_offset)[:limit]
    log_entries = [{"timestamp": iso(ts), "level": level, "message": line} for ts, level, line in entries]
    answer: dict = {
        "templateID": build.template,
        "buildID": build.build_id,
        "status": build.status,
        "logEntries": log_entries,
        "logs": [f"[{iso(ts)}] {line}" for ts, _, line in entries],
    }
    if build.status == "error":
        tail = [entry for entry in log_entries if entry["level"] == "error"][-1:]
        answer["reason"] = {
            "message": build.error or "the build failed",
            **({"step": str(build.failed_step)} if build.failed_step is not None else {}),
            "logEntries": tail,
        }
    return answer


@router.get("/templates/aliases/{alias}", summary="Whether a template exists (E2B)")
async def alias(alias: str, request: Request, tenant: Caller) -> dict:
    try:
        name = _template_name(alias)
    except InvalidArgument:
        raise NotFound(f"template {alias!r} not found") from None
    if not service(request).store.exists(name):
        raise NotFound(f"template {alias!r} not found")
    return {"templateID": name, "public": False}


class AssignTags(BaseModel):
    target: str = Field(min_length=1, max_length=256, description="the build to tag: `name:tag` (or `name`)")
    tags: list[str] = Field(min_length=1, max_length=100)


class RemoveTags(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    tags: list[str] = Field(min_length=1, max_length=100)


def _owned(request: Request, tenant: Tenant, name: str, read: bool = False) -> Template:
    """Template `name`, if the caller may change it (`read`: or it is a built-in everyone reads)."""
    template = service(request).get(name)
    if template.owner != tenant.tenant_id and not tenant.is_admin and not (read and template.owner == ""):
        raise PermissionDenied(f"template {name!r} belongs to someone else")
    return template


# Before `/templates/{template_id}`, which would take `tags` for a template's id.
@router.post("/templates/tags", status_code=201, summary="Point tags at a template's build (E2B)")
async def assign_tags(body: AssignTags, request: Request, tenant: Caller) -> dict:
    name, _ = split_ref(body.target.lower())
    _owned(request, tenant, name)
    store = service(request).store
    target = store.get(body.target.lower())
    tags = tuple(dict.fromkeys(check_tag(tag.lower()) for tag in body.tags))
    store.put(dataclasses.replace(target, name=name), tags)
    return {"tags": list(tags), "buildID": _build_id(target)}


@router.delete("/templates/tags", status_code=204, summary="Remove tags of a template (E2B)")
async def remove_tags(body: RemoveTags, request: Request, tenant: Caller) -> Response:
    name = _template_name(body.name)
    _owned(request, tenant, name)
    service(request).store.untag(name, [tag.lower() for tag in body.tags])
    return Response(status_code=204)


@router.get("/templates/{template_id}/tags", summary="A template's tags and the builds they name (E2B)")
async def list_tags(template_id: str, request: Request, tenant: Caller) -> list[dict]:
    name = _template_name(template_id)
    _owned(request, tenant, name, read=True)
    tags = service(request).store.tags(name)
    return [{"tag": tag, "buildID": _build_id(t), "createdAt": iso(t.created_at)} for tag, t in sorted(tags.items())]


@router.delete("/templates/{template_id}", status_code=204, summary="Delete a template (E2B)")
async def delete_template(template_id: str, request: Request, tenant: Caller) -> Response:
    name = _template_name(template_id)
    templates = service(request)
    template = templates.get(name)
    if template.owner != tenant.tenant_id and not tenant.is_admin:
        raise PermissionDenied(f"template {name!r} belongs to someone else")
    templates.delete(name)
    return Response(status_code=204)
