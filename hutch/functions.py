"""Functions: the template of a session's instance (what runs, with what limits, routed how).

A function is named per tenant; the built-ins (`base`, `code-interpreter-v1`) belong to every
tenant (tenant id "*") and can be shadowed by a tenant's own function of the same name. An E2B
`templateID` names a function.
"""

from __future__ import annotations

import enum
import re
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hutch.runtime import BACKENDS
from hutch.runtime.base import Resources

if TYPE_CHECKING:
    from hutch.metadb.records import Tenant

# A template's name may name its function (E2B's `Sandbox.create(template)`), tag included.
TEMPLATE_REF = r"^[a-z0-9][a-z0-9._-]{0,62}(:[a-z0-9][a-z0-9._-]{0,62})?$"
NAME_PATTERN = re.compile(TEMPLATE_REF)
BUILTIN_TENANT = "*"


class AffinityType(enum.StrEnum):
    HEADER_FIELD = "HEADER_FIELD"
    GENERATED_COOKIE = "GENERATED_COOKIE"
    MCP_STREAMABLE = "MCP_STREAMABLE"
    MCP_SSE = "MCP_SSE"


class ResourceSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    cpu: float = Field(1.0, gt=0, le=16, description="vCPUs")
    memory_mb: int = Field(512, alias="memoryMB", ge=64, le=65536)
    pids: int = Field(256, ge=16, le=32768)
    disk_mb: int = Field(1024, alias="diskMB", ge=16, le=1048576, description="workspace size")
    tmp_mb: int = Field(64, alias="tmpMB", ge=1, le=16384)

    def to_runtime(self, max_lifetime_s: float | None = None) -> Resources:
        return Resources(
            cpu=self.cpu,
            memory_mb=self.memory_mb,
            pids=self.pids,
            disk_mb=self.disk_mb,
            tmp_mb=self.tmp_mb,
            max_lifetime_s=max_lifetime_s,
        )


class NetworkSpec(BaseModel):
    """What an instance may reach (E2B's semantics): `allowOut` entries (CIDRs, addresses,
    domains, `*.domain`) take precedence over `denyOut` (CIDRs, addresses); what neither names is
    reachable only with `allowInternetAccess`. The host, its loopback, link-local addresses and
    other sessions are never reachable. A function without a `network` has loopback only."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    allow_internet_access: bool = Field(False, alias="allowInternetAccess")
    allow_out: list[str] = Field(default_factory=list, alias="allowOut", max_length=256)
    deny_out: list[str] = Field(default_factory=list, alias="denyOut", max_length=256)

    @model_validator(mode="after")
    def _entries(self) -> NetworkSpec:
        from hutch.errors import HutchError
        from hutch.runtime.network import egress_policy

        try:
            egress_policy(self.to_runtime())
        except (HutchError, ValueError) as exc:
            raise ValueError(getattr(exc, "message", str(exc))) from None
        return self

    def to_runtime(self) -> dict:
        return {"internet": self.allow_internet_access, "allow": list(self.allow_out), "deny": list(self.deny_out)}


class AffinityConfig(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    header_name: str = Field("x-fc-session-id", alias="headerName", min_length=1, max_length=64)
    cookie_name: str = Field("x-fc-cookie-session-id", alias="cookieName", min_length=1, max_length=64)
    session_ttl_s: int = Field(21600, alias="sessionTTLInSeconds", ge=1, le=21600)
    session_idle_timeout_s: int = Field(1800, alias="sessionIdleTimeoutInSeconds", ge=0, le=21600)
    session_freeze_after_idle_s: int = Field(
        0,
        alias="sessionFreezeAfterIdleInSeconds",
        ge=0,
        le=21600,
        description="freeze a session idle this long (no CPU, memory kept; the next request wakes it); 0: never",
    )
    session_hibernate_after_idle_s: int = Field(
        0,
        alias="sessionHibernateAfterIdleInSeconds",
        ge=0,
        le=21600,
        description="hibernate a session idle this long to disk (no RAM, no process; the next request restores "
        "it with its memory) where the host can (CRIU, a template without a network), else freeze it; 0: never",
    )
    disable_session_id_reuse: bool = Field(False, alias="disableSessionIdReuse")

    @field_validator("header_name", "cookie_name")
    @classmethod
    def _token(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", value):
            raise ValueError("must be an HTTP header/cookie name token")
        return value

    @field_validator("header_name")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()  # header names are case-insensitive; ASGI gives them lowercased


class FunctionSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    name: str
    description: str = ""
    runtime: str = Field("bwrap", description="isolation backend: bwrap, or gvisor (stronger, slower to start)")
    template: str = Field(
        "host",
        description="the root file system of its instances: a template (root inside, installs work), "
        "`name:tag` for one build of it, or 'host' (the host's own system, read-only)",
        pattern=TEMPLATE_REF,
    )
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    env: dict[str, str] = Field(default_factory=dict, alias="environmentVariables")
    start_command: list[str] | None = Field(
        None, alias="startCommand", description="a user HTTP server started in every instance"
    )
    port: int | None = Field(None, ge=1, le=65535, description="the port of that server")
    session_affinity: AffinityType = Field(AffinityType.HEADER_FIELD, alias="sessionAffinity")
    affinity_config: AffinityConfig = Field(default_factory=AffinityConfig, alias="sessionAffinityConfig")
    warm_pool_size: int = Field(0, alias="warmPoolSize", ge=0, le=64)
    persist_workspace: bool = Field(False, alias="persistWorkspace", description="keep the workspace after the session")
    prestart_kernel: bool = Field(False, alias="prestartKernel", description="start a Jupyter kernel at boot")
    network: NetworkSpec | None = Field(
        None, description="egress policy; null: loopback only (a namespace of its own with no way out)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                "1-63 lowercase letters, digits, '.', '_' and '-', starting with a letter or digit "
                "(and a template's ':tag')"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", key):
                raise ValueError(f"invalid environment variable name {key!r}")
        return value

    @model_validator(mode="after")
    def _server(self) -> FunctionSpec:
        if (self.start_command is None) != (self.port is None):
            raise ValueError("startCommand and port go together")
        if self.runtime not in BACKENDS:
            raise ValueError(f"unknown runtime {self.runtime!r} (available: {', '.join(BACKENDS)})")
        if self.template != "host" and self.runtime not in ("bwrap", "gvisor"):
            raise ValueError(
                f"templates run on the bwrap and gvisor runtimes; {self.runtime} instances see the host's system"
            )
        if self.network is not None and self.runtime != "bwrap":
            raise ValueError(f"a network policy needs the bwrap runtime; {self.runtime} instances have loopback only")
        return self

    def wire(self) -> dict:
        return self.model_dump(by_alias=True, mode="json")


BUILTIN_FUNCTIONS = [
    FunctionSpec(
        name="base",
        description="A Linux sandbox with Python: commands, files, and user servers on any port.",
        # Debian with Python, Node.js, git and sudo (`hutch.templates.service`); the host's
        # read-only system until that template is prepared.
        template="base",
        warm_pool_size=2,
        # A network that reaches nothing until a session asks for more (E2B sandboxes do), so
        # that warm instances can serve those sessions and policies can change live.
        network=NetworkSpec(),
    ),
    FunctionSpec(
        name="code-interpreter-v1",
        description="base plus a Jupyter kernel started ahead of the first run_code (E2B's code interpreter).",
        template="code-interpreter-v1",
        resources=ResourceSpec(memory_mb=1024),
        warm_pool_size=1,
        prestart_kernel=True,
        network=NetworkSpec(),
    ),
]


def check_warm_pools(tenant: Tenant, specs: list[FunctionSpec]) -> None:
    """Warm instances of a tenant's functions are sessions held ready for it, on the host's
    capacity: together (`specs`, all of the tenant's own functions) they stay within the tenant's
    quotas, or one tenant could fill the host with idle instances and starve every other.

    Raises:
        QuotaExceeded: naming each quota the warm pools would break.
    """
    from hutch.errors import QuotaExceeded

    count = sum(s.warm_pool_size for s in specs)
    vcpu = sum(s.warm_pool_size * s.resources.cpu for s in specs)
    memory_mb = sum(s.warm_pool_size * s.resources.memory_mb for s in specs)
    over = []
    if count > tenant.max_sessions:
        over.append(f"maxSessions {tenant.max_sessions} (they would hold {count} instances)")
    if tenant.max_vcpu is not None and vcpu > tenant.max_vcpu + 1e-9:
        over.append(f"maxVcpu {tenant.max_vcpu:g} (they would hold {vcpu:g} vCPUs)")
    if tenant.max_memory_mb is not None and memory_mb > tenant.max_memory_mb:
        over.append(f"maxMemoryMB {tenant.max_memory_mb} (they would hold {memory_mb} MB)")
    if over:
        owner = f"tenant {tenant.tenant_id}"
        raise QuotaExceeded(f"the warm pools of {owner}'s functions are over its quota: " + "; ".join(over))
