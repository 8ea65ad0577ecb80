"""The contract of an isolation backend: start, stop, status, stats, and the channel to the agent.

A backend turns an `InstanceSpec` into a running, isolated instance whose only connection to the
host is the agent's Unix socket (`Instance.socket_path`). Everything above (scheduler, gateway)
talks to instances through that socket and never knows which backend made them.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hutch.errors import NotFound
from hutch.types import InstanceId

if TYPE_CHECKING:
    from collections.abc import Callable

    from hutch.storage.base import WorkspaceStore


@dataclass(frozen=True)
class Resources:
    """Limits of one instance. Enforced by the backend, not by the agent."""

    cpu: float = 1.0  # vCPUs (CFS quota)
    memory_mb: int = 512  # the instance is OOM-killed inside its cgroup beyond this
    pids: int = 256  # processes + threads; fork bombs stop here
    disk_mb: int = 1024  # the workspace; 0 means an unlimited plain directory
    tmp_mb: int = 64  # the private /tmp (tmpfs, counted in memory too)
    nofile: int = 1024  # open files per process
    max_lifetime_s: float | None = None  # wall-clock cap: killed when it runs out

    def __post_init__(self) -> None:
        if self.cpu <= 0 or self.memory_mb < 16 or self.pids < 8 or self.tmp_mb < 1 or self.nofile < 64:
            raise ValueError(f"resources out of range: {self}")
        if self.disk_mb < 0 or (self.max_lifetime_s is not None and self.max_lifetime_s <= 0):
            raise ValueError(f"resources out of range: {self}")


@dataclass(frozen=True)
class RootFS:
    """What an instance needs to mount its template: the layer directories (bottom first) and
    the defaults the agent applies. Part of `InstanceSpec`, so it is saved with the instance."""

    template: str
    layer_paths: tuple[str, ...]
    user: str = "user"
    workdir: str = "/home/user"
    start_cmd: str | None = None
    ready_cmd: str | None = None
    # A checkpoint (`Runtime.checkpoint`) that new instances start from instead of booting: a
    # memory snapshot's processes, whose files are in the layers at the same paths (its top one).
    # Or `moved_image(instance_id)`: the hibernation image that instance (of another node) left
    # in the workspace, which this start takes over (a session moving nodes; see `HibernationImage`).
    memory_image: str | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> RootFS:
        return cls(**{**raw, "layer_paths": tuple(raw["layer_paths"])})


@dataclass(frozen=True)
class InstanceSpec:
    instance_id: InstanceId
    resources: Resources = field(default_factory=Resources)
    env: dict[str, str] = field(default_factory=dict)
    # Key of the persistent workspace in the workspace store (see hutch.storage); None: a fresh one
    # named after the instance.
    workspace: str | None = None
    # None: loopback only. Otherwise a namespace with a veth whose every connection goes through
    # the egress proxy under this policy: {"internet": bool, "allow": [...], "deny": [...]}.
    network: dict | None = None
    prestart_kernel: bool = False  # start a Jupyter kernel right after boot (code interpreter)
    backend: str = "bwrap"  # the isolation backend that runs it (`hutch.runtime.BACKENDS`)
    # None: the host's own read-only system (the `host` template). Otherwise the template's
    # layers under an upper layer in the workspace, root inside (`hutch.runtime.rootfs`).
    rootfs: RootFS | None = None


class InstanceState(enum.Enum):
    STARTING = "starting"  # spawned, agent not answering yet
    RUNNING = "running"  # agent answers on its socket
    STOPPED = "stopped"  # stopped on purpose; everything but a kept workspace is gone
    CRASHED = "crashed"  # died on its own (OOM kill of the agent, lifetime cap, killed from outside)
    # Its memory and processes are on disk (`Runtime.hibernate`): nothing of it runs, its
    # workspace is kept; `Runtime.restore` brings it back as it was.
    HIBERNATED = "hibernated"


@dataclass
class Instance:
    """A running instance as its backend knows it. Persisted so a restarted hutch can adopt it."""

    instance_id: InstanceId
    backend: str
    socket_path: Path
    workspace: str
    workspace_path: Path
    host_uid: int  # the unprivileged host uid the sandbox user runs as
    pid: int  # host pid of the instance's first process (its pid 1)
    pid_start_time: int  # from /proc/<pid>/stat, so a recycled pid is never mistaken for it
    started_at: float  # unix time
    spec: InstanceSpec
    state: InstanceState = InstanceState.STARTING
    detail: dict = field(default_factory=dict)  # backend-private (cgroup paths, uid slot, ...)


@dataclass(frozen=True)
class InstanceStats:
    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    pids: int
    workspace_bytes: int


@dataclass(frozen=True)
class HibernationImage:
    """What `Runtime.hibernate` wrote: the instance's whole memory, processes and their state."""

    path: Path  # a root-only directory on the host (the images hold the session's secrets)
    size_bytes: int
    dump_seconds: float
    # In the instance's workspace on a store every node shares: when this node dies, another
    # starts the session's next instance from it (`RootFS.memory_image = moved_image(id)`).
    movable: bool = False


MOVED_IMAGE = "moved:"


def moved_image(instance_id: str) -> str:
    """`RootFS.memory_image` for an instance that takes over the hibernation image `instance_id`
    left in their common workspace (`HibernationImage.movable`)."""
    return MOVED_IMAGE + instance_id


class InstanceTable:
    """The queries every backend answers from its table of instances (the one source of which
    instances a backend holds); backends fill `_instances`."""

    _instances: dict[InstanceId, Instance]
    instances_dir: Path  # <data>/instances: a directory per instance

    def _save(self, instance: Instance) -> None:
        """`<instances_dir>/<id>/instance.json`, written whole or not at all: how any backend finds
        the instance again after a restart (`adopt_running`)."""
        record = asdict(instance)
        record["socket_path"] = str(instance.socket_path)
        record["workspace_path"] = str(instance.workspace_path)
        record["state"] = instance.state.value
        path = self.instances_dir / instance.instance_id / "instance.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.rename(path)

    def get(self, instance_id: InstanceId) -> Instance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise NotFound(f"instance {instance_id} not found") from None

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def has(self, instance_id: str) -> bool:
        return instance_id in self._instances

    def is_running(self, instance_id: InstanceId) -> bool:
        """On every proxied request: a dict lookup, no system call."""
        instance = self._instances.get(instance_id)
        return instance is not None and instance.state == InstanceState.RUNNING

    async def status(self, instance_id: InstanceId) -> InstanceState:
        return self.get(instance_id).state


class Runtime(Protocol):
    """An isolation backend. Implementations: `hutch.runtime.bwrap.BwrapRuntime`,
    `hutch.runtime.gvisor.GVisorRuntime` (by name: `hutch.runtime.make_runtime`), and
    `hutch.runtime.multi.MultiRuntime`, which holds one of each in use."""

    name: str
    store: WorkspaceStore
    on_exit: Callable[[Instance], None] | None  # called when an instance dies on its own

    async def start(self, spec: InstanceSpec) -> Instance:
        """Start an instance and return once its agent answers `/health`.

        Raises:
            IsolationError: the sandbox could not be set up.
            CapacityError: no uid slot or resources left on this host.
        """
        ...

    async def stop(self, instance_id: InstanceId, keep_workspace: bool = False) -> None:
        """Kill the whole tree, remove its cgroups and private files; keep the workspace if asked."""
        ...

    async def kill(self, instance_id: InstanceId) -> None:
        """End an instance that stopped working as if it had crashed (its death is reported through
        `on_exit`, its workspace and records stay for `stop`); returns once its exit was seen."""
        ...

    async def halt(self, instance_id: InstanceId) -> None:
        """Kill every process of the instance and keep the rest (its workspace stays attached, no
        crash is reported) until `stop`: what it wrote can then be read with nothing of it left
        to change the files under the reader; returns once its exit was seen.

        Raises:
            Unimplemented: this backend keeps nothing of an instance without its processes.
        """
        ...

    def broken(self, instance_id: InstanceId) -> str | None:
        """Why a running instance can no longer work (e.g. its workspace failed), or None; cheap."""
        ...

    def disk_room(self) -> bool:
        """Whether the host has the disk a new instance needs (else `start` raises Unavailable)."""
        ...

    async def status(self, instance_id: InstanceId) -> InstanceState: ...

    async def stats(self, instance_id: InstanceId) -> InstanceStats: ...

    def get(self, instance_id: InstanceId) -> Instance:
        """The instance, or `NotFound`."""
        ...

    def instances(self) -> list[Instance]: ...

    def is_running(self, instance_id: InstanceId) -> bool:
        """Whether the instance is known and its agent answered (a lookup, no system call)."""
        ...

    def has(self, instance_id: str) -> bool:
        """Whether this runtime knows the instance, in any state (a lookup)."""
        ...

    async def claim_workspace(self, instance_id: InstanceId, key: str) -> None:
        """Give a running instance's fresh workspace a session's key (warm-pool claim)."""
        ...

    async def adopt_running(self) -> list[Instance]:
        """After a restart of hutch: take back the instances still alive, clean up the dead."""
        ...

    def set_deadline(self, instance_id: InstanceId, at: float | None) -> None:
        """End the instance at unix time `at` even if hutch is gone by then (None: a warm
        instance, which lives while hutch does and a short lease after). Only the host sets it."""
        ...

    async def freeze(self, instance_id: InstanceId) -> None:
        """Stop every process of the instance where it stands, its memory kept (a sleeping
        session); returns once all are stopped. Requests to it wait until `thaw`.

        Raises:
            Unimplemented: this backend cannot freeze.
            IsolationError: the instance did not freeze (it runs on).
        """
        ...

    async def thaw(self, instance_id: InstanceId) -> None:
        """Let a frozen instance run again (nothing if it is not frozen)."""
        ...

    def frozen(self, instance_id: InstanceId) -> bool:
        """Whether the instance is frozen (read from the host: it survives hutch's restarts)."""
        ...

    def can_hibernate(self, instance_id: InstanceId | None = None) -> bool:
        """Whether this runtime can hibernate instances (None), or this instance (cheap)."""
        ...

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        """Write the instance's memory and processes to disk and end them (frozen or not): it
        then holds no memory and no process, only its workspace and the image. The caller has
        closed its own connections to the agent first.

        Raises:
            Unimplemented: this backend, host or instance cannot hibernate.
            FailedPrecondition: the instance is not running.
            IsolationError: the dump failed; the instance runs on as it was (frozen or not).
        """
        ...

    def can_checkpoint(self, instance_id: InstanceId) -> bool:
        """Whether `checkpoint` can take this instance (cheap)."""
        ...

    def restores_checkpoints(self, backend: str) -> bool:
        """Whether new instances of `backend` can start from a checkpoint (`RootFS.memory_image`);
        where they cannot, such a root file system's files boot afresh."""
        ...

    async def checkpoint(self, instance_id: InstanceId, into: Path) -> HibernationImage:
        """Write the memory and processes of a running instance (frozen or not) into the new
        directory `into` (its parent made root's and 0700) and leave it as it was: a running one
        runs on after a brief stop, a frozen one stays frozen. New instances start from it
        (`RootFS.memory_image`), each with its own identity; their layers must hold the files
        the instance had at that moment (the caller copies its upper layer while it is frozen).
        The caller has closed its own connections to the agent first.

        Raises:
            Unimplemented: this backend, host or instance cannot checkpoint.
            FailedPrecondition: the instance is not running, or `into` exists.
            IsolationError: the dump failed; the instance runs on as it was.
        """
        ...

    async def restore(self, instance_id: InstanceId) -> Instance:
        """Bring a hibernated instance back with its memory, processes and files; returns once
        its agent answers.

        Raises:
            FailedPrecondition: the instance is not hibernated.
            IsolationError: the restore failed; the instance stays hibernated, its image intact.
        """
        ...

    async def set_network(self, instance_id: InstanceId, policy: dict) -> None:
        """Change a networked instance's egress policy; it applies to new connections at once
        and ends open ones it no longer allows."""
        ...

    def sweep_orphans(self, live: set[str]) -> list[str]:
        """Remove leftovers of a crash (directories, cgroups, mounts) no instance in `live` owns."""
        ...

    async def close(self, unstage: bool = False) -> None:
        """Stop watching instances (they keep running; `stop` ends them). `unstage`: the runtime
        goes away for good: also remove what its instances shared on the host."""
        ...
