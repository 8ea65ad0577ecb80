"""Sessions' logs (`hutch.scheduler.session_log`: lifecycle events hutch saw), in E2B's shapes.

- `GET /v2/sandboxes/{id}/logs?cursor&limit&direction&level&search`: E2B's `SandboxLogsV2Response`
  (`{"logs": [{timestamp, level, message, fields}]}`). `cursor` is unix milliseconds (from it on,
  forward; up to it, backward, newest first), `level` the lowest level wanted, `search` a
  case-insensitive substring of the message.
- `GET /sandboxes/{id}/logs?start&limit`: the v1 shape (`logs` as `{timestamp, line}` plus
  `logEntries`).
- `GET /v1/functions/{name}/sessions/{sessionId}/logs`: the v2 shape, per native session.
Ended sessions keep their logs (bounded: `hutch.scheduler.session_log`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from hutch.api.auth import caller
from hutch.api.deps import control_plane
from hutch.api.native import iso
from hutch.api.sandbox_metrics import e2b_sandbox
from hutch.metadb.records import LOG_LEVELS, LogEntry, SessionRecord, Tenant

router = APIRouter()
Caller = Annotated[Tenant, Depends(caller)]

E2B_AFFINITY = "E2B"
Level = Literal["debug", "info", "warn", "error"]


def entry_json(entry: LogEntry) -> dict:
    """E2B's `SandboxLogEntry`."""
    return {"timestamp": iso(entry.at), "level": entry.level, "message": entry.message, "fields": entry.fields}


async def _entries(
    request: Request,
    session: SessionRecord,
    cursor_ms: int | None,
    limit: int,
    direction: str,
    level: str | None,
    search: str | None,
) -> list[LogEntry]:
    levels = LOG_LEVELS[LOG_LEVELS.index(level) :] if level else None
    return await control_plane(request).metadb.session_logs(
        session.row_id,
        start=cursor_ms / 1000 if cursor_ms is not None else None,
        limit=limit,
        forward=direction == "forward",
        levels=levels,
        search=search,
    )


Cursor = Annotated[int | None, Query(ge=0, description="unix milliseconds")]
Limit = Annotated[int, Query(ge=0, le=1000)]
Direction = Annotated[Literal["forward", "backward"], Query()]
Search = Annotated[str | None, Query(max_length=256)]


@router.get("/v2/sandboxes/{sandbox_id}/logs", tags=["e2b"], summary="A sandbox's log (lifecycle events)")
async def sandbox_logs(
    sandbox_id: str,
    request: Request,
    tenant: Caller,
    cursor: Cursor = None,
    limit: Limit = 1000,
    direction: Direction = "forward",
    level: Level | None = None,
    search: Search = None,
) -> dict:
    session = await e2b_sandbox(request, tenant, sandbox_id)
    entries = await _entries(request, session, cursor, limit, direction, level, search)
    return {"logs": [entry_json(e) for e in entries]}


@router.get("/sandboxes/{sandbox_id}/logs", tags=["e2b"], summary="A sandbox's log (E2B's v1 shape)")
async def sandbox_logs_v1(
    sandbox_id: str, request: Request, tenant: Caller, start: Cursor = None, limit: Limit = 1000
) -> dict:
    session = await e2b_sandbox(request, tenant, sandbox_id)
    entries = await _entries(request, session, start, limit, "forward", None, None)
    return {
        "logs": [{"timestamp": iso(e.at), "line": e.message} for e in entries],
        "logEntries": [entry_json(e) for e in entries],
    }


@router.get("/v1/functions/{name}/sessions/{session_id}/logs", tags=["sessions"], summary="A session's log")
async def session_logs(
    name: str,
    session_id: str,
    request: Request,
    tenant: Caller,
    cursor: Cursor = None,
    limit: Limit = 1000,
    direction: Direction = "forward",
    level: Level | None = None,
    search: Search = None,
) -> dict:
    session = await control_plane(request).sessions.get(tenant.tenant_id, session_id, name)
    entries = await _entries(request, session, cursor, limit, direction, level, search)
    return {"logs": [entry_json(e) for e in entries]}
