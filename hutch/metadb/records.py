"""The records MetaDB holds: the source of truth for tenants, functions, sessions, instances and usage.

Plain dataclasses, shared by every MetaDB backend and by the components that read them.
Times are unix seconds (floats).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from hutch.types import InstanceId


class SessionStatus(enum.StrEnum):
    ACTIVE = "Active"  # bound (or being re-bound) to an instance; requests are served
    EXPIRED = "Expired"  # ended (TTL, idle timeout, delete): its instance is gone


class EndReason(enum.StrEnum):
    TTL = "ttl"
    IDLE = "idle"
    DELETED = "deleted"
    FUNCTION_DELETED = "function_deleted"
    START_FAILED = "start_failed"
    SHUTDOWN = "shutdown"  # hutch stopped without `live_restore`


@dataclass
class Tenant:
    tenant_id: str
    name: str
    created_at: float
    is_admin: bool = False  # may manage other tenants
    max_sessions: int = 50  # live sessions at once
    max_vcpu: float | None = None  # vCPUs of all live sessions together; None: no limit
    max_memory_mb: int | None = None  # memory of all live sessions together; None: no limit
    # Disk of its sleeping sessions' hibernation images and its memory snapshots; None: no limit
    max_image_disk_mb: int | None = None


@dataclass
class FunctionRecord:
    tenant_id: str  # "*" for the built-in functions every tenant sees
    name: str
    spec: dict[str, Any]  # a FunctionSpec, as JSON
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
    instance_id: InstanceId | None = None  # containerId; None while (re)starting
    scheduler_id: str | None = None
    epoch: int = 0  # +1 each time the instance is replaced (in-memory state was lost)
    disable_reuse: bool = False
    persist_workspace: bool = False  # keep the workspace after the session ends
    workspace_key: str = ""
    cpu: float = 1.0
    memory_mb: int = 512
    metadata: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    access_token: str | None = None  # envd access token (E2B traffic must carry it)
    ended_at: float | None = None
    end_reason: str | None = None
    # The session's own egress policy ({"internet", "allow", "deny"}); None: its function's.
    network: dict[str, Any] | None = None
    # Host-named traffic to its user servers: {"token": traffic access token required (E2B's
    # allowPublicTraffic false), "mask": the Host user servers see, "${PORT}" replaced}; None: open.
    traffic: dict[str, Any] | None = None
    # Asleep: {"state": "frozen", "since": unix time, "paused": bool}; None while it runs. A
    # paused session (E2B's pause, or its TTL with `on_timeout: pause`) wakes only when asked
    # (connect, resume) or, with `auto_resume`, on traffic; one frozen for idleness wakes on any.
    sleep: dict[str, Any] | None = None
    # E2B's lifecycle: {"on_timeout": "kill" | "pause", "auto_resume": bool}; None: kill.
    lifecycle: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.status == SessionStatus.ACTIVE

    @property
    def paused(self) -> bool:
        return bool(self.sleep and self.sleep.get("paused"))


@dataclass(frozen=True)
class MetricSample:
    """What one sample of a session's instance measured (E2B's `SandboxMetric`, per session)."""

    row_id: str  # the session's row id
    at: float
    cpu_used_pct: float  # of the session's vCPUs, since the previous sample (0 to 100)
    memory_bytes: int  # the instance's cgroup, page cache included
    disk_bytes: int  # the workspace


@dataclass(frozen=True)
class LogEntry:
    """One line of a session's log (E2B's `SandboxLogEntry`): what hutch saw happen to it."""

    row_id: str  # the session's row id
    at: float
    level: str  # debug | info | warn | error
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


LOG_LEVELS = ("debug", "info", "warn", "error")


@dataclass
class IdempotencyRecord:
    """A create that carried an `Idempotency-Key`: the key's claim, then the session it made."""

    tenant_id: str
    key: str
    request_hash: str  # what was asked (route and body), so a reuse for another request is told apart
    created_at: float
    session_row_id: str | None = None  # None while the first create runs (or if it died half-way)


class InstanceRole(enum.StrEnum):
    WARM = "warm"  # in a warm pool, bound to nobody
    BOUND = "bound"  # serving one session


@dataclass
class InstanceRecord:
    instance_id: InstanceId
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
    capacity: dict[str, Any] = field(default_factory=dict)


@dataclass
class UsageAmounts:
    """Additive amounts of usage: one session's, one time bucket's, or any sum of them.

    Time is split three ways: active (a request or stream in flight, or the instance busy on the
    CPU), idle (alive, nothing happening), down (the instance was dead, between a crash and the
    recovery: nothing is held, nothing is billed). `cpu_s` and `memory_gib_s` are measured from
    the instance's cgroup; the `vcpu_*` and `memory_alloc_*` amounts are the session's allocation
    times active or idle time. Every amount is linear, so the cost of a sum is the sum of costs
    (`hutch.pricing.cost`).
    """

    active_s: float = 0.0
    idle_s: float = 0.0
    down_s: float = 0.0
    cpu_s: float = 0.0  # measured CPU seconds
    cpu_active_s: float = 0.0  # the part of cpu_s that fell in active time
    memory_gib_s: float = 0.0  # measured memory, integrated over time
    memory_active_gib_s: float = 0.0  # the part of memory_gib_s that fell in active time
    vcpu_active_s: float = 0.0  # allocated vCPUs x active seconds
    vcpu_idle_s: float = 0.0  # allocated vCPUs x idle seconds
    memory_alloc_active_gib_s: float = 0.0  # allocated GiB x active seconds
    memory_alloc_idle_gib_s: float = 0.0  # allocated GiB x idle seconds
    disk_gib_s: float = 0.0  # workspace bytes, integrated over time

    def add(self, other: UsageAmounts, factor: float = 1.0) -> UsageAmounts:
        """Add `other` (times `factor`) to these amounts in place; returns self."""
        for name in USAGE_AMOUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name) * factor)
        return self

    def copy(self) -> UsageAmounts:
        return UsageAmounts().add(self)


USAGE_AMOUNT_FIELDS = tuple(UsageAmounts.__dataclass_fields__)


@dataclass
class SessionUsage:
    """The usage record of one session (one per session row), kept after the session ends."""

    row_id: str  # the session's row id
    tenant_id: str
    function: str
    session_id: str
    vcpu: float  # the session's allocation
    memory_mb: int
    started_at: float
    accounted_to: float  # amounts cover [started_at, accounted_to]; resumed from here after a restart
    amounts: UsageAmounts = field(default_factory=UsageAmounts)
    ended_at: float | None = None
    end_reason: str | None = None
    memory_bytes: int = 0  # at the last sample
    memory_peak_bytes: int = 0  # the highest the instance's cgroup reported
    disk_bytes: int = 0  # workspace bytes at the last sample
    disk_peak_bytes: int = 0
    samples: int = 0
    instance_id: InstanceId | None = None  # the instance `cpu_base` was read from
    cpu_base: float | None = None  # its cgroup CPU counter at the last sample; None: not read yet

    @property
    def active(self) -> bool:
        return self.ended_at is None


@dataclass
class UsageBucket:
    """Usage of a tenant's function in one time bucket `[start, start + bucket seconds)`."""

    tenant_id: str
    function: str
    start: float
    amounts: UsageAmounts = field(default_factory=UsageAmounts)
