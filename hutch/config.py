"""Configuration of `hutch serve`, `hutch gateway` and `hutch node`: defaults, a TOML file, flags.

# /etc/hutch.toml (every key optional)
host = "0.0.0.0"
port = 3000
data_dir = "/var/lib/hutch"
metadb_url = "sqlite://"          # sqlite:///path, the data dir's metadb.sqlite3, or postgresql://user@host/db
workspace_store = "auto"          # image | directory | shared | auto (image where loop devices exist)
max_instances = 256
domain = ""                       # E2B host routing: {port}-{sandboxId}.{domain}
metrics_public = false            # true: GET /metrics without an admin key (it holds no tenant data)
request_timeout = 30.0            # seconds a client may take to send a request head (and a control-plane body)
[warm_pools]                      # override the built-in functions' pool sizes
base = 2
"code-interpreter-v1" = 1
[gateway]
head_timeout = 300.0              # seconds an instance may take to begin its answer once it has the request
                                  # (or to take more of its body): then 504 (a frozen or hung instance)
[metering]
sample_interval = 5.0             # seconds between cgroup samples of every live session
bucket_seconds = 60               # time resolution of per-tenant usage (ranges, charts)
busy_cpu_fraction = 0.05          # an instance using more CPU than this (of one vCPU) is active
[network]                         # sandboxes with a network policy (functions' `network`)
subnet = ""                       # their addresses; "" derives a /16 of 10.64.0.0/10 from data_dir
hosts = {}                        # names pinned to addresses for sandboxes, e.g. {"mirror.internal" = "10.1.2.3"}
[shared_storage]                  # workspace_store = "shared": on a file system every node mounts
path = "/mnt/hutch"               # the shared mount; workspaces live in <path>/workspaces/
juicefs_meta_url = ""             # JuiceFS volume hutch mounts at path: postgres://…?sslmode=disable, redis://…
                                  # "": path is a directory the operator mounts (NAS…): no disk limit
juicefs_cache_dir = ""            # "": <data_dir>/juicefs-cache
juicefs_mount_options = []        # more `juicefs mount` flags, e.g. ["--heartbeat=3s"]
node_id = ""                      # this node among those sharing the store; "": host name + scheduler id
[cluster]                         # `hutch gateway` + `hutch node` on a shared (PostgreSQL) MetaDB
node_id = ""                      # this node's id in MetaDB; "": host name + data dir (stable across restarts)
advertise = ""                    # how gateways reach this node, http://HOST:PORT; "": its --host and --port
heartbeat_interval = 1.0          # seconds between a node's heartbeats in MetaDB
lease_seconds = 5.0               # a node silent this long is dead: its sessions move to live nodes
directory_refresh = 1.0           # seconds between a gateway's readings of the node list
[pricing]                         # the cost formula: hutch/pricing.py
currency = "USD"
vcpu_second = 0.000014            # per vCPU-second
memory_gib_second = 0.0000045     # per GiB-second of memory
disk_gib_second = 0.00000004      # per GiB-second of workspace disk
idle_cpu_factor = 0.0             # while idle, CPU is free...
idle_memory_factor = 0.1          # ...and memory costs a tenth
basis = "allocated"               # allocated (vCPUs/GiB of the session) | used (cgroup-measured)
[kubernetes]                      # the `kubernetes` backend: an instance per pod (hutch/runtime/kubernetes/)
namespace = "hutch-sandboxes"     # where the instances' pods live
image = "hutch:0.1.0"             # an image with hutch installed (deploy/Dockerfile)
runtime_class = ""                # e.g. "gvisor" or "kata"; "" is the cluster's default (runc)
node_name = ""                    # pin pods to this node; "" reads $HUTCH_NODE_NAME, or lets Kubernetes place them

The environment variable HUTCH_METADB_URL, when set, replaces the file's `metadb_url` (a secret
is better kept out of config files: a Kubernetes Secret sets it); command-line flags still win.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hutch.errors import InvalidArgument
from hutch.pricing import Pricing


class NetworkConfig(BaseModel):
    """Instance networks (`hutch.runtime.network`) and the egress proxy."""

    model_config = ConfigDict(extra="forbid")

    subnet: str = ""
    hosts: dict[str, str] = Field(default_factory=dict)


class GatewayConfig(BaseModel):
    """The data plane (`hutch.gateway`)."""

    model_config = ConfigDict(extra="forbid")

    head_timeout: float = Field(300.0, gt=0, le=86400)


class MeteringConfig(BaseModel):
    """How sessions are measured (`hutch.scheduler.metering`)."""

    model_config = ConfigDict(extra="forbid")

    sample_interval: float = Field(5.0, gt=0, le=3600)
    bucket_seconds: int = Field(60, ge=1, le=86400)
    busy_cpu_fraction: float = Field(0.05, ge=0, le=64)


class KubernetesConfig(BaseModel):
    """Options of the `kubernetes` backend: the keyword arguments of
    `hutch.runtime.kubernetes.runtime.KubernetesRuntime`, which documents each."""

    model_config = ConfigDict(extra="forbid")

    namespace: str = "hutch-sandboxes"
    image: str = "hutch:0.1.0"
    image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    runtime_class: str = ""
    agent_port: int = Field(49983, ge=1, le=65535)
    agent_command: list[str] = Field(default_factory=lambda: ["/opt/hutch/bin/python", "-I", "-m", "hutch.agent"])
    node_name: str = ""
    control_namespace: str = "hutch"
    kubeconfig: str = ""
    context: str = ""
    start_timeout: float = Field(120.0, gt=0)
    user_namespace: bool = False
    workspace_claim: str = ""
    workspace_root: str = ""
    cgroup_root: str = "/sys/fs/cgroup"
    manage_network_policy: bool = True
    ingress_cidrs: list[str] = Field(default_factory=list)


class SharedStorageConfig(BaseModel):
    """Workspaces on a shared file system (`hutch.storage.shared`)."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = None
    juicefs_meta_url: str = Field("", pattern=r"^([a-z][a-z0-9+]*://.*)?$")
    juicefs_cache_dir: Path | None = None
    juicefs_mount_options: list[str] = Field(default_factory=list)
    node_id: str = Field("", pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")


class ClusterConfig(BaseModel):
    """Many gateways and nodes on one MetaDB (`hutch gateway`, `hutch node`; `hutch.cluster.node`)."""

    model_config = ConfigDict(extra="forbid")

    # This node's id in MetaDB (its sessions' `scheduler_id`): unique in the cluster and the same
    # across restarts, or the node would not find its own sessions again. "": host name + data dir.
    node_id: str = Field("", pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")
    # How gateways reach this node: http://HOST:PORT ("": http://<host>:<port> of its own listener).
    advertise: str = Field("", pattern=r"^(http://[^/\s]+:[0-9]+)?$")
    heartbeat_interval: float = Field(1.0, gt=0, le=60)
    # A node whose heartbeat is older than this is dead: its sessions move to live nodes.
    lease_seconds: float = Field(5.0, gt=0, le=600)
    # How often a gateway re-reads the node list (liveness, free capacity).
    directory_refresh: float = Field(1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _lease_covers_heartbeats(self) -> ClusterConfig:
        if self.lease_seconds <= 2 * self.heartbeat_interval:
            raise ValueError("cluster.lease_seconds must be more than twice cluster.heartbeat_interval")
        return self


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    data_dir: Path = Path("/var/lib/hutch")
    metadb_url: str = "sqlite://"
    workspace_store: str = Field("auto", pattern="^(auto|image|directory|shared)$")
    max_instances: int = Field(256, ge=1)
    uid_base: int = Field(1_000_000_000, ge=65536)
    domain: str = ""
    warm_pools: dict[str, int] = Field(default_factory=dict)
    reap_interval: float = Field(0.5, gt=0)
    metrics_public: bool = False
    request_timeout: float = Field(30.0, gt=0, le=3600)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    pricing: Pricing = Field(default_factory=Pricing)
    shared_storage: SharedStorageConfig = Field(default_factory=SharedStorageConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _shared_storage_has_a_path(self) -> ServerConfig:
        if self.workspace_store == "shared" and self.shared_storage.path is None:
            raise ValueError('workspace_store = "shared" needs [shared_storage] path (the shared mount)')
        return self

    @classmethod
    def load(cls, path: Path | None = None, **overrides) -> ServerConfig:
        values: dict = {}
        if path is not None:
            try:
                values = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidArgument(f"cannot read config {path}: {exc}") from None
        if os.environ.get("HUTCH_METADB_URL"):
            values["metadb_url"] = os.environ["HUTCH_METADB_URL"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
