"""What usage costs: the rates (configuration) and the one cost formula.

The formula, for any `UsageAmounts` (one session's, a bucket's, a tenant's sum):

    cost = vcpu_second       x (cpu_active   + idle_cpu_factor    x cpu_idle)
         + memory_gib_second x (mem_active   + idle_memory_factor x mem_idle)
         + disk_gib_second   x disk_gib_s

where, with `basis = "allocated"` (the default, as the reference platforms bill):
    cpu_active = vCPUs allocated x active seconds       cpu_idle = vCPUs allocated x idle seconds
    mem_active = GiB allocated x active seconds         mem_idle = GiB allocated x idle seconds
and with `basis = "used"` (what the instance's cgroup measured):
    cpu_active = CPU seconds used while active          cpu_idle = CPU seconds used while idle
    mem_active = memory GiB-seconds while active        mem_idle = memory GiB-seconds while idle
and `disk_gib_s` is the workspace's measured size integrated over the session's life (active,
idle and down alike: the workspace exists all along). Down time (the instance was dead,
between a crash and its recovery) costs nothing but disk.

Defaults: CPU is free while idle (`idle_cpu_factor = 0`) and memory costs a tenth
(`idle_memory_factor = 0.1`). Every term is linear, so the cost of a sum of amounts is the sum
of their costs: per session, per function, per tenant and per time bucket all agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hutch.metadb.records import UsageAmounts


class Pricing(BaseModel):
    """Rates, per second. `[pricing]` in hutch's TOML config."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field("USD", min_length=1, max_length=8)
    vcpu_second: float = Field(0.000014, ge=0, description="per vCPU-second")
    memory_gib_second: float = Field(0.0000045, ge=0, description="per GiB-second of memory")
    disk_gib_second: float = Field(0.00000004, ge=0, description="per GiB-second of workspace disk")
    idle_cpu_factor: float = Field(0.0, ge=0, le=1, description="CPU rate multiplier while idle")
    idle_memory_factor: float = Field(0.1, ge=0, le=1, description="memory rate multiplier while idle")
    basis: Literal["allocated", "used"] = "allocated"

    def wire(self) -> dict:
        return {
            "currency": self.currency,
            "vcpuSecond": self.vcpu_second,
            "memoryGiBSecond": self.memory_gib_second,
            "diskGiBSecond": self.disk_gib_second,
            "idleCpuFactor": self.idle_cpu_factor,
            "idleMemoryFactor": self.idle_memory_factor,
            "basis": self.basis,
        }


@dataclass(frozen=True)
class Cost:
    cpu: float
    memory: float
    disk: float

    @property
    def total(self) -> float:
        return self.cpu + self.memory + self.disk


def cost(amounts: UsageAmounts, pricing: Pricing) -> Cost:
    """The cost of these amounts (the formula in this module's docstring)."""
    if pricing.basis == "allocated":
        cpu_active, cpu_idle = amounts.vcpu_active_s, amounts.vcpu_idle_s
        mem_active, mem_idle = amounts.memory_alloc_active_gib_s, amounts.memory_alloc_idle_gib_s
    else:
        cpu_active, cpu_idle = amounts.cpu_active_s, amounts.cpu_s - amounts.cpu_active_s
        mem_active, mem_idle = amounts.memory_active_gib_s, amounts.memory_gib_s - amounts.memory_active_gib_s
    return Cost(
        cpu=pricing.vcpu_second * (cpu_active + pricing.idle_cpu_factor * cpu_idle),
        memory=pricing.memory_gib_second * (mem_active + pricing.idle_memory_factor * mem_idle),
        disk=pricing.disk_gib_second * amounts.disk_gib_s,
    )
