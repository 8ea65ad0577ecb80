"""Configuration of `hutch serve`: defaults, then a TOML file, then command-line flags.

# /etc/hutch.toml (every key optional)
host = "0.0.0.0"
port = 3000
data_dir = "/var/lib/hutch"
metadb_url = "sqlite://"          # sqlite:///path, the data dir's metadb.sqlite3, or postgresql://user@host/db
workspace_store = "auto"          # image | directory | auto (image where loop devices exist)
max_instances = 256
domain = ""                       # E2B host routing: {port}-{sandboxId}.{domain}
metrics_public = false            # true: GET /metrics without an admin key (it holds no tenant data)
[warm_pools]                      # override the built-in functions' pool sizes
base = 2
"code-interpreter-v1" = 1
[metering]
sample_interval = 5.0             # seconds between cgroup samples of every live session
bucket_seconds = 60               # time resolution of per-tenant usage (ranges, charts)
busy_cpu_fraction = 0.05          # an instance using more CPU than this (of one vCPU) is active
[network]                         # sandboxes with a network policy (functions' `network`)
subnet = ""                       # their addresses; "" derives a /16 of 10.64.0.0/10 from data_dir
hosts = {}                        # names pinned to addresses for sandboxes, e.g. {"mirror.internal" = "10.1.2.3"}
[pricing]                         # the cost formula: hutch/pricing.py
currency = "USD"
vcpu_second = 0.000014            # per vCPU-second
memory_gib_second = 0.0000045     # per GiB-second of memory
disk_gib_second = 0.00000004      # per GiB-second of workspace disk
idle_cpu_factor = 0.0             # while idle, CPU is free...
idle_memory_factor = 0.1          # ...and memory costs a tenth
basis = "allocated"               # allocated (vCPUs/GiB of the session) | used (cgroup-measured)
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hutch.errors import InvalidArgument
from hutch.pricing import Pricing


class NetworkConfig(BaseModel):
    """Instance networks (`hutch.runtime.network`) and the egress proxy."""

    model_config = ConfigDict(extra="forbid")

    subnet: str = ""
    hosts: dict[str, str] = Field(default_factory=dict)


class MeteringConfig(BaseModel):
    """How sessions are measured (`hutch.scheduler.metering`)."""

    model_config = ConfigDict(extra="forbid")

    sample_interval: float = Field(5.0, gt=0, le=3600)
    bucket_seconds: int = Field(60, ge=1, le=86400)
    busy_cpu_fraction: float = Field(0.05, ge=0, le=64)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/hutch")
    metadb_url: str = "sqlite://"
    workspace_store: str = Field("auto", pattern="^(auto|image|directory)$")
    max_instances: int = Field(256, ge=1)
    uid_base: int = Field(1_000_000_000, ge=65536)
    domain: str = ""
    warm_pools: dict[str, int] = Field(default_factory=dict)
    reap_interval: float = Field(0.5, gt=0)
    metrics_public: bool = False
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    pricing: Pricing = Field(default_factory=Pricing)

    @classmethod
    def load(cls, path: Path | None = None, **overrides) -> ServerConfig:
        values: dict = {}
        if path is not None:
            try:
                values = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidArgument(f"cannot read config {path}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
