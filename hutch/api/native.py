"""hutch's own control plane (`/v1/...`): tenants, functions and sessions.

Session fields use the function-platform names: `sessionId`,
`sessionTTLInSeconds`, `sessionIdleTimeoutInSeconds`, `sessionStatus`, `containerId`,
`disableSessionIdReuse`, `sessionAffinityType`, `createdTime`, `lastModifiedTime`.
Routes stay thin: parse, call a service, render.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hutch.api.auth import caller
from hutch.api.deps import ControlPlane, control_plane
from hutch.api.idempotency import create_once, request_hash
from hutch.errors import InvalidArgument, NotFound, PermissionDenied
from hutch.functions import BUILTIN_TENANT, AffinityType, FunctionSpec, NetworkSpec, check_warm_pools
from hutch.metadb.records import EndReason, FunctionRecord, SessionRecord, SessionStatus, Tenant
from hutch.tenants import DEFAULT_IMAGE_DISK_MB

router = APIRouter(prefix="/v1")
Caller = Annotated[Tenant, Depends(caller)]


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- tenants -----------------------------------------------------------------------------------


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    max_sessions: int = Field(50, alias="maxSessions", ge=0, le=100000)
    max_vcpu: float | None = Field(None, alias="maxVcpu", ge=0, le=1e6, description="vCPUs of live sessions")
    max_memory_mb: int | None = Field(None, alias="maxMemoryMB", ge=0, le=1 << 40, description="their memory")
    max_image_disk_mb: int | None = Field(
        DEFAULT_IMAGE_DISK_MB,
        alias="maxImageDiskMB",
        ge=0,
        le=1 << 40,
        description="disk of its hibernated sessions and memory snapshots",
    )


class TenantPatch(BaseModel):
    """Only the quotas given change; `null` lifts the vCPU, memory or image disk quota."""

    model_config = ConfigDict(extra="forbid")
    max_sessions: int | None = Field(None, alias="maxSessions", ge=0, le=100000)
    max_vcpu: float | None = Field(None, alias="maxVcpu", ge=0, le=1e6)
    max_memory_mb: int | None = Field(None, alias="maxMemoryMB", ge=0, le=1 << 40)
    max_image_disk_mb: int | None = Field(None, alias="maxImageDiskMB", ge=0, le=1 << 40)


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field("api", min_length=1, max_length=64)


def tenant_json(tenant: Tenant) -> dict:
    return {
        "tenantId": tenant.tenant_id,
        "name": tenant.name,
        "admin": tenant.is_admin,
        "maxSessions": tenant.max_sessions,
        "maxVcpu": tenant.max_vcpu,
        "maxMemoryMB": tenant.max_memory_mb,
        "maxImageDiskMB": tenant.max_image_disk_mb,
        "createdTime": iso(tenant.created_at),
    }


@router.post("/tenants", status_code=201, tags=["tenants"], summary="Create a tenant (admin); returns its first key")
async def create_tenant(body: TenantIn, request: Request, tenant: Caller) -> dict:
    made, key = await control_plane(request).tenants.create(
        tenant, body.name, body.max_sessions, body.max_vcpu, body.max_memory_mb, body.max_image_disk_mb
    )
    return {**tenant_json(made), "apiKey": key}


@router.get("/tenants", tags=["tenants"], summary="List tenants (admin)")
async def list_tenants(request: Request, tenant: Caller) -> dict:
    control_plane(request).tenants.require_admin(tenant)
    return {"tenants": [tenant_json(t) for t in await control_plane(request).metadb.list_tenants()]}


@router.get("/tenants/me", tags=["tenants"], summary="The calling tenant")
async def me(tenant: Caller) -> dict:
    return tenant_json(tenant)


@router.patch("/tenants/{tenant_id}", tags=["tenants"], summary="Change a tenant's quotas (admin)")
async def patch_tenant(tenant_id: str, body: TenantPatch, request: Request, tenant: Caller) -> dict:
    quotas = {name: getattr(body, name) for name in body.model_fields_set}
    return tenant_json(await control_plane(request).tenants.update_quota(tenant, tenant_id, **quotas))


@router.post("/tenants/{tenant_id}/keys", status_code=201, tags=["tenants"], summary="Issue another API key")
async def add_key(tenant_id: str, body: KeyIn, request: Request, tenant: Caller) -> dict:
    key = await control_plane(request).tenants.add_key(tenant, tenant_id, body.label)
    return {"tenantId": tenant_id, "apiKey": key}


@router.get("/nodes", tags=["nodes"], summary="The nodes (schedulers) and whether they are live (admin)")
async def list_nodes(request: Request, tenant: Caller) -> dict:
    plane = control_plane(request)
    plane.tenants.require_admin(tenant)
    lease = plane.config.cluster.lease_seconds
    now = time.time()
    return {
        "nodes": [
            {
                "nodeId": record.scheduler_id,
                "address": record.address,
                "live": now - record.heartbeat_at < lease,
                "heartbeatTime": iso(record.heartbeat_at),
                "capacity": record.capacity,
            }
            for record in sorted(await plane.metadb.list_schedulers(), key=lambda r: r.scheduler_id)
        ]
    }


# -- functions ---------------------------------------------------------------------------------


def function_json(record: FunctionRecord) -> dict:
    return {
        **FunctionSpec.model_validate(record.spec).wire(),
        "builtin": record.tenant_id == BUILTIN_TENANT,
        "createdTime": iso(record.created_at),
        "lastModifiedTime": iso(record.updated_at),
    }


@router.get("/functions", tags=["functions"], summary="The tenant's functions and the built-ins")
async def list_functions(request: Request, tenant: Caller) -> dict:
    records = await control_plane(request).metadb.list_functions(tenant.tenant_id)
    return {"functions": [function_json(r) for r in records]}


@router.post("/functions", status_code=201, tags=["functions"], summary="Create a function")
async def create_function(spec: FunctionSpec, request: Request, tenant: Caller) -> dict:
    plane = control_plane(request)
    existing = await plane.metadb.list_functions(tenant.tenant_id)
    if any(r.name == spec.name and r.tenant_id == tenant.tenant_id for r in existing):
        from hutch.errors import AlreadyExists

        raise AlreadyExists(f"function {spec.name} already exists")
    return await _store_function(plane, tenant, spec)


async def _store_function(
    plane: ControlPlane, tenant: Tenant, spec: FunctionSpec, created_at: float | None = None
) -> dict:
    if spec.warm_pool_size:
        records = await plane.metadb.list_functions(tenant.tenant_id)
        own = [FunctionSpec.model_validate(r.spec) for r in records if r.tenant_id == tenant.tenant_id]
        check_warm_pools(tenant, [s for s in own if s.name != spec.name] + [spec])
    now = time.time()
    record = FunctionRecord(tenant.tenant_id, spec.name, spec.wire(), created_at or now, now)
    await plane.metadb.put_function(record)
    plane.sessions.function_changed(tenant.tenant_id, spec, spec.name)
    return function_json(record)


@router.get("/functions/{name}", tags=["functions"], summary="A function")
async def get_function(name: str, request: Request, tenant: Caller) -> dict:
    return function_json(await control_plane(request).metadb.get_function(tenant.tenant_id, name))


@router.put("/functions/{name}", tags=["functions"], summary="Replace a function's settings")
async def put_function(name: str, spec: FunctionSpec, request: Request, tenant: Caller) -> dict:
    if spec.name != name:
        raise InvalidArgument(f"the body names function {spec.name!r}, the path {name!r}")
    plane = control_plane(request)
    current = await plane.metadb.get_function(tenant.tenant_id, name)
    if current.tenant_id == BUILTIN_TENANT:
        raise PermissionDenied(f"{name} is built in; create a function of your own (POST /v1/functions)")
    return await _store_function(plane, tenant, spec, current.created_at)


@router.delete(
    "/functions/{name}", status_code=204, tags=["functions"], summary="Delete a function and end its sessions"
)
async def delete_function(name: str, request: Request, tenant: Caller) -> Response:
    plane = control_plane(request)
    current = await plane.metadb.get_function(tenant.tenant_id, name)
    if current.tenant_id == BUILTIN_TENANT:
        raise PermissionDenied(f"{name} is built in and cannot be deleted")
    await plane.metadb.delete_function(tenant.tenant_id, name)
    plane.sessions.function_changed(tenant.tenant_id, None, name)
    return Response(status_code=204)


# -- sessions ----------------------------------------------------------------------------------


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    session_id: str | None = Field(None, alias="sessionId", description="HEADER_FIELD functions only")
    network: NetworkSpec | None = Field(None, description="this session's egress policy instead of its function's")
    ttl_s: int | None = Field(None, alias="sessionTTLInSeconds", ge=1, le=21600)
    idle_timeout_s: int | None = Field(None, alias="sessionIdleTimeoutInSeconds", ge=0, le=21600)
    env: dict[str, str] = Field(default_factory=dict, alias="environmentVariables")
    metadata: dict[str, str] = Field(default_factory=dict)


class SessionPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    ttl_s: int | None = Field(None, alias="sessionTTLInSeconds", ge=1, le=21600)
    idle_timeout_s: int | None = Field(None, alias="sessionIdleTimeoutInSeconds", ge=0, le=21600)
    network: NetworkSpec | None = Field(None, description="a new egress policy, in force at once")


def _network_json(policy: dict | None) -> dict | None:
    """A session's own policy in wire names (None: its function's applies)."""
    if policy is None:
        return None
    return {"allowInternetAccess": policy["internet"], "allowOut": policy["allow"], "denyOut": policy["deny"]}


def session_json(session: SessionRecord) -> dict:
    return {
        "sessionId": session.session_id,
        "functionName": session.function,
        "sessionAffinityType": session.affinity,
        "sessionStatus": session.status.value,
        "containerId": session.instance_id,
        "nodeId": session.scheduler_id,
        "sessionTTLInSeconds": session.ttl_s,
        "sessionIdleTimeoutInSeconds": session.idle_timeout_s,
        "disableSessionIdReuse": session.disable_reuse,
        "createdTime": iso(session.created_at),
        "lastModifiedTime": iso(session.last_modified),
        "lastActivityTime": iso(session.last_activity),
        "expireTime": iso(session.expires_at),
        "epoch": session.epoch,
        # running, or asleep: frozen (memory kept) / stopped (files kept); paused: only a resume wakes it
        "state": session.sleep["state"] if session.sleep else "running",
        "paused": session.paused,
        "previewId": session.row_id,  # host names {port}-{previewId}.{domain} reach its ports
        "metadata": session.metadata,
        "network": _network_json(session.network),
        **({"endTime": iso(session.ended_at), "endReason": session.end_reason} if not session.active else {}),
    }


@router.post("/functions/{name}/sessions", status_code=201, tags=["sessions"], summary="Create (prewarm) a session")
async def create_session(
    name: str,
    body: SessionIn,
    request: Request,
    tenant: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict:
    """A retry with the same `Idempotency-Key` gets the first create's session (`hutch.api.idempotency`)."""
    fingerprint = request_hash(f"native:create:{name}", body.model_dump(mode="json", by_alias=True))
    metadb = control_plane(request).metadb
    session = await create_once(
        metadb, tenant.tenant_id, idempotency_key, fingerprint, lambda: _create_session(request, tenant, name, body)
    )
    return session_json(session)


async def _create_session(request: Request, tenant: Tenant, name: str, body: SessionIn) -> SessionRecord:
    sessions = control_plane(request).sessions
    _, spec = await sessions.function(tenant.tenant_id, name)
    if body.session_id is not None and spec.session_affinity != AffinityType.HEADER_FIELD:
        raise InvalidArgument("a client-chosen sessionId is only allowed for HEADER_FIELD functions")
    session, _ = await sessions.create(
        tenant,
        name,
        session_id=body.session_id,
        affinity=spec.session_affinity.value,
        ttl_s=body.ttl_s,
        idle_timeout_s=body.idle_timeout_s,
        env=body.env,
        metadata=body.metadata,
        network=body.network.to_runtime() if body.network is not None else None,
    )
    return session


async def _list(request: Request, tenant: Tenant, function: str | None, status, limit: int, next_token) -> dict:
    records, token = await control_plane(request).metadb.list_sessions(
        tenant.tenant_id, status=status, function=function, limit=limit, after=next_token
    )
    live = control_plane(request).sessions
    return {
        "sessions": [session_json((live.active(r.internal_id) or r) if r.active else r) for r in records],
        "nextToken": token,
    }


@router.get("/functions/{name}/sessions", tags=["sessions"], summary="A function's sessions, newest first")
async def list_function_sessions(
    name: str,
    request: Request,
    tenant: Caller,
    status: SessionStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
    next_token: str | None = Query(None, alias="nextToken"),
) -> dict:
    await control_plane(request).metadb.get_function(tenant.tenant_id, name)
    return await _list(request, tenant, name, status, limit, next_token)


@router.get("/sessions", tags=["sessions"], summary="All of the tenant's sessions, newest first")
async def list_sessions(
    request: Request,
    tenant: Caller,
    status: SessionStatus | None = None,
    limit: int = Query(100, ge=1, le=1000),
    next_token: str | None = Query(None, alias="nextToken"),
) -> dict:
    return await _list(request, tenant, None, status, limit, next_token)


async def _session(request: Request, tenant: Tenant, name: str, session_id: str) -> SessionRecord:
    return await control_plane(request).sessions.get(tenant.tenant_id, session_id, name)


@router.get("/functions/{name}/sessions/{session_id}", tags=["sessions"], summary="A session")
async def get_session(name: str, session_id: str, request: Request, tenant: Caller) -> dict:
    return session_json(await _session(request, tenant, name, session_id))


@router.patch("/functions/{name}/sessions/{session_id}", tags=["sessions"], summary="Renew TTL / idle timeout")
async def update_session(name: str, session_id: str, body: SessionPatch, request: Request, tenant: Caller) -> dict:
    if body.ttl_s is None and body.idle_timeout_s is None and body.network is None:
        raise InvalidArgument("give sessionTTLInSeconds, sessionIdleTimeoutInSeconds and/or network")
    sessions = control_plane(request).sessions
    session = await _session(request, tenant, name, session_id)
    if body.network is not None:
        session = await sessions.set_network(session, body.network.to_runtime())
    if body.ttl_s is not None or body.idle_timeout_s is not None:
        session = await sessions.renew(session, body.ttl_s, body.idle_timeout_s)
    return session_json(session)


class PauseIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    keep_memory: bool = Field(
        True,
        alias="keepMemory",
        description="true: processes and memory kept (hibernated to disk where the host can, else frozen); "
        "false: only its files kept",
    )


@router.post(
    "/functions/{name}/sessions/{session_id}/pause",
    tags=["sessions"],
    summary="Pause a session: no CPU; its requests answer 409 until it is resumed",
)
async def pause_session(
    name: str, session_id: str, request: Request, tenant: Caller, body: PauseIn | None = None
) -> dict:
    session = await _active_session(request, tenant, name, session_id)
    keep_memory = (body or PauseIn()).keep_memory
    paused, _ = await control_plane(request).sessions.sleep(session, paused=True, memory=keep_memory)
    return session_json(paused)


class ForkIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    count: int = Field(1, ge=1, le=20, description="how many copies")
    ttl_s: int | None = Field(None, alias="sessionTTLInSeconds", ge=1, description="theirs (default: the source's)")


@router.post(
    "/functions/{name}/sessions/{session_id}/fork",
    status_code=201,
    tags=["sessions"],
    summary="Copies of a running session with its memory, processes and files",
)
async def fork_session(
    name: str, session_id: str, request: Request, tenant: Caller, body: ForkIn | None = None
) -> dict:
    """Each copy is a new session (its own id, token, uids, network, files) started from one
    checkpoint of the source, which runs on; one result per copy: a session or an error."""
    body = body or ForkIn()
    session = await _active_session(request, tenant, name, session_id)
    forks = await control_plane(request).sessions.fork(tenant, session, body.count, ttl_s=body.ttl_s)
    return {
        "sessions": [
            session_json(fork)
            if isinstance(fork, SessionRecord)
            else {"error": {"code": fork.code, "message": fork.message, "status": fork.http_status}}
            for fork in forks
        ]
    }


@router.post("/functions/{name}/sessions/{session_id}/resume", tags=["sessions"], summary="Resume a paused session")
async def resume_session(name: str, session_id: str, request: Request, tenant: Caller) -> dict:
    session = await _active_session(request, tenant, name, session_id)
    sessions = control_plane(request).sessions
    woken, _ = await sessions.wake(session, ttl_s=session.ttl_s if session.paused else None)
    return session_json(woken)


async def _active_session(request: Request, tenant: Tenant, name: str, session_id: str) -> SessionRecord:
    session = await _session(request, tenant, name, session_id)
    if not session.active:
        raise NotFound(f"session {session_id} has already ended")
    return session


@router.delete(
    "/functions/{name}/sessions/{session_id}", status_code=204, tags=["sessions"], summary="End a session now"
)
async def delete_session(name: str, session_id: str, request: Request, tenant: Caller) -> Response:
    session = await _active_session(request, tenant, name, session_id)
    await control_plane(request).sessions.end(session, EndReason.DELETED)
    return Response(status_code=204)
