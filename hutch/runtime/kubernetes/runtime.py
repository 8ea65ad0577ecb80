"""The `kubernetes` backend: every instance is a pod, reached through a relay on this host.

A hutch node (`hutch node`, or `hutch serve`) asks the Kubernetes API for one pod per instance:
the hutch image running the agent, listening on TCP (`--listen 0.0.0.0:<agent_port>`), as the
sandbox user (uid 1000), under a RuntimeClass (`gvisor`, `kata`) when one is configured. What the
pod gets, and why, is in `build_pod`:

- no service account token (`automountServiceAccountToken: false`) and no service links: nothing
  in the pod can talk to the API server as anybody, or learn the cluster's services;
- non-root, read-only root file system, every capability dropped, no privilege escalation, the
  runtime's default seccomp profile: the `restricted` Pod Security Standard holds;
- the `Resources` as requests = limits (Guaranteed QoS): cpu, memory (the `/tmp` tmpfs counts in
  it, as under bwrap), the workspace's size as an emptyDir limit and ephemeral storage; pids as
  RLIMIT_NPROC where the pod has a kernel or uid range of its own (a RuntimeClass, or
  `user_namespace`: otherwise uid 1000 is shared by every pod of the node and so is the limit);
  the wall-clock cap as `activeDeadlineSeconds`;
- `build_network_policy`: one NetworkPolicy for all sandbox pods denies every egress (DNS
  included) and lets in only hutch's node pods, on the agent's port.

The contract stays the one of `hutch.runtime.base`: the only channel to an instance is a Unix
socket on this host (`<data>/instances/<id>/run/agent.sock`). Here that socket is a `Relay`, an
asyncio listener in the hutch process that pipes each connection to the pod's agent at
podIP:agent_port, so the scheduler, the gateway and the readiness probe work unchanged.

Pods are found by labels: `hutch.dev/owner` (this node) and `hutch.dev/instance`. A local record
(`instance.json`, the format the other backends write, so `MultiRuntime` knows to adopt with this
backend after a restart) keeps what changes while the pod runs (the workspace key). Deaths are
seen by a watch on this node's pods (a pod that failed, finished, or was deleted by anyone but
hutch is a crash). Statistics come from the pod's cgroup on the host (`cgroup_root`: the host's
`/sys/fs/cgroup`, mounted into the node pod), which only works for pods on this node: pods are
pinned to it (`nodeName`) when `node_name` is known.

Workspaces: an emptyDir by default (it dies with the pod: `persistWorkspace` and recovery after
a crash get a fresh one). With `workspace_claim` (a ReadWriteMany PVC, e.g. JuiceFS's CSI driver)
whose file system this host's workspace store also has at `workspace_root`, the store attaches the
workspace as usual and the pod mounts the claim with the workspace's path as `subPath`; a rename
at warm-pool claim keeps the pod's bind (it follows the directory).

The Kubernetes client (`lightkube`, the `kubernetes` extra) is imported only when this backend is
made; without it, or without a cluster configuration, `make_runtime` raises `BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hutch.errors import BackendUnavailable, CapacityError, IsolationError, Unimplemented
from hutch.runtime.base import Instance, InstanceSpec, InstanceState, InstanceStats, InstanceTable
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.runtime.hostfs import SANDBOX_HOME
from hutch.runtime.userns import SANDBOX_UID
from hutch.types import InstanceId

if TYPE_CHECKING:
    from collections.abc import Callable

    from hutch.runtime.cgroups import CgroupManager
    from hutch.runtime.network import Networking, NetworkLayout
    from hutch.runtime.userns import UidSlots
    from hutch.storage.base import WorkspaceStore

log = logging.getLogger(__name__)

# Labels: the first three are the recommended ones (and what deploy/kubernetes selects on).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "hutch.dev/instance"
LABEL_OWNER = "hutch.dev/owner"  # the hutch node that runs the instance
SANDBOX_LABELS = {LABEL_NAME: "hutch", LABEL_COMPONENT: "sandbox", LABEL_MANAGED_BY: "hutch"}
NODE_LABELS = {LABEL_NAME: "hutch", LABEL_COMPONENT: "node"}  # the node DaemonSet's pods
NETWORK_POLICY_NAME = "hutch-sandboxes"
AGENT_CONTAINER = "agent"
AGENT_LOG = "/tmp/.hutch-agent.log"  # inside the pod, as under bwrap
INSTANCE_WORKSPACE_PREFIX = "_instances/"  # as `hutch.runtime.local`: a workspace no session claimed
READY_TIMEOUT = 15.0  # from a running container to an agent answering /health
CONNECT_TIMEOUT = 5.0  # the relay's connection to a pod's agent
RELAY_CHUNK = 256 * 1024
# A container stuck in one of these will not start by waiting longer.
FATAL_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class PodSettings:
    """What every pod of one runtime shares (the `[kubernetes]` config table)."""

    namespace: str = "hutch-sandboxes"
    image: str = "hutch:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    runtime_class: str = ""
    agent_port: int = 49983
    agent_command: tuple[str, ...] = ("/opt/hutch/bin/python", "-I", "-m", "hutch.agent")
    node_name: str = ""
    control_namespace: str = "hutch"
    user_namespace: bool = False
    workspace_claim: str = ""
    ingress_cidrs: tuple[str, ...] = ()


# -- pure builders ---------------------------------------------------------------------------------


def pod_name(instance_id: str) -> str:
    """A DNS-1123 name for the instance's pod (hutch's ids are `i-<hex>`; anything else is
    lowercased, cleaned and, if too long, shortened with a hash)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"hutch-{instance_id}".lower()).strip("-")
    if len(name) > 63:
        digest = hashlib.sha256(instance_id.encode()).hexdigest()[:10]
        name = f"{name[:52].rstrip('-')}-{digest}"
    return name


def label_value(text: str) -> str:
    """`text` as a label value (at most 63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    if _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")[:50].strip("-_.")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{cleaned}-{digest}" if cleaned else digest


def cpu_quantity(cpu: float) -> str:
    return f"{max(1, round(cpu * 1000))}m"


def sandbox_path(settings: PodSettings) -> str:
    """PATH of the sandbox user: hutch's interpreter first (as under bwrap), then the system's."""
    entries = []
    interpreter = settings.agent_command[0] if settings.agent_command else ""
    if interpreter.startswith("/"):
        entries.append(str(Path(interpreter).parent))
    entries += ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    return ":".join(dict.fromkeys(entries))


def has_own_kernel_or_uids(settings: PodSettings) -> bool:
    """Whether RLIMIT_NPROC counts only this pod's processes: a RuntimeClass (gVisor, Kata: a
    kernel of their own) or a user namespace (uids of its own). Under plain runc without one,
    every pod's uid 1000 is the same host uid, and the limit would count all of them."""
    return bool(settings.runtime_class) or settings.user_namespace


def agent_boot_config(spec: InstanceSpec, settings: PodSettings) -> dict:
    """`HUTCH_AGENT` for the pod's agent (`hutch.agent.config`). No secret goes in: the pod's
    environment is readable by whoever reads the pod."""
    resources = spec.resources
    rlimits: dict[str, list[int]] = {"nofile": [resources.nofile, resources.nofile], "core": [0, 0]}
    if has_own_kernel_or_uids(settings):
        rlimits["nproc"] = [resources.pids, resources.pids]
    return {
        "home": SANDBOX_HOME,
        "user": "user",
        "env": {"PATH": sandbox_path(settings), **spec.env},
        "prestart_kernel": spec.prestart_kernel,
        "log_path": AGENT_LOG,
        "rlimits": rlimits,
    }


def pod_labels(instance_id: str, owner: str) -> dict[str, str]:
    return {**SANDBOX_LABELS, LABEL_INSTANCE: label_value(instance_id), LABEL_OWNER: label_value(owner)}


def build_pod(spec: InstanceSpec, settings: PodSettings, owner: str, workspace_subpath: str | None = None) -> dict:
    """The pod of one instance, as the API's JSON. `workspace_subpath`: the workspace's path in
    `settings.workspace_claim`; None gives the pod an emptyDir workspace."""
    resources = spec.resources
    quantities = {"cpu": cpu_quantity(resources.cpu), "memory": f"{resources.memory_mb}Mi"}
    workspace_volume: dict[str, Any]
    home_mount: dict[str, Any] = {"name": "home", "mountPath": SANDBOX_HOME}
    if workspace_subpath is not None:
        if not settings.workspace_claim:
            raise IsolationError("a workspace sub-path needs `workspace_claim`")
        workspace_volume = {"name": "home", "persistentVolumeClaim": {"claimName": settings.workspace_claim}}
        home_mount["subPath"] = workspace_subpath
    else:
        workspace_volume = {"name": "home", "emptyDir": {}}
        if resources.disk_mb > 0:
            workspace_volume["emptyDir"]["sizeLimit"] = f"{resources.disk_mb}Mi"
            # Scheduling and eviction count emptyDir bytes as ephemeral storage.
            quantities["ephemeral-storage"] = f"{resources.disk_mb}Mi"
    security = {
        "runAsNonRoot": True,
        "runAsUser": SANDBOX_UID,
        "runAsGroup": SANDBOX_UID,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "name": AGENT_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.agent_command),
        "args": ["--listen", f"0.0.0.0:{settings.agent_port}"],
        "workingDir": SANDBOX_HOME,
        "env": [{"name": "HUTCH_AGENT", "value": json.dumps(agent_boot_config(spec, settings))}],
        "ports": [{"name": "agent", "containerPort": settings.agent_port, "protocol": "TCP"}],
        # Informative (kubectl shows it); hutch's own readiness goes through the relay.
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "agent"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "securityContext": security,
        "volumeMounts": [home_mount, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # a restarted agent would be a new sandbox: report a crash instead
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "hostname": "sandbox",
        # Egress is denied anyway; this keeps the cluster's DNS names and search domains out too.
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": ["127.0.0.1"]},
        "terminationGracePeriodSeconds": 0,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "fsGroup": SANDBOX_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            workspace_volume,
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": f"{resources.tmp_mb}Mi"}},
        ],
    }
    if settings.runtime_class:
        pod_spec["runtimeClassName"] = settings.runtime_class
    if settings.node_name:
        pod_spec["nodeName"] = settings.node_name  # this node's instances, measured from its cgroups
    if settings.user_namespace:
        pod_spec["hostUsers"] = False
    if resources.max_lifetime_s is not None:
        pod_spec["activeDeadlineSeconds"] = max(1, math.ceil(resources.max_lifetime_s))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(spec.instance_id),
            "namespace": settings.namespace,
            "labels": pod_labels(spec.instance_id, owner),
        },
        "spec": pod_spec,
    }


def build_network_policy(settings: PodSettings) -> dict:
    """The one NetworkPolicy of the sandbox namespace: every sandbox pod may not open any
    connection (no egress rule), and accepts only hutch's node pods on the agent's port."""
    sources: list[dict] = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.control_namespace}},
            "podSelector": {"matchLabels": dict(NODE_LABELS)},
        }
    ]
    sources += [{"ipBlock": {"cidr": cidr}} for cidr in settings.ingress_cidrs]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_NAME,
            "namespace": settings.namespace,
            "labels": {LABEL_NAME: "hutch", LABEL_MANAGED_BY: "hutch"},
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_COMPONENT: "sandbox", LABEL_MANAGED_BY: "hutch"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": sources, "ports": [{"protocol": "TCP", "port": settings.agent_port}]}],
            "egress": [],
        },
    }


# -- reading pods (the API's JSON) -------------------------------------------------------------


def _agent_status(pod: dict) -> dict:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == AGENT_CONTAINER:
            return status
    return {}


def pod_dead(pod: dict) -> str | None:
    """Why the pod's sandbox is over (failed, finished, restarted, being deleted), or None."""
    status = pod.get("status") or {}
    phase = status.get("phase")
    if phase in ("Failed", "Succeeded"):
        return f"pod {phase.lower()}: {status.get('reason') or ''} {status.get('message') or ''}".strip()
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "pod is being deleted"
    agent = _agent_status(pod)
    terminated = (agent.get("state") or {}).get("terminated")
    if terminated:
        return f"agent exited ({terminated.get('reason') or terminated.get('exitCode')})"
    if agent.get("restartCount"):
        return "agent restarted"
    return None


def pod_address(pod: dict) -> str | None:
    """The pod's IP once its agent's container runs (None: still starting).

    Raises:
        CapacityError: the node refused the pod for want of resources.
        IsolationError: the pod failed, or its container cannot start.
    """
    status = pod.get("status") or {}
    reason = status.get("reason") or ""
    dead = pod_dead(pod)
    if dead is not None:
        if reason.startswith("OutOf") or reason == "Evicted":  # OutOfcpu, OutOfmemory, ...
            raise CapacityError(f"the node has no room for the instance: {dead}")
        raise IsolationError(dead)
    waiting = (_agent_status(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in FATAL_WAITING_REASONS:
        raise IsolationError(f"the agent's container cannot start: {waiting['reason']}: {waiting.get('message', '')}")
    running = (_agent_status(pod).get("state") or {}).get("running")
    if status.get("phase") == "Running" and running is not None and status.get("podIP"):
        return status["podIP"]
    return None


def find_pod_cgroup(root: Path, pod_uid: str, max_depth: int = 6) -> Cgroup | None:
    """The cgroup kubelet made for the pod `pod_uid` under `root` (a host's /sys/fs/cgroup):
    `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid with _>.slice` (systemd driver), below
    a `kubepods` parent whose place depends on the distribution (kind nests it in `kubelet.slice`).
    v2: one directory; v1: the same path in the memory, cpuacct and pids hierarchies."""
    unified = (root / "cgroup.controllers").exists()
    hierarchy = root if unified else root / "memory"
    targets = (f"pod{pod_uid}", f"pod{pod_uid.replace('-', '_')}.slice")
    level = [(hierarchy, False)]  # (directory, below a kubepods directory)
    for _ in range(max_depth):
        below = []
        for directory, inside in level:
            try:
                entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(targets):
                    relative = Path(entry.path).relative_to(hierarchy)
                    if unified:
                        return Cgroup(2, {"unified": Path(entry.path)})
                    dirs = {"memory": hierarchy / relative}
                    for controller, names in (("cpuacct", ("cpuacct", "cpu,cpuacct")), ("pids", ("pids",))):
                        for name in names:
                            if (root / name / relative).is_dir():
                                dirs[controller] = root / name / relative
                                break
                    return Cgroup(1, dirs) if "pids" in dirs else None
                # Outside kubelet's tree only its own parents are entered; inside, the QoS classes.
                if inside or "kubepods" in entry.name or "kubelet" in entry.name:
                    below.append((Path(entry.path), inside or "kubepods" in entry.name))
        level = below
    return None


# -- the relay -------------------------------------------------------------------------------------


class Relay:
    """A Unix socket on this host whose every connection is piped to a pod's agent (TCP).

    Bytes go through untouched, both ways, with half-closes passed on (an HTTP client may shut
    its side after a request), so everything that speaks to an agent's socket (the gateway's
    pooled connections, WebSocket and port splices, `AgentChannel`) works as with bwrap's. A
    connection the agent refuses or that cannot be made is closed at once: the same as a dead
    agent's socket, which the layers above already handle."""

    def __init__(self, path: Path, host: str, port: int) -> None:
        self.path = Path(path)
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        os.chmod(self.path, 0o600)  # hutch (root) only; the directory is 0700 anyway

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                log.debug("relay %s: cannot reach %s:%d: %s", self.path, self.host, self.port, exc)
                return
            self._writers.add(upstream)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self._writers.discard(side)
                    side.close()

    def shut(self) -> None:
        """Stop listening and drop every open connection, at once (from synchronous code)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        self.path.unlink(missing_ok=True)

    async def close(self) -> None:
        """`shut`, and wait for the listener to be gone (the pod keeps running)."""
        server = self._server
        self.shut()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        self._server = None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close the other side; on an error, close it (which ends the
    opposite direction too)."""
    try:
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


# -- the runtime ---------------------------------------------------------------------------------


def load_cluster_config(kubeconfig: str = "", context: str = "") -> Any:
    """The cluster to talk to (a lightkube `SingleConfig`): `kubeconfig` if given, else the pod's
    service account, else $KUBECONFIG, else ~/.kube/config.

    Raises:
        BackendUnavailable: lightkube is not installed, or no cluster is configured.
    """
    try:
        from lightkube import KubeConfig
    except ImportError:
        raise BackendUnavailable(
            "the kubernetes backend needs the Kubernetes client: pip install 'hutch[kubernetes]'"
        ) from None
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
        return config.get(context or None)
    except Exception as exc:  # ConfigError, or a half-present service account (KeyError, OSError)
        raise BackendUnavailable(
            "no Kubernetes cluster configured for the kubernetes backend "
            f"({exc.__class__.__name__}: {exc}): run hutch in a pod with a service account, "
            "set KUBECONFIG, or set `kubeconfig` in the [kubernetes] config table"
        ) from None


def default_owner(node_name: str, data_dir: Path) -> str:
    """Which pods are this hutch's: its node's name, or (outside a cluster) host + data dir."""
    if node_name:
        return label_value(node_name)
    digest = hashlib.sha256(f"{socket.gethostname()}:{Path(data_dir).resolve()}".encode()).hexdigest()[:12]
    return f"local-{digest}"


class KubernetesRuntime(InstanceTable):
    """Instances as pods (see the module docstring). Keyword options are the `[kubernetes]`
    config table's (`hutch.config.KubernetesConfig`)."""

    name = "kubernetes"
    supports_network = False

    def __init__(
        self,
        data_dir: Path,
        store: WorkspaceStore,
        uid_slots: UidSlots | None = None,  # unused: pods get their uids from Kubernetes
        cgroups: CgroupManager | None = None,  # unused: kubelet makes the pods' cgroups
        *,
        networking: Networking | None = None,
        namespace: str = "hutch-sandboxes",
        image: str = "hutch:0.1.0",
        image_pull_policy: str = "IfNotPresent",
        runtime_class: str = "",
        agent_port: int = 49983,
        agent_command: Iterable[str] = PodSettings.agent_command,
        node_name: str = "",
        control_namespace: str = "hutch",
        kubeconfig: str = "",
        context: str = "",
        start_timeout: float = 120.0,
        user_namespace: bool = False,
        workspace_claim: str = "",
        workspace_root: str = "",
        cgroup_root: str = "/sys/fs/cgroup",
        manage_network_policy: bool = True,
        ingress_cidrs: Iterable[str] = (),
    ) -> None:
        self.cluster = load_cluster_config(kubeconfig, context)  # fails early: BackendUnavailable
        if bool(workspace_claim) != bool(workspace_root):
            raise ValueError("workspace_claim and workspace_root go together (the same file system)")
        self.data_dir = Path(data_dir)
        self.instances_dir = self.data_dir / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.networking = networking  # kept for MultiRuntime; pods never get a hutch network
        self.settings = PodSettings(
            namespace=namespace,
            image=image,
            image_pull_policy=image_pull_policy,
            runtime_class=runtime_class,
            agent_port=agent_port,
            agent_command=tuple(agent_command),
            node_name=node_name or os.environ.get("HUTCH_NODE_NAME", ""),
            control_namespace=control_namespace,
            user_namespace=user_namespace,
            workspace_claim=workspace_claim,
            ingress_cidrs=tuple(ingress_cidrs),
        )
        self.owner = default_owner(self.settings.node_name, self.data_dir)
        self.start_timeout = start_timeout
        self.workspace_root = Path(workspace_root) if workspace_root else None
        self.cgroup_root = Path(cgroup_root)
        self.manage_network_policy = manage_network_policy
        self.on_exit: Callable[[Instance], None] | None = None
        self._client: Any = None
        self._policy_ready = False
        self._setup_lock = asyncio.Lock()
        self._instances: dict[InstanceId, Instance] = {}
        self._relays: dict[InstanceId, Relay] = {}
        self._stopping: set[str] = set()
        self._watcher: asyncio.Task | None = None

    # -- the API ---------------------------------------------------------------------------------

    async def _connect(self) -> Any:
        """The API client, and the watch on this node's pods (both made on first use)."""
        if self._client is None:
            from lightkube import AsyncClient

            self._client = AsyncClient(self.cluster, namespace=self.settings.namespace, field_manager="hutch")
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_pods())
        return self._client

    async def _api(self) -> Any:
        """The client, once the sandboxes' NetworkPolicy is known to be in place (before any pod)."""
        client = await self._connect()
        if not self._policy_ready:
            async with self._setup_lock:
                if not self._policy_ready:
                    await self._ensure_network_policy()
                    self._policy_ready = True
        return client

    async def _ensure_network_policy(self) -> None:
        """Apply the sandboxes' NetworkPolicy (`manage_network_policy`), or check that it exists
        (deploy/kubernetes applies it). No pod starts without it: an instance whose egress is
        open would be a hole, not a degraded mode."""
        from lightkube import codecs
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.networking_v1 import NetworkPolicy

        where = f"{self.settings.namespace}/{NETWORK_POLICY_NAME}"
        try:
            if self.manage_network_policy:
                await self._client.apply(codecs.from_dict(build_network_policy(self.settings)), force=True)
            else:
                await self._client.get(NetworkPolicy, NETWORK_POLICY_NAME, namespace=self.settings.namespace)
        except ApiError as exc:
            raise IsolationError(
                f"NetworkPolicy {where}: {exc.status.code} {exc.status.message}; refusing to start pods whose "
                "egress is open (apply deploy/kubernetes/sandbox-networkpolicy.yaml, or let hutch apply it: "
                "manage_network_policy = true and RBAC to create and patch networkpolicies)"
            ) from None

    async def _delete_pod(self, name: str) -> None:
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import Pod

        try:
            await self._client.delete(Pod, name, namespace=self.settings.namespace, grace_period=0)
        except ApiError as exc:
            if exc.status.code != 404:
                raise IsolationError(f"cannot delete pod {name}: {exc.status.message}") from None

    async def _list_pods(self) -> tuple[dict[str, dict], str | None]:
        """This node's sandbox pods, by their instance label, and the list's resource version
        (where a watch starts so that it misses nothing)."""
        from lightkube.resources.core_v1 import Pod

        pods = {}  # by the instance's label value
        listing = self._client.list(Pod, namespace=self.settings.namespace, labels=self._labels())
        async for pod in listing:
            data = pod.to_dict()
            pods[data["metadata"]["labels"].get(LABEL_INSTANCE, "")] = data
        try:
            version = listing.resourceVersion
        except Exception:  # NotReadyError: an empty list may not have started the iteration
            version = None
        return pods, version

    def _labels(self) -> dict[str, str]:
        return {LABEL_OWNER: self.owner, LABEL_MANAGED_BY: "hutch"}

    # -- queries ---------------------------------------------------------------------------------

    def broken(self, instance_id: InstanceId) -> str | None:
        """Why a running instance can no longer work: only a shared workspace can fail here (the
        pod's own death is seen by the watch)."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.state != InstanceState.RUNNING or instance.detail.get("subpath") is None:
            return None
        failed = getattr(self.store, "failed", None)
        if failed is not None and failed(instance.workspace_path):
            return "its workspace's file system failed"
        return None

    def disk_room(self) -> bool:
        """A pod's disk is its node's ephemeral storage, which the kubelet admits and accounts."""
        return True

    async def stats(self, instance_id: InstanceId) -> InstanceStats:
        instance = self.get(instance_id)
        cgroup = await asyncio.to_thread(self._cgroup, instance)  # the first call searches the tree
        cpu_s, memory, peak, pids = cgroup.stats() if cgroup is not None else (0.0, 0, 0, 0)
        disk = 0
        if instance.detail.get("subpath") is not None:
            disk = await asyncio.to_thread(self.store.usage_bytes, instance.workspace, instance.workspace_path)
        return InstanceStats(cpu_s, memory, peak, pids, disk)

    def _cgroup(self, instance: Instance) -> Cgroup | None:
        if "cgroup" in instance.detail:
            return Cgroup.from_dict(instance.detail["cgroup"])
        uid = instance.detail.get("uid")
        cgroup = find_pod_cgroup(self.cgroup_root, uid) if uid else None
        if cgroup is None:
            if not instance.detail.get("cgroup_missing"):
                log.warning(
                    "no cgroup of pod %s under %s: its usage reads as zero (is the pod on this node?)",
                    instance.detail.get("pod"),
                    self.cgroup_root,
                )
                instance.detail["cgroup_missing"] = True
            return None
        instance.detail["cgroup"] = cgroup.to_dict()
        return cgroup

    # -- start -----------------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> Instance:
        if spec.backend != self.name:
            raise IsolationError(f"the {self.name} runtime cannot start a {spec.backend} instance")
        if spec.network is not None:
            raise Unimplemented(
                "kubernetes instances have no network (their pods' egress is denied): no network policy"
            )
        if spec.instance_id in self._instances:
            raise IsolationError(f"instance {spec.instance_id} already exists")
        client = await self._api()
        from lightkube import codecs
        from lightkube.core.exceptions import ApiError

        instance = await asyncio.to_thread(self._prepare, spec)
        self._instances[spec.instance_id] = instance
        try:
            pod = build_pod(spec, self.settings, self.owner, instance.detail.get("subpath"))
            try:
                created = await client.create(codecs.from_dict(pod))
            except ApiError as exc:
                if exc.status.code in (403, 429) and "quota" in (exc.status.message or "").lower():
                    raise CapacityError(f"pod refused: {exc.status.message}") from None
                raise IsolationError(f"cannot create pod {pod['metadata']['name']}: {exc.status.message}") from None
            instance.detail["uid"] = created.metadata.uid
            address = await self._wait_running(instance.detail["pod"])
            instance.detail["ip"] = address
            relay = Relay(instance.socket_path, address, self.settings.agent_port)
            await relay.start()
            self._relays[spec.instance_id] = relay
            channel = AgentChannel(instance.socket_path)
            try:
                await channel.wait_healthy(READY_TIMEOUT)
            finally:
                await channel.aclose()
        except BaseException:
            try:
                await self.stop(spec.instance_id)
            except Exception:  # the start's own error is the one to report
                log.exception("cleanup of instance %s after a failed start", spec.instance_id)
            raise
        instance.state = InstanceState.RUNNING
        self._save(instance)
        return instance

    def _prepare(self, spec: InstanceSpec) -> Instance:
        """The instance's directory (the relay's socket, the record) and, on a shared claim, its
        workspace; recorded before the pod exists, so that a crash of hutch right after creating
        it leaves something to adopt or clean up."""
        workspace = spec.workspace or f"{INSTANCE_WORKSPACE_PREFIX}{spec.instance_id}"
        instance_dir = self.instances_dir / spec.instance_id
        instance_dir.mkdir(mode=0o755)
        (instance_dir / "run").mkdir(mode=0o700)
        detail: dict[str, Any] = {"pod": pod_name(spec.instance_id), "namespace": self.settings.namespace}
        workspace_path = Path(f"/nonexistent/pod/{detail['pod']}/home")  # an emptyDir: never on this host
        if self.workspace_root is not None:
            attached = None
            try:
                attached = self.store.attach(workspace, SANDBOX_UID, spec.resources.disk_mb)
                detail["subpath"] = str(self._subpath(attached))
                workspace_path = attached
            except BaseException:
                if attached is not None:
                    self.store.detach(workspace, attached)
                    if workspace.startswith(INSTANCE_WORKSPACE_PREFIX):
                        self.store.delete(workspace)
                shutil.rmtree(instance_dir, ignore_errors=True)
                raise
        instance = Instance(
            instance_id=spec.instance_id,
            backend=self.name,
            socket_path=instance_dir / "run" / "agent.sock",
            workspace=workspace,
            workspace_path=workspace_path,
            host_uid=SANDBOX_UID,
            pid=0,  # no host process: the pod is the instance
            pid_start_time=0,
            started_at=time.time(),
            spec=spec,
            detail=detail,
        )
        self._save(instance)
        return instance

    def _subpath(self, attached: Path) -> Path:
        """Where the store attached a workspace, relative to the claim's root (the pod's subPath)."""
        assert self.workspace_root is not None
        try:
            return attached.resolve().relative_to(self.workspace_root.resolve())
        except ValueError:
            raise IsolationError(
                f"the workspace store attached {attached}, outside workspace_root {self.workspace_root}: "
                "the claim and the store must be the same file system"
            ) from None

    async def _wait_running(self, name: str) -> str:
        """Poll the pod until its agent's container runs; its IP. Polling, not a watch: a start
        is one pod, and a poll cannot miss an event between list and watch."""
        from lightkube.core.exceptions import ApiError
        from lightkube.resources.core_v1 import Pod

        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while True:
            try:
                pod = (await self._client.get(Pod, name, namespace=self.settings.namespace)).to_dict()
            except ApiError as exc:
                raise IsolationError(f"pod {name} vanished while starting: {exc.status.message}") from None
            address = pod_address(pod)
            if address is not None:
                return address
            if time.monotonic() >= deadline:
                phase = (pod.get("status") or {}).get("phase")
                raise IsolationError(f"pod {name} not running after {self.start_timeout:.0f}s (phase {phase})")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    # -- deaths ----------------------------------------------------------------------------------

    async def _watch_pods(self) -> None:
        """Report the death of every running instance of this node, for as long as hutch runs;
        after a broken watch, a list catches what happened meanwhile."""
        from lightkube.resources.core_v1 import Pod

        backoff = 0.5
        while True:
            try:
                # Only instances running before the list: one that starts meanwhile may be missing.
                running = [i for i, instance in self._instances.items() if instance.state == InstanceState.RUNNING]
                pods, version = await self._list_pods()
                for instance_id in running:
                    pod = pods.get(label_value(instance_id))
                    self._on_pod(label_value(instance_id), pod_dead(pod) if pod else "pod is gone")
                watch = self._client.watch(
                    Pod, namespace=self.settings.namespace, labels=self._labels(), resource_version=version
                )
                async for event, pod in watch:
                    backoff = 0.5
                    data = pod.to_dict()
                    label = data["metadata"]["labels"].get(LABEL_INSTANCE, "")
                    self._on_pod(label, "pod was deleted" if event == "DELETED" else pod_dead(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch of sandbox pods broke (%s: %s); again in %.1fs", type(exc).__name__, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def _on_pod(self, label: str, dead: str | None) -> None:
        """A pod of this node changed: `dead` says why its instance is over, or None."""
        if dead is None:
            return
        instance = self._instances.get(label)  # type: ignore[call-overload]
        if instance is None:  # an id that is no label value as it is (never one of hutch's `i-<hex>`)
            instance = next((i for i in self._instances.values() if label_value(i.instance_id) == label), None)
        if instance is None or instance.state != InstanceState.RUNNING or instance.instance_id in self._stopping:
            return  # not ours any more, still starting (start sees it), being stopped, or reported
        log.warning("instance %s died: %s", instance.instance_id, dead)
        self._report_crash(instance)

    def _report_crash(self, instance: Instance) -> None:
        # Nothing more goes to the pod's address: once the pod is gone, its IP may be given to
        # another pod (of another tenant, or not hutch's at all).
        relay = self._relays.pop(instance.instance_id, None)
        if relay is not None:
            relay.shut()
        instance.state = InstanceState.CRASHED
        with contextlib.suppress(OSError):
            self._save(instance)
        if self.on_exit is not None:
            self.on_exit(instance)

    async def kill(self, instance_id: InstanceId) -> None:
        """End an instance that stopped working: its pod is deleted and its death reported, and
        `stop` cleans up later."""
        instance = self.get(instance_id)
        log.warning("instance %s stopped working: deleting its pod", instance_id)
        await self._connect()
        await self._delete_pod(instance.detail["pod"])
        if instance.state == InstanceState.RUNNING:
            self._report_crash(instance)

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self, instance_id: InstanceId, keep_workspace: bool = False) -> None:
        instance = self.get(instance_id)
        self._stopping.add(instance_id)
        try:
            relay = self._relays.pop(instance_id, None)
            if relay is not None:
                await relay.close()
            await self._connect()
            await self._delete_pod(instance.detail["pod"])
            await asyncio.to_thread(self._cleanup, instance, keep_workspace)
        finally:
            self._stopping.discard(instance_id)
        instance.state = InstanceState.STOPPED
        self._instances.pop(instance_id, None)

    def _cleanup(self, instance: Instance, keep_workspace: bool) -> None:
        if instance.detail.get("subpath") is not None:
            self.store.detach(instance.workspace, instance.workspace_path)
            if not keep_workspace:
                self.store.delete(instance.workspace)
        elif keep_workspace and not instance.workspace.startswith(INSTANCE_WORKSPACE_PREFIX):
            log.info("instance %s: its workspace was an emptyDir and ends with the pod", instance.instance_id)
        shutil.rmtree(self.instances_dir / instance.instance_id, ignore_errors=True)

    async def claim_workspace(self, instance_id: InstanceId, key: str) -> None:
        instance = self.get(instance_id)
        if instance.workspace == key:
            return
        if instance.detail.get("subpath") is not None:
            # The pod's subPath bind follows the directory through the rename.
            moved = await asyncio.to_thread(self.store.rename, instance.workspace, key, instance.workspace_path)
            if moved is not None:
                instance.workspace_path = moved
                instance.detail["subpath"] = str(self._subpath(moved))
        instance.workspace = key
        self._save(instance)

    async def set_network(self, instance_id: InstanceId, policy: dict) -> None:
        raise Unimplemented("kubernetes instances have no network policy (their pods' egress is denied)")

    # -- records and adoption --------------------------------------------------------------------

    async def adopt_running(self) -> list[Instance]:
        """Take back the instances whose pod still runs (a relay again at the same socket path);
        clean up records whose pod is gone (keeping claimed workspaces) and delete this node's
        pods that no record names."""
        from hutch.runtime.local import LocalRuntime

        await self._connect()
        try:
            pods, _ = await self._list_pods()
        except Exception as exc:  # the API is down: keep the records for the next start
            log.error("cannot list sandbox pods to adopt them (%s: %s)", type(exc).__name__, exc)
            return []
        adopted = []
        for record_path in sorted(self.instances_dir.glob("*/instance.json")):
            try:
                instance = LocalRuntime._load(record_path)
            except (OSError, ValueError, TypeError, KeyError):
                continue  # another backend's problem: the local runtimes remove unreadable records
            if instance.backend != self.name or instance.instance_id in self._instances:
                continue
            pod = pods.pop(label_value(instance.instance_id), None)
            address = None
            if pod is not None and instance.state == InstanceState.RUNNING:
                with contextlib.suppress(IsolationError, CapacityError):
                    address = pod_address(pod)
            if address is None:
                if pod is not None:
                    await self._delete_pod(instance.detail["pod"])
                keep = not instance.workspace.startswith(INSTANCE_WORKSPACE_PREFIX)
                await asyncio.to_thread(self._cleanup, instance, keep)
                continue
            instance.detail["ip"] = address
            instance.detail["uid"] = pod["metadata"].get("uid")
            relay = Relay(instance.socket_path, address, self.settings.agent_port)
            await relay.start()
            self._relays[instance.instance_id] = relay
            self._instances[instance.instance_id] = instance
            self._save(instance)
            adopted.append(instance)
        for instance_id, pod in pods.items():
            log.warning("deleting pod %s: no record names instance %s", pod["metadata"]["name"], instance_id)
            await self._delete_pod(pod["metadata"]["name"])
        return adopted

    def sweep_orphans(self, live: set[str]) -> list[str]:
        """Nothing of a pod stays on this host but its record, which adoption handles."""
        return []

    def default_layout(self) -> NetworkLayout:
        from hutch.runtime.network import layout_for

        return layout_for(self.data_dir)

    async def close(self, unstage: bool = False) -> None:
        """Stop watching and relaying; the pods keep running for the next start to adopt.
        (`unstage`, for the local backends' callers: nothing is staged on this host.)"""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        for relay in self._relays.values():
            await relay.close()
        self._relays.clear()
        self._instances.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._policy_ready = False


__all__ = [
    "KubernetesRuntime",
    "PodSettings",
    "Relay",
    "build_network_policy",
    "build_pod",
    "find_pod_cgroup",
    "pod_address",
    "pod_dead",
    "pod_name",
]
