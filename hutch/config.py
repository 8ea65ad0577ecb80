"""Configuration of `hutch serve`, `hutch gateway` and `hutch node`: defaults, a TOML file, flags.

# /etc/hutch.toml (every key optional)
host = "0.0.0.0"
port = 3000
data_dir = "/var/lib/hutch"
metadb_url = "sqlite://"          # sqlite:///path, the data dir's metadb.sqlite3, or postgresql://user@host/db
workspace_store = "auto"          # image | directory | shared | auto (image where loop devices exist)
max_instances = 256               # instances running at once (hibernated ones hold only disk: not counted)
domain = "localhost"              # host names {port}-{sandboxId}.{domain} reach a port of a sandbox ("": none)
metrics_public = false            # true: GET /metrics without an admin key (it holds no tenant data)
request_timeout = 30.0            # seconds a client may take to send a request head (and a control-plane body)
live_restore = false              # true: a stop of `hutch serve`/`node` leaves live sessions' instances
                                  # running for the next start to adopt (each still ends at its session's
                                  # TTL, hutch alive or not); false: a stop ends every session and removes
                                  # every instance and all hutch made on the host
warm_lease = 60.0                 # seconds a warm (pooled) instance outlives the last hutch on its data dir
paused_retention = 86400.0        # seconds a paused sandbox is kept (frozen, its memory held), then ended
criu = ""                         # CRIU >= 4.2 for hibernation to disk (scripts/install-criu.sh); "": $HUTCH_CRIU,
                                  # <data_dir>/bin/criu, /usr/local/lib/hutch/criu/sbin/criu, then PATH; "off": none
[hibernation]                     # idle or paused sessions written to disk (CRIU)
compress = "zstd"                 # zstd (level 1) | none: how their memory pages are stored; zstd keeps
                                  # a code-interpreter session's image 4-7x smaller for ~0.1 s more per
                                  # hibernation and ~0.05 s per restore
[warm_pools]                      # override the built-in functions' pool sizes
base = 2
"code-interpreter-v1" = 1
[gateway]
head_timeout = 300.0              # seconds an instance may take to begin its answer once it has the request
                                  # (or to take more of its body): then 504 (a frozen or hung instance)
[preview]                         # the listener of host-named traffic (port previews, signed file URLs)
port = 0                          # its own port (every request there is host-routed); 0: the main port only
host = ""                         # "": the main host
tls_cert = ""                     # PEM certificate and key: HTTPS on the preview port (e.g. a *.domain wildcard)
tls_key = ""
public_domain = ""                # the domain SDKs are told; "": domain, with ":port" unless 80/443 or TLS on 443
[metering]
sample_interval = 5.0             # seconds between cgroup samples of every live session
bucket_seconds = 60               # time resolution of per-tenant usage (ranges, charts)
busy_cpu_fraction = 0.05          # an instance using more CPU than this (of one vCPU) is active
metrics_keep_seconds = 86400      # how long each sample is kept for E2B's sandbox metrics
[network]                         # sandboxes with a network policy (functions' `network`)
subnet = ""                       # their addresses; "": a /16 of 10.64.0.0/10 no host interface uses,
                                  # chosen once (kept in <data>/network-subnet)
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
[templates]                       # root file systems of sandboxes (hutch/templates/)
dir = ""                          # where layers and templates live; "": <data_dir>/templates
prepare = ["base"]                # built-in templates built at the first start (in the background)
debian_suite = "bookworm"         # the suite of Debian-based templates (mmdebstrap, the host's apt sources)
debian_mirror = ""                # a Debian mirror URL for them; "": the host's apt sources
ca_certificates = []              # extra CA files sandboxes and builds trust (a TLS-inspecting proxy's);
                                  # unset: the host's own (SSL_CERT_FILE, PIP_CERT, pip.conf's cert)
env = {}                          # set in every build step and sandbox of a template, e.g. mirrors:
                                  # {PIP_INDEX_URL = "https://pypi.internal/simple", npm_config_registry = "…"}
insecure_registries = []          # OCI registries reached over plain HTTP or unverified TLS, e.g. ["127.0.0.1:5000"]
registry_auth = {}                # "user:password" per registry host, e.g. {"registry.example.com" = "bot:secret"}
max_upload_mb = 512               # the files of one COPY step a build may upload (413 beyond)
max_concurrent_builds = 2         # template builds running at once on this host; others wait their turn
max_builds_per_tenant = 4         # a tenant's unfinished builds (queued included); more are a 429
[kubernetes]                      # the `kubernetes` backend: an instance per pod (hutch/runtime/kubernetes/)
namespace = "hutch-sandboxes"     # where the instances' pods live
image = "hutch:0.1.0"             # an image with hutch installed (deploy/Dockerfile)
runtime_class = ""                # e.g. "gvisor" or "kata"; "" is the cluster's default (runc)
node_name = ""                    # pin pods to this node; "" reads $HUTCH_NODE_NAME, or lets Kubernetes place them

The environment variable HUTCH_METADB_URL, when set, replaces the file's `metadb_url` (a secret
is better kept out of config files: a Kubernetes Secret sets it); HUTCH_TEMPLATES_PREPARE (names
separated by commas, "" for none) replaces `[templates] prepare`; command-line flags still win.
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


class TemplatesConfig(BaseModel):
    """Root file systems of sandboxes (`hutch.templates`)."""

    model_config = ConfigDict(extra="forbid")

    dir: Path | None = None
    prepare: list[str] = Field(default_factory=lambda: ["base"])
    debian_suite: str = Field("bookworm", pattern=r"^[a-z][a-z0-9.-]{0,31}$")
    debian_mirror: str = Field("", pattern=r"^(https?://\S+)?$")
    ca_certificates: list[Path] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    insecure_registries: list[str] = Field(default_factory=list)
    registry_auth: dict[str, str] = Field(default_factory=dict)
    max_upload_mb: int = Field(512, ge=1, le=65536)  # the files of one COPY step (E2B's upload), 413 beyond
    max_concurrent_builds: int = Field(2, ge=1, le=64)  # builds running at once on this host; more wait
    max_builds_per_tenant: int = Field(4, ge=1, le=1000)  # a tenant's unfinished builds (waiting included)

    def ca_files(self) -> list[Path]:
        """The extra CA certificates to trust: the configured ones, or the host's own settings."""
        if self.ca_certificates is not None:
            return [Path(p) for p in self.ca_certificates]
        found: list[Path] = []
        for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
            if os.environ.get(name):
                found.append(Path(os.environ[name]))
        import configparser

        for pip_conf in (Path("/etc/pip.conf"), Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"):
            parser = configparser.ConfigParser()
            try:
                parser.read(pip_conf)
            except configparser.Error:
                continue
            if parser.has_option("global", "cert"):
                found.append(Path(parser.get("global", "cert")))
        unique = {p.resolve(): p for p in found if p.is_file()}
        return sorted(unique)


class HibernationConfig(BaseModel):
    """Hibernation of sessions to disk (`hutch.runtime.criu`, `hutch.runtime.pages`)."""

    model_config = ConfigDict(extra="forbid")

    # How the memory pages of an image are stored: "zstd" (level 1) or "none".
    compress: str = Field("zstd", pattern="^(zstd|none)$")


class GatewayConfig(BaseModel):
    """The data plane (`hutch.gateway`)."""

    model_config = ConfigDict(extra="forbid")

    head_timeout: float = Field(300.0, gt=0, le=86400)


class PreviewConfig(BaseModel):
    """Host-named traffic, `{port}-{sandboxId}.{domain}` (`hutch.gateway.e2b`), on a listener of its own."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(0, ge=0, le=65535)
    host: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    public_domain: str = ""

    @model_validator(mode="after")
    def _cert_with_key(self) -> PreviewConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("preview.tls_cert and preview.tls_key go together")
        if self.tls_cert and not self.port:
            raise ValueError("preview.tls_cert needs preview.port (TLS is served on the preview port only)")
        return self


class MeteringConfig(BaseModel):
    """How sessions are measured (`hutch.scheduler.metering`)."""

    model_config = ConfigDict(extra="forbid")

    sample_interval: float = Field(5.0, gt=0, le=3600)
    bucket_seconds: int = Field(60, ge=1, le=86400)
    busy_cpu_fraction: float = Field(0.05, ge=0, le=64)
    metrics_keep_seconds: float = Field(86400.0, gt=0, le=30 * 86400)  # metric samples (E2B's sandbox metrics)


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
    domain: str = "localhost"
    warm_pools: dict[str, int] = Field(default_factory=dict)
    reap_interval: float = Field(0.5, gt=0)
    live_restore: bool = False
    warm_lease: float = Field(60.0, gt=0, le=86400)
    paused_retention: float = Field(86400.0, gt=0, le=30 * 86400)
    criu: str = ""  # the CRIU binary hibernation uses; "": looked for (`hutch.runtime.criu.candidates`); "off"
    metrics_public: bool = False
    request_timeout: float = Field(30.0, gt=0, le=3600)
    hibernation: HibernationConfig = Field(default_factory=HibernationConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    pricing: Pricing = Field(default_factory=Pricing)
    shared_storage: SharedStorageConfig = Field(default_factory=SharedStorageConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig)

    @model_validator(mode="after")
    def _shared_storage_has_a_path(self) -> ServerConfig:
        if self.workspace_store == "shared" and self.shared_storage.path is None:
            raise ValueError('workspace_store = "shared" needs [shared_storage] path (the shared mount)')
        return self

    def public_domain(self) -> str | None:
        """The domain SDKs build sandbox host names with (E2B's `domain`); None without host routing."""
        if not self.domain:
            return None
        if self.preview.public_domain:
            return self.preview.public_domain
        port = self.preview.port or self.port
        default = 443 if self.preview.tls_cert else 80
        return self.domain if port == default else f"{self.domain}:{port}"

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
        if "HUTCH_TEMPLATES_PREPARE" in os.environ:
            names = [n.strip() for n in os.environ["HUTCH_TEMPLATES_PREPARE"].split(",") if n.strip()]
            values.setdefault("templates", {})["prepare"] = names
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)
