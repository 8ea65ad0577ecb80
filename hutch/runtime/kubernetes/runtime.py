"""The `kubernetes` runtime: `KubernetesRuntime`, an instance per pod (the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hutch.errors import BackendUnavailable, CapacityError, IsolationError, Unimplemented
from hutch.runtime.base import HibernationImage, Instance, InstanceSpec, InstanceState, InstanceStats, InstanceTable
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.runtime.kubernetes.pods import (
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    NETWORK_POLICY_NAME,
    PodSettings,
    build_network_policy,
    build_pod,
    find_pod_cgroup,
    label_value,
    pod_address,
    pod_dead,
    pod_name,
)
from hutch.runtime.kubernetes.relay import Relay
from hutch.runtime.userns import SANDBOX_UID
from hutch.types import InstanceId

if TYPE_CHECKING:
    from collections.abc import Callable

    from hutch.runtime.cgroups import CgroupManager
    from hutch.runtime.network import Networking, NetworkLayout
    from hutch.runtime.userns import UidSlots
    from hutch.storage.base import WorkspaceStore

log = logging.getLogger(__name__)

INSTANCE_WORKSPACE_PREFIX = "_instances/"  # as `hutch.runtime.local`: a workspace no session claimed
READY_TIMEOUT = 15.0  # from a running container to an agent answering /health


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
        instance = self._instances.get(InstanceId(label))
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

    async def halt(self, instance_id: InstanceId) -> None:
        raise Unimplemented("the kubernetes backend keeps nothing of an instance without its pod")

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

    def set_deadline(self, instance_id: InstanceId, at: float | None) -> None:
        """Not kept here: a pod outlives a dead hutch until the node's next start adopts or
        stops it (the keeper of `hutch.runtime.keeper` guards host process trees only)."""

    async def set_network(self, instance_id: InstanceId, policy: dict) -> None:
        raise Unimplemented("kubernetes instances have no network policy (their pods' egress is denied)")

    async def freeze(self, instance_id: InstanceId) -> None:
        raise Unimplemented("kubernetes instances cannot sleep (pods have no freezer hutch can reach)")

    async def thaw(self, instance_id: InstanceId) -> None:
        """Nothing: a pod is never frozen."""

    def frozen(self, instance_id: InstanceId) -> bool:
        return False

    def can_hibernate(self, instance_id: InstanceId | None = None) -> bool:
        return False

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        raise Unimplemented("kubernetes instances cannot hibernate")

    async def restore(self, instance_id: InstanceId) -> Instance:
        raise Unimplemented("kubernetes instances cannot hibernate")

    def can_checkpoint(self, instance_id: InstanceId) -> bool:
        return False

    def restores_checkpoints(self, backend: str) -> bool:
        return False

    async def checkpoint(self, instance_id: InstanceId, into: Path) -> HibernationImage:
        raise Unimplemented("kubernetes instances cannot take memory snapshots")

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
            instance.detail["uid"] = pod["metadata"].get("uid")  # type: ignore[index]
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
