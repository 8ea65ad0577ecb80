"""What hutch measured: the usage API (`/v1/usage...`), its CSV export, and `GET /metrics`.

- `GET /v1/usage`: the caller's totals and cost over `[from, to)`, per function too.
- `GET /v1/usage/series`: the same amounts per `step` seconds (the web page's chart).
- `GET /v1/usage/sessions`: session records (live ones as of now, ended ones as kept) whose
  lifetime overlaps the range; `format=csv` exports them all as CSV.
- `GET /v1/functions/{name}/sessions/{sessionId}/usage`: one session's record.
- `GET /v1/usage/tenants`: every tenant's totals (admin).
- `GET /metrics`: Prometheus text (an admin key, unless `metrics_public`).

Times are unix seconds or ISO 8601 (UTC when no zone is given). Ranges resolve to whole buckets
(`[metering] bucket_seconds`, 60 by default): the buckets starting in `[from, to)`; totals
include the live sessions' usage up to now (written or not). A session record always covers
the session's whole life, whatever the range. Costs follow `hutch.pricing` (the formula there).
"""

from __future__ import annotations

import csv
import io
import math
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from hutch.api.auth import api_key_of, caller
from hutch.api.deps import ControlPlane, control_plane
from hutch.api.native import iso
from hutch.errors import InvalidArgument
from hutch.metadb.records import SessionUsage, Tenant, UsageAmounts
from hutch.pricing import Pricing, cost

router = APIRouter()
Caller = Annotated[Tenant, Depends(caller)]
GIB = float(1 << 30)
MAX_POINTS = 2000
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: times (and steps) beyond any calendar are refused
CSV_COLUMNS = [
    "sessionId",
    "functionName",
    "sessionStatus",
    "state",
    "startTime",
    "endTime",
    "endReason",
    "vcpu",
    "memoryMB",
    "activeSeconds",
    "idleSeconds",
    "downSeconds",
    "cpuSeconds",
    "memoryGiBSeconds",
    "memoryAverageBytes",
    "memoryPeakBytes",
    "diskPeakBytes",
    "diskGiBSeconds",
    "costCpu",
    "costMemory",
    "costDisk",
    "costTotal",
    "currency",
]


def parse_time(value: str | None, default: float) -> float:
    """Unix seconds or ISO 8601 (UTC unless it says otherwise); `default` when absent."""
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidArgument(f"invalid time {value!r}: give unix seconds or ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp()
    # Not a number, infinite, or out of any calendar: MetaDB's integers and datetime cannot hold it.
    if not 0 <= seconds <= MAX_TIME:
        raise InvalidArgument(f"invalid time {value!r}: between 1970 and 9999, please")
    return seconds


def _range(start: str | None, end: str | None, default_span: float | None = None) -> tuple[float, float]:
    now = time.time()
    to = parse_time(end, now)
    since = parse_time(start, to - default_span if default_span else 0.0)
    if since >= to:
        raise InvalidArgument("`from` must be before `to`")
    return since, to


def amounts_json(amounts: UsageAmounts, pricing: Pricing) -> dict:
    price = cost(amounts, pricing)
    return {
        "activeSeconds": round(amounts.active_s, 3),
        "idleSeconds": round(amounts.idle_s, 3),
        "downSeconds": round(amounts.down_s, 3),
        "cpuSeconds": round(amounts.cpu_s, 3),
        "cpuActiveSeconds": round(amounts.cpu_active_s, 3),
        "memoryGiBSeconds": round(amounts.memory_gib_s, 6),
        "vcpuActiveSeconds": round(amounts.vcpu_active_s, 3),
        "vcpuIdleSeconds": round(amounts.vcpu_idle_s, 3),
        "memoryAllocatedActiveGiBSeconds": round(amounts.memory_alloc_active_gib_s, 6),
        "memoryAllocatedIdleGiBSeconds": round(amounts.memory_alloc_idle_gib_s, 6),
        "diskGiBSeconds": round(amounts.disk_gib_s, 6),
        "cost": {
            "cpu": round(price.cpu, 9),
            "memory": round(price.memory, 9),
            "disk": round(price.disk, 9),
            "total": round(price.total, 9),
            "currency": pricing.currency,
        },
    }


def session_usage_json(usage: SessionUsage, state: str, pricing: Pricing) -> dict:
    alive = usage.amounts.active_s + usage.amounts.idle_s
    return {
        "sessionId": usage.session_id,
        "functionName": usage.function,
        "tenantId": usage.tenant_id,
        "sessionStatus": "Active" if usage.active else "Expired",
        "state": state,
        "startTime": iso(usage.started_at),
        "endTime": iso(usage.ended_at),
        "endReason": usage.end_reason,
        "accountedTo": iso(usage.accounted_to),
        "vcpu": usage.vcpu,
        "memoryMB": usage.memory_mb,
        **amounts_json(usage.amounts, pricing),
        "memoryAverageBytes": int(usage.amounts.memory_gib_s * GIB / alive) if alive > 0 else 0,
        "memoryPeakBytes": usage.memory_peak_bytes,
        "memoryBytes": usage.memory_bytes,
        "diskBytes": usage.disk_bytes,
        "diskPeakBytes": usage.disk_peak_bytes,
        "samples": usage.samples,
    }


async def _sums(
    plane: ControlPlane,
    start: float,
    end: float,
    tenant_id: str | None = None,
    function: str | None = None,
    by_tenant: bool = False,
    by_function: bool = False,
    step: float | None = None,
) -> dict[tuple, UsageAmounts]:
    """Bucket sums from MetaDB plus what the meter has not written yet, grouped alike."""
    rows = await plane.metadb.usage_totals(
        start, end, tenant_id=tenant_id, function=function, by_tenant=by_tenant, by_function=by_function, step=step
    )
    sums = {key: amounts for key, amounts in rows}
    for bucket in plane.sessions.meter.unflushed(tenant_id):
        if (function is not None and bucket.function != function) or not start <= bucket.start < end:
            continue
        key = (
            bucket.tenant_id if by_tenant else None,
            bucket.function if by_function else None,
            float(math.floor(bucket.start / step) * step) if step else None,
        )
        sums.setdefault(key, UsageAmounts()).add(bucket.amounts)
    return sums


def _record(plane: ControlPlane, usage: SessionUsage) -> tuple[SessionUsage, str]:
    """A record and its state, the live view for a live session."""
    meter = plane.sessions.meter
    if usage.active:
        live = meter.snapshot(usage.row_id)
        if live is not None:
            return live, meter.state(usage.row_id)
        return usage, "unknown"
    return usage, "ended"


@router.get("/v1/usage", tags=["usage"], summary="The caller's usage and cost over a time range, per function")
async def usage_summary(
    request: Request,
    tenant: Caller,
    start: str | None = Query(None, alias="from", description="unix seconds or ISO 8601 [default: the beginning]"),
    end: str | None = Query(None, alias="to", description="[default: now]"),
    function: str | None = None,
) -> dict:
    plane = control_plane(request)
    pricing = plane.config.pricing
    since, to = _range(start, end)
    sums = await _sums(plane, since, to, tenant.tenant_id, function, by_function=True)
    total = UsageAmounts()
    for amounts in sums.values():
        total.add(amounts)
    live = [
        s
        for s in plane.sessions.active_sessions()
        if s.tenant_id == tenant.tenant_id and (function is None or s.function == function)
    ]
    return {
        "tenantId": tenant.tenant_id,
        "from": iso(since),
        "to": iso(to),
        "liveSessions": len(live),
        "pricing": pricing.wire(),
        "totals": amounts_json(total, pricing),
        "functions": [
            {"functionName": key[1], **amounts_json(amounts, pricing)}
            for key, amounts in sorted(sums.items(), key=lambda item: item[0][1] or "")
        ],
    }


@router.get("/v1/usage/series", tags=["usage"], summary="The caller's usage per time step (for charts)")
async def usage_series(
    request: Request,
    tenant: Caller,
    start: str | None = Query(None, alias="from", description="[default: an hour before `to`]"),
    end: str | None = Query(None, alias="to", description="[default: now]"),
    step: int | None = Query(
        None, ge=1, le=int(MAX_TIME), description="seconds, a multiple of the bucket size [default: one bucket]"
    ),
    function: str | None = None,
) -> dict:
    plane = control_plane(request)
    pricing = plane.config.pricing
    bucket = plane.config.metering.bucket_seconds
    since, to = _range(start, end, default_span=3600)
    step = max(bucket, (step or bucket) // bucket * bucket)
    first = math.floor(since / step) * step
    if (to - first) / step > MAX_POINTS:
        raise InvalidArgument(f"more than {MAX_POINTS} points: choose a larger step or a shorter range")
    sums = await _sums(plane, first, to, tenant.tenant_id, function, step=step)
    points = []
    moment = float(first)
    while moment < to:
        amounts = sums.get((None, None, moment), UsageAmounts())
        points.append({"time": iso(moment), "timestamp": moment, **amounts_json(amounts, pricing)})
        moment += step
    return {"tenantId": tenant.tenant_id, "step": step, "from": iso(first), "to": iso(to), "points": points}


@router.get("/v1/usage/sessions", tags=["usage"], summary="Session usage records (live and ended); CSV export")
async def usage_sessions(
    request: Request,
    tenant: Caller,
    start: str | None = Query(None, alias="from", description="sessions alive at or after this time"),
    end: str | None = Query(None, alias="to", description="sessions started before this time"),
    function: str | None = None,
    status: Literal["Active", "Expired"] | None = None,
    limit: int = Query(100, ge=1, le=1000),
    next_token: str | None = Query(None, alias="nextToken"),
    format: Literal["json", "csv"] = "json",
):
    plane = control_plane(request)
    pricing = plane.config.pricing
    since = parse_time(start, 0.0) if start else None
    to = parse_time(end, 0.0) if end else None
    active = None if status is None else status == "Active"

    async def page(size: int, token: str | None) -> tuple[list[dict], str | None]:
        records, token = await plane.metadb.list_usage(
            tenant.tenant_id, start=since, end=to, function=function, active=active, limit=size, after=token
        )
        return [session_usage_json(*_record(plane, r), pricing) for r in records], token

    if format == "json":
        sessions, token = await page(limit, next_token)
        return {"sessions": sessions, "nextToken": token}
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    token = None
    while True:
        sessions, token = await page(1000, token)
        for row in sessions:
            price = row["cost"]
            writer.writerow(
                {
                    **row,
                    "costCpu": price["cpu"],
                    "costMemory": price["memory"],
                    "costDisk": price["disk"],
                    "costTotal": price["total"],
                    "currency": price["currency"],
                }
            )
        if token is None:
            break
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": 'attachment; filename="hutch-usage.csv"'},
    )


@router.get("/v1/functions/{name}/sessions/{session_id}/usage", tags=["usage"], summary="One session's usage")
async def session_usage(name: str, session_id: str, request: Request, tenant: Caller) -> dict:
    plane = control_plane(request)
    session = await plane.sessions.get(tenant.tenant_id, session_id, name)
    usage = plane.sessions.meter.snapshot(session.row_id) or await plane.metadb.get_usage(session.row_id)
    return session_usage_json(*_record(plane, usage), plane.config.pricing)


@router.get("/v1/usage/tenants", tags=["usage"], summary="Every tenant's usage and cost over a time range (admin)")
async def usage_tenants(
    request: Request,
    tenant: Caller,
    start: str | None = Query(None, alias="from"),
    end: str | None = Query(None, alias="to"),
) -> dict:
    plane = control_plane(request)
    plane.tenants.require_admin(tenant)
    pricing = plane.config.pricing
    since, to = _range(start, end)
    sums = await _sums(plane, since, to, by_tenant=True)
    live: dict[str, int] = {}
    for session in plane.sessions.active_sessions():
        live[session.tenant_id] = live.get(session.tenant_id, 0) + 1
    return {
        "from": iso(since),
        "to": iso(to),
        "tenants": [
            {
                "tenantId": t.tenant_id,
                "name": t.name,
                "liveSessions": live.get(t.tenant_id, 0),
                **amounts_json(sums.get((t.tenant_id, None, None), UsageAmounts()), pricing),
            }
            for t in await plane.metadb.list_tenants()
        ],
    }


@router.get("/metrics", tags=["metrics"], summary="Prometheus metrics (an admin key unless metrics_public)")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    plane = control_plane(request)
    if not plane.config.metrics_public:
        plane.tenants.require_admin(await plane.tenants.authenticate(api_key_of(request.headers)))
    return Response(plane.metrics.render(), media_type=CONTENT_TYPE_LATEST)
