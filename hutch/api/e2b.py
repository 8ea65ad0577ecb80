"""E2B's control-plane API (`/sandboxes`, `/v2/sandboxes`, ...): an E2B sandbox is a hutch session.

What this module owns: the translation between E2B's REST resources and `SessionManager`.
A sandbox is a session of the function its `templateID` names, with affinity `E2B`, an envd
access token and no idle timeout; it shows up in `/v1/sessions` like any other session and
ends the same ways (kill = delete, timeout = TTL). Field names, formats and status codes are
the ones the official SDKs parse (`e2b/api/client/models/*.py`, SDK 2.31 to 2.63); errors get
E2B's `{"code": <status>, "message"}` shape from `hutch.api.app`.

Decisions (README "Use" says the same to users):
- Token: every sandbox gets an envd access token, returned by create, connect and get; the
  gateway requires it as `X-Access-Token`. `secure: false` is accepted (SDKs before 2.51 send
  `secure`) but changes nothing: the SDKs send whatever token they are given.
- Timeout: an absolute deadline, `now + timeout` seconds (1 to 86400; default 300). `POST
  /sandboxes/{id}/timeout` sets it, shorter or longer; connect only ever extends it.
- Internet: as E2B, `allow_internet_access` (default true) and `network.allowOut`/`denyOut`
  make the sandbox's egress policy, enforced by hutch's egress proxy; `PUT .../network`
  replaces the allow and deny lists at once. A sandbox of a template without a network that
  asks for no egress at all gets loopback only (then it cannot be given a network later).
- Pause (`hutch.scheduler.sleep`): `POST .../pause` hibernates the sandbox to disk where the
  host can (CRIU), else freezes it (processes and memory kept either way; `memory: false` keeps
  only its files), `connect` resumes it (201; 200 when it ran),
  `autoPause` pauses it at its timeout and `autoResume` lets traffic resume it; traffic to a
  sandbox paused without `autoResume` gets E2B's 502 (not running) until it is resumed.
- Snapshots become templates (`Sandbox.create(snapshotID)`): the sandbox's files as a layer, and
  (the default, `memory` true) a checkpoint of its processes that new sandboxes start from.
  Fork is a memory snapshot of its own (`fork:<id>`, not listed) and `count` sandboxes started
  from it, like the source in all but identity; the snapshot goes once its last fork ends.
- MCP gateways and volume mounts are refused (400).
"""

from __future__ import annotations

import base64
import secrets
import time
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hutch.agent.config import ENVD_VERSION
from hutch.api.auth import caller
from hutch.api.deps import control_plane
from hutch.api.idempotency import create_once, request_hash
from hutch.api.native import iso
from hutch.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from hutch.functions import BUILTIN_FUNCTIONS, FunctionSpec, NetworkSpec
from hutch.metadb.records import EndReason, FunctionRecord, SessionRecord, Tenant
from hutch.scheduler.sessions import MAX_E2B_TIMEOUT_S
from hutch.templates.model import DEFAULT_TAG, check_name, split_ref

router = APIRouter(tags=["e2b"])
Caller = Annotated[Tenant, Depends(caller)]

AFFINITY = "E2B"
CLIENT_ID = "hutch"
DEFAULT_TIMEOUT_S = 300
MAX_FORKS = 20  # E2B's bound on `count`


# -- request bodies ----------------------------------------------------------------------------


MASK_PATTERN = r"^[A-Za-z0-9._:\-]*(\$\{PORT\}[A-Za-z0-9._:\-]*)*$"


class NetworkBody(BaseModel):
    """E2B's `SandboxNetworkConfig` / `SandboxNetworkUpdateConfig`: the parts hutch enforces."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    allow_out: list[str] = Field(default_factory=list, alias="allowOut", max_length=256)
    deny_out: list[str] = Field(default_factory=list, alias="denyOut", max_length=256)
    allow_public_traffic: bool | None = Field(None, alias="allowPublicTraffic", description="false: a traffic token")
    mask_request_host: str | None = Field(
        None, alias="maskRequestHost", max_length=253, pattern=MASK_PATTERN, description="the Host user servers see"
    )


class NewSandbox(BaseModel):
    """`POST /sandboxes` and `/v2/sandboxes`. Fields hutch does not use are allowed and ignored."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    template_id: str = Field(alias="templateID", min_length=1, max_length=256)
    timeout: int = Field(DEFAULT_TIMEOUT_S, ge=1, le=MAX_E2B_TIMEOUT_S, description="seconds from now")
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(None, alias="envVars")
    auto_pause: bool | None = Field(None, alias="autoPause", description="pause at the timeout instead of ending")
    auto_pause_memory: bool | None = Field(None, alias="autoPauseMemory", description="false: a filesystem-only pause")
    auto_resume: dict[str, Any] | None = Field(None, alias="autoResume", description="{enabled}: traffic resumes it")
    secure: bool | None = Field(None, description="accepted; sandboxes are always secured")
    allow_internet_access: bool | None = Field(None, description="egress beyond allowOut (E2B's default: true)")
    network: NetworkBody | None = None
    mcp: dict[str, Any] | None = None
    volume_mounts: list[dict[str, Any]] | None = Field(None, alias="volumeMounts")


class TimeoutBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    timeout: int = Field(ge=1, le=MAX_E2B_TIMEOUT_S, description="seconds from now")


class ConnectBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    timeout: int = Field(DEFAULT_TIMEOUT_S, ge=1, le=MAX_E2B_TIMEOUT_S, description="seconds from now, extend only")


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    memory: bool = Field(True, description="false: keep only the file system (the resume boots it again)")


class ResumeBody(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    timeout: int = Field(DEFAULT_TIMEOUT_S, ge=1, le=MAX_E2B_TIMEOUT_S, description="seconds from now")


class ForkBody(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    timeout: int | None = Field(None, ge=1, le=MAX_E2B_TIMEOUT_S, description="the forks' (default: the source's)")
    count: int = Field(1, ge=1, le=MAX_FORKS, description="how many forks")


class SnapshotBody(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = Field(None, max_length=128, description="the snapshot's template name (default: generated)")
    memory: bool | None = Field(None, description="false: the files only (the one kind hutch takes)")


class RefreshBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    duration: int = Field(60, ge=1, le=3600, description="seconds from now, extend only")


# -- rendering ---------------------------------------------------------------------------------


def _domain(request: Request) -> str | None:
    return control_plane(request).config.public_domain()


def sandbox_json(request: Request, session: SessionRecord) -> dict:
    """E2B's `Sandbox` (create and connect answers)."""
    return {
        "templateID": session.function,
        "alias": session.function,
        "sandboxID": session.session_id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": session.access_token,
        "trafficAccessToken": (session.traffic or {}).get("token"),
        "domain": _domain(request),
    }


async def _disk_mb(request: Request, session: SessionRecord) -> int:
    try:
        _, spec = await control_plane(request).sessions.function(session.tenant_id, session.function)
    except NotFound:  # deleted under the session, which is ending
        return 0
    return spec.resources.disk_mb


async def listed_json(request: Request, session: SessionRecord) -> dict:
    """E2B's `ListedSandbox`."""
    return {
        "templateID": session.function,
        "alias": session.function,
        "sandboxID": session.session_id,
        "clientID": CLIENT_ID,
        "startedAt": iso(session.created_at),
        "endAt": iso(session.expires_at),
        "cpuCount": max(1, round(session.cpu)),
        "memoryMB": session.memory_mb,
        "diskSizeMB": await _disk_mb(request, session),
        "state": _state(session),
        "envdVersion": ENVD_VERSION,
        "metadata": session.metadata,
    }


async def detail_json(request: Request, session: SessionRecord) -> dict:
    """E2B's `SandboxDetail`."""
    return {
        **await listed_json(request, session),
        "envdAccessToken": session.access_token,
        "domain": _domain(request),
        **_network_fields(request, session),
        "lifecycle": _lifecycle_json(session),
    }


def _state(session: SessionRecord) -> str:
    return "paused" if session.paused else "running"


def _lifecycle_json(session: SessionRecord) -> dict:
    lifecycle = session.lifecycle or {}
    return {"autoResume": bool(lifecycle.get("auto_resume")), "onTimeout": lifecycle.get("on_timeout", "kill")}


def _lifecycle(body: NewSandbox) -> dict | None:
    """The sandbox's lifecycle (`SessionRecord.lifecycle`) from E2B's create fields; None: kill."""
    auto_resume = bool((body.auto_resume or {}).get("enabled"))
    if not body.auto_pause:
        if auto_resume:
            raise InvalidArgument("autoResume needs autoPause (lifecycle on_timeout 'pause')")
        return None
    memory = body.auto_pause_memory is not False
    if auto_resume and not memory:
        raise InvalidArgument("autoResume cannot resume a filesystem-only pause (autoPauseMemory false)")
    return {"on_timeout": "pause", "auto_resume": auto_resume, "memory": memory}


def _network_fields(request: Request, session: SessionRecord) -> dict:
    policy = session.network
    traffic = session.traffic or {}
    network: dict[str, Any] = {"allowPublicTraffic": not traffic.get("token")}
    if traffic.get("mask"):
        network["maskRequestHost"] = traffic["mask"]
    if policy is None:
        return {"allowInternetAccess": False, "network": network}
    return {
        "allowInternetAccess": policy["internet"],
        "network": {"allowOut": policy["allow"], "denyOut": policy["deny"], **network},
    }


def _traffic(body: NewSandbox) -> dict | None:
    """The sandbox's rules for host-named traffic (`SessionRecord.traffic`), None when open."""
    network = body.network
    if network is None:
        return None
    traffic: dict[str, str] = {}
    if network.allow_public_traffic is False:
        traffic["token"] = secrets.token_urlsafe(24)
    if network.mask_request_host:
        traffic["mask"] = network.mask_request_host
    return traffic or None


def _policy(body: NewSandbox, template_has_network: bool) -> dict | None:
    """The sandbox's egress policy from E2B's create fields (None: loopback only)."""
    internet = body.allow_internet_access if body.allow_internet_access is not None else True
    allow = list(body.network.allow_out) if body.network else []
    deny = list(body.network.deny_out) if body.network else []
    if not template_has_network and not internet and not allow:
        return None
    return _checked({"internet": internet, "allow": allow, "deny": deny})


def _checked(policy: dict) -> dict:
    """The policy, or a 400 naming what is wrong with it."""
    try:
        NetworkSpec(allow_internet_access=policy["internet"], allow_out=policy["allow"], deny_out=policy["deny"])
    except ValidationError as exc:
        raise InvalidArgument(f"invalid network: {exc.errors()[0]['msg']}") from None
    return policy


# -- lookups -----------------------------------------------------------------------------------


async def _sandbox(request: Request, tenant: Tenant, sandbox_id: str) -> SessionRecord:
    """The caller's running sandbox; 404 for unknown, ended or another tenant's."""
    session = await control_plane(request).sessions.find_by_public_id(sandbox_id)
    if session is None or session.tenant_id != tenant.tenant_id or session.affinity != AFFINITY:
        raise NotFound(f"sandbox {sandbox_id} not found")
    return session


async def _tenant_sandboxes(request: Request, tenant: Tenant) -> list[SessionRecord]:
    return [
        s
        for s in await control_plane(request).sessions.tenant_sessions(tenant.tenant_id)
        if s.affinity == AFFINITY and s.access_token
    ]


def _metadata_filter(value: str | None) -> dict[str, str]:
    """The SDKs send `metadata=urlencode({quote(k): quote(v)})`."""
    if not value:
        return {}
    return {unquote(k): unquote(v) for k, v in parse_qsl(value, keep_blank_values=True)}


def _matches(session: SessionRecord, metadata: dict[str, str]) -> bool:
    return all(session.metadata.get(k) == v for k, v in metadata.items())


# -- create ------------------------------------------------------------------------------------


def _refuse_unavailable(body: NewSandbox) -> None:
    if body.mcp:
        raise InvalidArgument("MCP gateway sandboxes are not available in hutch")
    if body.volume_mounts:
        raise InvalidArgument("volume mounts are not available in hutch")


async def _function_of_template(request: Request, tenant: Tenant, name: str) -> FunctionSpec:
    """A template with no function of its name: the tenant gets one, like the built-in `base`
    but booting that template (E2B's `Sandbox.create(template)` names templates)."""
    plane = control_plane(request)
    templates = plane.templates
    try:
        exists = templates is not None and templates.store.exists(name)
    except InvalidArgument:
        exists = False
    if not exists:
        raise NotFound(f"template {name!r} not found")
    base = next(spec for spec in BUILTIN_FUNCTIONS if spec.name == "base")
    spec = base.model_copy(
        update={"name": name, "template": name, "warm_pool_size": 0, "description": f"sandboxes of template {name}"}
    )
    now = time.time()
    await plane.metadb.put_function(FunctionRecord(tenant.tenant_id, name, spec.wire(), now, now))
    plane.sessions.function_changed(tenant.tenant_id, spec, name)
    return spec


async def _create(request: Request, tenant: Tenant, body: NewSandbox) -> SessionRecord:
    _refuse_unavailable(body)
    # `name:tag` boots the build that tag names (a snapshot's id is `name:default`).
    try:
        name, tag = split_ref(body.template_id.lower())
    except InvalidArgument:
        raise NotFound(f"template {body.template_id!r} not found") from None
    body = body.model_copy(update={"template_id": name if tag == DEFAULT_TAG else f"{name}:{tag}"})
    sessions = control_plane(request).sessions
    try:
        _, spec = await sessions.function(tenant.tenant_id, body.template_id)
    except NotFound:
        spec = await _function_of_template(request, tenant, body.template_id)
    session, _ = await sessions.create(
        tenant,
        body.template_id,
        network=_policy(body, spec.network is not None),
        affinity=AFFINITY,
        ttl_s=body.timeout,
        idle_timeout_s=0,
        env=body.env_vars or {},
        metadata=body.metadata or {},
        with_token=True,
        traffic=_traffic(body),
        lifecycle=_lifecycle(body),
    )
    return session


@router.post("/sandboxes", status_code=201, summary="Create a sandbox (E2B SDK < 2.51)")
@router.post("/v2/sandboxes", status_code=201, summary="Create a sandbox")
async def create_sandbox(
    body: NewSandbox,
    request: Request,
    tenant: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> dict:
    """A retry with the same `Idempotency-Key` gets the first create's sandbox (`hutch.api.idempotency`)."""
    fingerprint = request_hash("e2b:create", body.model_dump(mode="json", by_alias=True))
    metadb = control_plane(request).metadb
    session = await create_once(
        metadb, tenant.tenant_id, idempotency_key, fingerprint, lambda: _create(request, tenant, body)
    )
    return sandbox_json(request, session)


# -- read --------------------------------------------------------------------------------------


@router.get("/sandboxes/{sandbox_id}", summary="A running sandbox")
async def get_sandbox(sandbox_id: str, request: Request, tenant: Caller) -> dict:
    return await detail_json(request, await _sandbox(request, tenant, sandbox_id))


@router.get("/sandboxes", summary="Running sandboxes (E2B SDK 1.x)")
async def list_sandboxes_v1(request: Request, tenant: Caller, metadata: str | None = None) -> list[dict]:
    wanted = _metadata_filter(metadata)
    found = sorted(await _tenant_sandboxes(request, tenant), key=_key, reverse=True)
    return [await listed_json(request, s) for s in found if _matches(s, wanted)]


def _key(session: SessionRecord) -> tuple[float, str]:
    return session.created_at, session.row_id


def _page_token(session: SessionRecord) -> str:
    return base64.urlsafe_b64encode(f"{session.created_at!r}|{session.row_id}".encode()).decode()


def _parse_page_token(token: str) -> tuple[float, str]:
    try:
        created, row_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(created), row_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("invalid nextToken") from None


def _states(value: str | None) -> set[str]:
    states = {s.strip() for s in (value or "running,paused").split(",") if s.strip()}
    unknown = states - {"running", "paused"}
    if unknown:
        raise InvalidArgument(f"invalid state {sorted(unknown)}: running or paused")
    return states


@router.get("/v2/sandboxes", summary="The caller's sandboxes, paginated (X-Next-Token)")
async def list_sandboxes(
    request: Request,
    response: Response,
    tenant: Caller,
    metadata: str | None = None,
    state: str | None = None,
    template: str | None = None,
    started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
    order: Literal["asc", "desc"] = "desc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> list[dict]:
    states = _states(state)
    wanted = _metadata_filter(metadata)
    after = started_after.timestamp() if started_after else None
    found = [
        s
        for s in await _tenant_sandboxes(request, tenant)
        if _state(s) in states
        and _matches(s, wanted)
        and (template is None or s.function == template)
        and (after is None or s.created_at >= after)
    ]
    descending = order == "desc"
    found.sort(key=_key, reverse=descending)
    if next_token:
        mark = _parse_page_token(next_token)
        found = [s for s in found if (_key(s) < mark if descending else _key(s) > mark)]
    page = found[:limit]
    if len(found) > limit:
        response.headers["X-Next-Token"] = _page_token(page[-1])
    return [await listed_json(request, s) for s in page]


# -- change ------------------------------------------------------------------------------------


@router.delete("/sandboxes/{sandbox_id}", status_code=204, summary="Kill a sandbox")
async def kill_sandbox(sandbox_id: str, request: Request, tenant: Caller) -> Response:
    session = await _sandbox(request, tenant, sandbox_id)
    if await control_plane(request).sessions.end(session, EndReason.DELETED) is None:
        raise NotFound(f"sandbox {sandbox_id} not found")
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204, summary="End the sandbox `timeout` s from now")
async def set_timeout(sandbox_id: str, body: TimeoutBody, request: Request, tenant: Caller) -> Response:
    session = await _sandbox(request, tenant, sandbox_id)
    await control_plane(request).sessions.renew(session, ttl_s=body.timeout)
    return Response(status_code=204)


async def _extend(request: Request, session: SessionRecord, seconds: int) -> SessionRecord:
    """Connect and refresh never shorten a sandbox's life."""
    if time.time() + seconds <= session.expires_at:
        return session
    return await control_plane(request).sessions.renew(session, ttl_s=seconds)


@router.post("/sandboxes/{sandbox_id}/connect", summary="Connect to a sandbox (E2B SDK < 2.51)")
@router.post(
    "/v2/sandboxes/{sandbox_id}/connect",
    summary="Connect to a sandbox: 200 running (its timeout extended), 201 resumed from a pause",
)
async def connect_sandbox(
    sandbox_id: str, request: Request, response: Response, tenant: Caller, body: ConnectBody | None = None
) -> dict:
    session = await _sandbox(request, tenant, sandbox_id)
    timeout = (body or ConnectBody()).timeout
    if session.sleep is not None:
        session, resumed = await control_plane(request).sessions.wake(session, ttl_s=timeout)
        if resumed:
            response.status_code = 201
            return sandbox_json(request, session)
    session = await _extend(request, session, timeout)
    return sandbox_json(request, session)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204, summary="Keep a sandbox alive (extend only)")
async def refresh_sandbox(
    sandbox_id: str, request: Request, tenant: Caller, body: RefreshBody | None = None
) -> Response:
    await _extend(request, await _sandbox(request, tenant, sandbox_id), (body or RefreshBody()).duration)
    return Response(status_code=204)


@router.put("/sandboxes/{sandbox_id}/network", status_code=204, summary="Replace the sandbox's egress rules")
async def update_network(sandbox_id: str, body: NetworkBody, request: Request, tenant: Caller) -> Response:
    session = await _sandbox(request, tenant, sandbox_id)
    internet = session.network["internet"] if session.network is not None else False
    policy = _checked({"internet": internet, "allow": list(body.allow_out), "deny": list(body.deny_out)})
    await control_plane(request).sessions.set_network(session, policy)
    return Response(status_code=204)


@router.post(
    "/sandboxes/{sandbox_id}/pause",
    status_code=204,
    summary="Pause a sandbox: frozen with its memory, or (memory false) only its files kept; 409 if paused",
)
async def pause_sandbox(sandbox_id: str, request: Request, tenant: Caller, body: PauseBody | None = None) -> Response:
    session = await _sandbox(request, tenant, sandbox_id)
    if session.paused:
        raise AlreadyExists(f"sandbox {sandbox_id} is already paused")
    memory = (body or PauseBody()).memory
    _, paused = await control_plane(request).sessions.sleep(session, paused=True, memory=memory)
    if not paused:
        raise AlreadyExists(f"sandbox {sandbox_id} is already paused")
    return Response(status_code=204)


@router.post(
    "/sandboxes/{sandbox_id}/resume", status_code=201, summary="Resume a paused sandbox (E2B SDK < 2); 409 if running"
)
async def resume_sandbox(sandbox_id: str, request: Request, tenant: Caller, body: ResumeBody | None = None) -> dict:
    session = await _sandbox(request, tenant, sandbox_id)
    if not session.paused:
        raise AlreadyExists(f"sandbox {sandbox_id} is already running")
    session, _ = await control_plane(request).sessions.wake(session, ttl_s=(body or ResumeBody()).timeout)
    return sandbox_json(request, session)


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, summary="A template of the sandbox's files")
async def create_snapshot(sandbox_id: str, request: Request, tenant: Caller, body: SnapshotBody | None = None) -> dict:
    """E2B's filesystem snapshot (`create_snapshot(mode="filesystem")`): the sandbox is frozen a
    moment while its files are copied into a template of their own; `Sandbox.create(snapshotID)`
    boots new sandboxes from it. Memory snapshots (the default) need hibernation: 501."""
    body = body or SnapshotBody()
    session = await _sandbox(request, tenant, sandbox_id)
    name = check_name(body.name.split(":", 1)[0].lower()) if body.name else f"snap-{secrets.token_hex(6)}"
    await control_plane(request).sessions.snapshot(tenant, session, name, memory=body.memory is not False)
    return {"snapshotID": f"{name}:default", "names": [f"{name}:default"]}


@router.get("/snapshots", summary="The caller's snapshots (templates made of a sandbox's files)")
async def list_snapshots(
    request: Request,
    response: Response,
    tenant: Caller,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID")] = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> list[dict]:
    templates = control_plane(request).templates
    found = sorted(
        (
            t
            for t in (templates.templates() if templates is not None else [])
            if t.owner == tenant.tenant_id
            and t.source.startswith("snapshot:")
            and (sandbox_id is None or t.source == f"snapshot:{sandbox_id}")
            and (name is None or t.name == name.split(":", 1)[0])
        ),
        key=lambda t: t.name,
    )
    if next_token:
        found = [t for t in found if t.name > next_token]
    page = found[:limit]
    if len(found) > limit:
        response.headers["X-Next-Token"] = page[-1].name
    return [{"snapshotID": f"{t.name}:default", "names": [f"{t.name}:default"]} for t in page]


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, summary="Copies of a sandbox, memory included")
async def fork_sandbox(sandbox_id: str, request: Request, tenant: Caller, body: ForkBody | None = None) -> list[dict]:
    """E2B's fork: the sandbox is checkpointed once (frozen a moment; it runs on) and `count`
    sandboxes start from that checkpoint, each with its own id, token, uids, network and copy
    of the files. One result per fork, a sandbox or the error that fork met."""
    body = body or ForkBody()
    source = await _sandbox(request, tenant, sandbox_id)
    forks = await control_plane(request).sessions.fork(tenant, source, body.count, ttl_s=body.timeout)
    return [
        {"sandbox": sandbox_json(request, fork)}
        if isinstance(fork, SessionRecord)
        else {"error": {"code": fork.http_status, "message": fork.message}}
        for fork in forks
    ]


@router.api_route(
    "/sandboxes/{sandbox_id}/{action:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
@router.api_route(
    "/v2/sandboxes/{sandbox_id}/{action:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
async def unavailable(sandbox_id: str, action: str, tenant: Caller) -> Response:
    """E2B features hutch does not offer (snapshots, fork): 501, not a misleading 404."""
    raise Unimplemented(f"the sandbox {action} API is not available in hutch")
