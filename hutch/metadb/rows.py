"""What the SQL backends of MetaDB share: how records map to rows, page tokens, the quota rule.

A row is a plain mapping of column to value; each backend adapts its driver's types at the edge
(SQLite stores booleans as 0/1, PostgreSQL as BOOLEAN; both store JSON as text).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from typing import Any

from hutch.errors import InvalidArgument, QuotaExceeded
from hutch.metadb.records import (
    USAGE_AMOUNT_FIELDS,
    FunctionRecord,
    InstanceRecord,
    InstanceRole,
    LogEntry,
    SchedulerRecord,
    SessionRecord,
    SessionStatus,
    SessionUsage,
    Tenant,
    UsageAmounts,
)

SESSION_COLUMNS = [f.name for f in fields(SessionRecord)]
SESSION_JSON_COLUMNS = {"metadata", "env", "network", "traffic", "sleep", "lifecycle"}
SESSION_BOOL_COLUMNS = {"disable_reuse", "persist_workspace"}
USAGE_COLUMNS = [f for f in SessionUsage.__dataclass_fields__ if f != "amounts"] + list(USAGE_AMOUNT_FIELDS)
TENANT_COLUMNS = [f.name for f in fields(Tenant)]
TENANT_CHANGEABLE = {"name", "max_sessions", "is_admin", "max_vcpu", "max_memory_mb", "max_image_disk_mb"}


def session_from_row(row: Mapping[str, Any]) -> SessionRecord:
    values = dict(row)
    for name in SESSION_JSON_COLUMNS:
        values[name] = json.loads(values[name]) if values[name] is not None else None
    for name in SESSION_BOOL_COLUMNS:
        values[name] = bool(values[name])
    values["status"] = SessionStatus(values["status"])
    return SessionRecord(**values)


def session_values(record: SessionRecord, bools_as_int: bool) -> dict[str, Any]:
    values = asdict(record)
    for name in SESSION_JSON_COLUMNS:
        values[name] = json.dumps(values[name])
    if bools_as_int:
        for name in SESSION_BOOL_COLUMNS:
            values[name] = int(values[name])
    values["status"] = record.status.value
    return values


def check_session_changes(changes: Mapping[str, Any]) -> None:
    unknown = set(changes) - set(SESSION_COLUMNS) | ({"row_id"} & set(changes))
    if unknown:
        raise InvalidArgument(f"unknown session fields {sorted(unknown)}")


def check_tenant_changes(changes: Mapping[str, Any]) -> None:
    if not changes or not set(changes) <= TENANT_CHANGEABLE:
        raise InvalidArgument(f"can only change {sorted(TENANT_CHANGEABLE)}")


def log_filter(
    row_id: str, start: float | None, forward: bool, levels: tuple[str, ...] | None, search: str | None, mark: str
) -> tuple[str, list[Any]]:
    """The WHERE clause and its arguments of a session's log query; `mark` is "?" (SQLite) or "$" (PostgreSQL)."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return "?" if mark == "?" else f"${len(args)}"

    where = [f"row_id = {arg(row_id)}"]
    if start is not None:
        where.append(f"at {'>=' if forward else '<='} {arg(float(start))}")
    if levels is not None:
        where.append(f"level IN ({', '.join(arg(level) for level in levels)})")
    if search:
        escaped = search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(f"LOWER(message) LIKE {arg('%' + escaped + '%')} ESCAPE '\\'")
    return " AND ".join(where), args


def log_from_row(row: Mapping[str, Any]) -> LogEntry:
    return LogEntry(row["row_id"], row["at"], row["level"], row["message"], json.loads(row["fields"]))


def idempotency_claim_abandoned(row: Mapping[str, Any], now: float, abandoned_s: float) -> bool:
    """A claim whose create never settled (its process died half-way) and may be taken over."""
    return row["session_row_id"] is None and row["created_at"] < now - abandoned_s


def tenant_from_row(row: Mapping[str, Any]) -> Tenant:
    values = dict(row)
    values["is_admin"] = bool(values["is_admin"])
    return Tenant(**values)


def function_from_row(row: Mapping[str, Any]) -> FunctionRecord:
    values = dict(row)
    values["spec"] = json.loads(values["spec"])
    return FunctionRecord(**values)


def instance_from_row(row: Mapping[str, Any]) -> InstanceRecord:
    values = dict(row)
    values["role"] = InstanceRole(values["role"])
    return InstanceRecord(**values)


def scheduler_from_row(row: Mapping[str, Any]) -> SchedulerRecord:
    values = dict(row)
    values["capacity"] = json.loads(values["capacity"])
    return SchedulerRecord(**values)


def usage_from_row(row: Mapping[str, Any]) -> SessionUsage:
    values = dict(row)
    amounts = UsageAmounts(**{name: values.pop(name) for name in USAGE_AMOUNT_FIELDS})
    return SessionUsage(**values, amounts=amounts)


def usage_values(record: SessionUsage) -> dict[str, Any]:
    values = {name: getattr(record, name) for name in USAGE_COLUMNS if name not in USAGE_AMOUNT_FIELDS}
    values.update({name: getattr(record.amounts, name) for name in USAGE_AMOUNT_FIELDS})
    return values


def page_token(time: float, row_id: str) -> str:
    """An opaque cursor after the row (time, row id) of a newest-first listing."""
    return base64.urlsafe_b64encode(f"{time!r}|{row_id}".encode()).decode()


def cut_page(records: list[Any], limit: int, time_of: Callable[[Any], float]) -> tuple[list[Any], str | None]:
    """A page read with `LIMIT limit + 1`: its first `limit` records, and the token of the next
    page when the extra record came back (`time_of`: the listing's time field of a record)."""
    if len(records) <= limit:
        return records, None
    last = records[limit - 1]
    return records[:limit], page_token(time_of(last), last.row_id)


def parse_page_token(token: str) -> tuple[float, str]:
    try:
        time, row_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return float(time), row_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("invalid page token") from None


def check_quota(
    record: SessionRecord,
    count: int,
    vcpu: float,
    memory_mb: int,
    max_active: int | None,
    max_vcpu: float | None,
    max_memory_mb: int | None,
) -> None:
    """`QuotaExceeded` naming every quota the new session would break (its live totals included)."""
    over = []
    if max_active is not None and count + 1 > max_active:
        over.append(f"maxSessions {max_active} (it has {count} live sessions)")
    if max_vcpu is not None and vcpu + record.cpu > max_vcpu + 1e-9:
        over.append(f"maxVcpu {max_vcpu:g} (live sessions use {vcpu:g} vCPUs, this one asks {record.cpu:g})")
    if max_memory_mb is not None and memory_mb + record.memory_mb > max_memory_mb:
        over.append(
            f"maxMemoryMB {max_memory_mb} (live sessions use {memory_mb} MB, this one asks {record.memory_mb} MB)"
        )
    if over:
        raise QuotaExceeded(f"tenant {record.tenant_id} is at its quota: " + "; ".join(over))


def quota_checked(max_active: int | None, max_vcpu: float | None, max_memory_mb: int | None) -> bool:
    return max_active is not None or max_vcpu is not None or max_memory_mb is not None
