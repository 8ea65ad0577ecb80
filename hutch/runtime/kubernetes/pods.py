"""The pure half of the `kubernetes` backend: the pod and NetworkPolicy an instance gets, and how
to read a pod's state back (`build_pod`, `build_network_policy`, `pod_dead`, `pod_address`,
`find_pod_cgroup`). No I/O but `find_pod_cgroup`'s walk of the host's cgroup tree; no client.
What each field of the pod is for: the package's docstring (`hutch.runtime.kubernetes`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hutch.errors import CapacityError, IsolationError
from hutch.runtime.base import InstanceSpec
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.hostfs import SANDBOX_HOME
from hutch.runtime.userns import SANDBOX_UID

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
