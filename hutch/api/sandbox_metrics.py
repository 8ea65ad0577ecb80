"""Sessions' resource metrics, in E2B's shape (`SandboxMetric`), read from the metric samples the
meter keeps in MetaDB (`hutch.scheduler.metering`: one per sample of the instance, every
`[metering] sample_interval`, kept `metrics_keep_seconds` whether the session lives or not).

- `GET /sandboxes/{id}/metrics?start&end` (unix seconds; default: the sandbox's whole life) and
  `GET /sandboxes/metrics?sandbox_ids=a,b` (each sandbox's newest sample) for the E2B SDKs
  (`Sandbox.get_metrics`); ended sandboxes keep theirs.
- `GET /v1/functions/{name}/sessions/{sessionId}/metrics?start&end`: the same, per native session.

Fields: `cpuCount` is the session's vCPUs, `cpuUsedPct` the share of them used since the previous
sample, `memUsed` the instance's cgroup memory (page cache included), `memTotal` its limit,
`diskUsed` the workspace's bytes, `diskTotal` the function's `diskMB`. `memCache` is 0: the
cgroup's page cache is not read apart.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from hutch.api.auth import caller
from hutch.api.deps import control_plane
from hutch.api.native import iso
from hutch.errors import InvalidArgument, NotFound
from hutch.metadb.records import MetricSample, SessionRecord, Tenant

router = APIRouter()
Caller = Annotated[Tenant, Depends(caller)]

MIB = 1 << 20
MAX_SANDBOX_IDS = 100  # E2B's limit on `sandbox_ids`
E2B_AFFINITY = "E2B"


def metric_json(sample: MetricSample, session: SessionRecord, disk_mb: int) -> dict[str, Any]:
    """E2B's `SandboxMetric`."""
    return {
        "timestamp": iso(sample.at),
        "timestampUnix": int(sample.at),
        "cpuCount": max(1, round(session.cpu)),
        "cpuUsedPct": sample.cpu_used_pct,
        "memUsed": sample.memory_bytes,
        "memTotal": session.memory_mb * MIB,
        "memCache": 0,
        "diskUsed": sample.disk_bytes,
        "diskTotal": disk_mb * MIB,
    }


async def _disk_mb(request: Request, session: SessionRecord) -> int:
    try:
        _, spec = await control_plane(request).sessions.function(session.tenant_id, session.function)
    except NotFound:  # the function was deleted since
        return 0
    return spec.resources.disk_mb


async def _series(request: Request, session: SessionRecord, start: int | None, end: int | None) -> list[dict]:
    if start is not None and end is not None and start > end:
        raise InvalidArgument("start must not be after end")
    # Whole unix seconds, as the SDKs send them: `end` takes in the second it names (a sample at
    # 12.9 is "at 12"), and the default start never passes it (a sandbox made at 12.5, asked up
    # to 12).
    until = float(end) + 0.999999 if end is not None else time.time()
    since = float(start) if start is not None else min(session.created_at, until)
    samples = await control_plane(request).metadb.metric_samples(session.row_id, since, until)
    disk_mb = await _disk_mb(request, session)
    return [metric_json(sample, session, disk_mb) for sample in samples]


async def e2b_sandbox(request: Request, tenant: Tenant, sandbox_id: str) -> SessionRecord:
    """The caller's E2B sandbox, running or ended (its samples and logs outlive it); 404 for any other."""
    try:
        session = await control_plane(request).sessions.get(tenant.tenant_id, sandbox_id)
    except NotFound:
        session = None
    if session is None or session.affinity != E2B_AFFINITY:
        raise NotFound(f"sandbox {sandbox_id} not found")
    return session


Unix = Annotated[int | None, Query(ge=0, description="unix seconds")]


# Declared before `GET /sandboxes/{sandbox_id}` (hutch.api.app includes this router first).
@router.get("/sandboxes/metrics", tags=["e2b"], summary="The newest metrics of each of these sandboxes")
async def sandboxes_metrics(
    request: Request,
    tenant: Caller,
    sandbox_ids: Annotated[str, Query(min_length=1, description="comma-separated sandbox ids")],
) -> dict:
    ids = list(dict.fromkeys(i.strip() for i in sandbox_ids.split(",") if i.strip()))
    if not ids or len(ids) > MAX_SANDBOX_IDS:
        raise InvalidArgument(f"sandbox_ids: 1 to {MAX_SANDBOX_IDS} ids")
    sessions: dict[str, SessionRecord] = {}
    for sandbox_id in ids:
        try:
            sessions[sandbox_id] = await e2b_sandbox(request, tenant, sandbox_id)
        except NotFound:
            continue  # as E2B: unknown ids are left out
    latest = await control_plane(request).metadb.latest_metric_samples([s.row_id for s in sessions.values()])
    found = {}
    for sandbox_id, session in sessions.items():
        sample = latest.get(session.row_id)
        if sample is not None:
            found[sandbox_id] = metric_json(sample, session, await _disk_mb(request, session))
    return {"sandboxes": found}


@router.get("/sandboxes/{sandbox_id}/metrics", tags=["e2b"], summary="A sandbox's metrics over time")
async def sandbox_metrics(
    sandbox_id: str, request: Request, tenant: Caller, start: Unix = None, end: Unix = None
) -> list[dict]:
    return await _series(request, await e2b_sandbox(request, tenant, sandbox_id), start, end)


@router.get("/v1/functions/{name}/sessions/{session_id}/metrics", tags=["sessions"], summary="A session's metrics")
async def session_metrics(
    name: str, session_id: str, request: Request, tenant: Caller, start: Unix = None, end: Unix = None
) -> dict:
    session = await control_plane(request).sessions.get(tenant.tenant_id, session_id, name)
    return {"metrics": await _series(request, session, start, end)}
