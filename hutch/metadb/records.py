"""The records MetaDB holds: the source of truth for tenants, functions, sessions and instances.

Plain dataclasses, shared by every MetaDB backend and by the components that read them.
Times are unix seconds (floats).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class SessionStatus(enum.StrEnum):
    ACTIVE = "Active"  # bound (or being re-bound) to an instance; requests are served
    EXPIRED = "Expired"  # ended (TTL, idle timeout, delete): its instance is gone


class EndReason(enum.StrEnum):
    TTL = "ttl"
    IDLE = "idle"
    DELETED = "deleted"
    FUNCTION_DELETED = "function_deleted"
    START_FAILED = "start_failed"


@dataclass
class Tenant:
    tenant_id: str
    name: str
    created_at: float
    is_admin: bool = False  # may manage other tenants
    max_sessions: int = 50  # live sessions at once


@dataclass
class FunctionRecord:
    tenant_id: str  # "*" for the built-in functions every tenant sees
    name: str
    spec: dict  # a FunctionSpec, as JSON
    created_at: float
    updated_at: float


@dataclass
class SessionRecord:
    row_id: str  # primary key: one row per session lifetime (a reused key gets a new row)
    internal_id: str  # keyed hash of tenant + function + session key; unique among Active rows
    session_id: str  # what the client sees (the affinity key, E2B's sandboxID)
    tenant_id: str
    function: str
    affinity: str  # HEADER_FIELD, GENERATED_COOKIE, E2B, API
    status: SessionStatus
    created_at: float
    last_modified: float
    last_activity: float
    expires_at: float  # TTL deadline
    ttl_s: int
    idle_timeout_s: int  # 0: never idles out
    instance_id: str | None = None  # containerId; None while (re)starting
    scheduler_id: str | None = None
    epoch: int = 0  # +1 each time the instance is replaced (in-memory state was lost)
    disable_reuse: bool = False
    persist_workspace: bool = False  # keep the workspace after the session ends
    workspace_key: str = ""
    cpu: float = 1.0
    memory_mb: int = 512
    metadata: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    access_token: str | None = None  # envd access token (E2B traffic must carry it)
    ended_at: float | None = None
    end_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.status == SessionStatus.ACTIVE


class InstanceRole(enum.StrEnum):
    WARM = "warm"  # in a warm pool, bound to nobody
    BOUND = "bound"  # serving one session


@dataclass
class InstanceRecord:
    instance_id: str
    scheduler_id: str
    pool_key: str  # "<tenant>/<function>" of the function it was started for
    role: InstanceRole
    created_at: float
    session_row_id: str | None = None


@dataclass
class SchedulerRecord:
    scheduler_id: str
    address: str  # how gateways reach it ("local" inside `hutch serve`)
    heartbeat_at: float
    capacity: dict = field(default_factory=dict)
