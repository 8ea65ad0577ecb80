"""What the backends that run instances as process trees on this host share (bwrap, gVisor).

Such a backend gives every instance a uid slot, a workspace attached from the store, cgroups of
its own, a directory `<data>/instances/<id>/` holding the agent's socket, and one host process
whose exit is the instance's end (bwrap: the sandbox's pid 1; gVisor: the sentry). This module
keeps the table of those instances and does everything that does not depend on how a sandbox is
built:

- start: the order around the backend's `_spawn` (readiness on the agent's socket; a start that
  fails is stopped again);
- watching: a pidfd per instance, so that a death is seen at once (`on_exit`), and the wall-clock
  cap;
- stop: kill the tree (cgroup.kill or a sweep), remove the cgroups, detach the workspace (deleting
  it unless kept), undo the backend's own things (`_teardown_steps`), remove the directory;
- `instance.json` records, and the adoption of live instances by a restarted hutch (each backend
  adopts only its own records, so several can share one data directory);
- the warm-pool claim of a workspace, stats;
- the host's disk: no instance starts while the data directory has less than
  `min_free_disk_mb` free (sparse workspaces grow into that room: filling it would make the
  running sandboxes' writes fail), and `broken` names an instance whose workspace failed
  (ext4 turned it read-only after a lost write), which the scheduler then replaces.

It does not know how a sandbox is built: `_spawn` in `bwrap.py` and `gvisor.py` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hutch.errors import FailedPrecondition, HutchError, IsolationError, Unavailable, Unimplemented
from hutch.runtime.base import (
    HibernationImage,
    Instance,
    InstanceSpec,
    InstanceState,
    InstanceStats,
    InstanceTable,
    Resources,
    RootFS,
)
from hutch.runtime.cgroups import Cgroup, CgroupManager
from hutch.runtime.channel import AgentChannel
from hutch.runtime.hostfs import AGENT_LIB, SANDBOX_HOME, HostView, site_packages
from hutch.runtime.keeper import (
    WARM_LEASE_S,
    ensure_keeper,
    hold_serve_lock,
    release_serve_lock,
    stop_keeper,
    write_deadline,
)
from hutch.runtime.network import NETNS_DIR, Networking, NetworkLayout, egress_policy, layout_for
from hutch.runtime.rootfs import (
    CA_ENV,
    MOUNT_POINTS,
    SANDBOX_PATH,
    AgentRuntime,
    linked_mount_points,
    unmount_layers,
)
from hutch.runtime.userns import UidSlots
from hutch.storage.base import WorkspaceStore
from hutch.types import InstanceId

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0
MIN_FREE_DISK_MB = 128  # kept free on the data directory's disk for the workspaces of running instances
INSTANCE_WORKSPACE_PREFIX = "_instances/"  # workspaces no session has claimed yet
AGENT_LOG = "/tmp/.hutch-agent.log"  # inside the sandbox


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()


def pid_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def still_running(pid: int, start_time: int) -> bool:
    """The process that started at `start_time` still runs: not gone, not recycled, not a zombie
    (gVisor's sentry is not our child: it stays a zombie until the host's init reaps it)."""
    fields = _stat_fields(pid)
    return fields is not None and int(fields[19]) == start_time and fields[0] not in (b"Z", b"X")


def short_hash(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]


def agent_config(host: HostView, spec: InstanceSpec) -> dict:
    """The part of the agent's boot configuration (`HUTCH_AGENT`) that every backend gives."""
    return {
        "home": SANDBOX_HOME,
        "user": "user",
        "env": {"PATH": host.path_env, **spec.env},
        "python_path": site_packages(),
        "kernel_python": host.python,
        "prestart_kernel": spec.prestart_kernel,
        "log_path": AGENT_LOG,
    }


def agent_command(host: HostView) -> list[str]:
    """The command line of the agent, on hutch's own interpreter, from its read-only package."""
    return [
        host.python, "-I", "-S", "-B", "-c",
        f"import sys; sys.path.insert(0, {AGENT_LIB!r}); from hutch.agent.main import main; main([])",
    ]  # fmt: skip


def read_error(fd: int) -> str:
    """What a failed set-up wrote to `fd`, a pipe or a file (non-blocking; empty when nothing)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536).decode(errors="replace").strip()
    except BlockingIOError:
        return ""


def stray_processes(instances_dir: Path, live: set[str]) -> list[tuple[int, str]]:
    """(pid, instance id) of the processes whose command line names the directory of an
    instance that is not live: a sandbox whose start a crash of hutch cut before it joined its
    cgroups (bwrap names its binds there), which the cgroup sweep cannot see."""
    marker = os.fsencode(str(instances_dir)) + b"/"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue  # gone meanwhile
        if marker not in cmdline:
            continue
        after = cmdline.split(marker)[1:]  # what follows each mention: "<instance id>/..."
        named = {part.split(b"/", 1)[0].split(b"\0", 1)[0].decode(errors="replace") for part in after}
        if named and not named & live:
            found.append((int(entry.name), min(named)))
    return found


@dataclass(frozen=True)
class Prepared:
    """What `LocalRuntime._prepare` made for a starting instance."""

    slot: int
    host_uid: int  # the sandbox user's host uid
    instance_dir: Path
    workspace: str
    workspace_path: Path


def undo_all(undo: list[Callable[[], object]]) -> None:
    """Undo the steps of a start that failed, last first, carrying on past failures."""
    for step in reversed(undo):
        try:
            step()
        except Exception:
            log.exception("cleanup after a failed start")


class _Watch:
    """Host-side state of a running instance that is not persisted."""

    def __init__(self, pidfd: int, popen: subprocess.Popen | None, reap: int | None = None) -> None:
        self.pidfd = pidfd
        self.popen = popen  # the launcher when we started it and it lives on (to reap it)
        self.reap = reap  # a pid 1 that is our own child (restored by CRIU): reaped at its exit
        self.exited = asyncio.Event()
        self.stopping = False
        self.lifetime_timer: asyncio.TimerHandle | None = None


class LocalRuntime(InstanceTable):
    """The shared part of `BwrapRuntime` and `GVisorRuntime` (see the module docstring)."""

    name = ""
    supports_network = False  # whether instances can get a namespace of their own behind the egress proxy
    min_free_disk_mb = MIN_FREE_DISK_MB
    warm_lease_s = WARM_LEASE_S  # how long a warm instance outlives the last hutch (the keeper)

    def __init__(
        self,
        data_dir: Path,
        store: WorkspaceStore,
        uid_slots: UidSlots | None = None,
        cgroups: CgroupManager | None = None,
        networking: Networking | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.instances_dir = self.data_dir / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.instances_dir, 0o755)
        # While we hold it, the keeper leaves the directory's leftovers to us (and no `hutch
        # cleanup` runs); until `close`.
        hold_serve_lock(self.data_dir)
        self._holds_lock = True
        self.store = store
        self.uid_slots = uid_slots or UidSlots()
        self.cgroups = cgroups or CgroupManager(group_name=f"hutch-{short_hash(self.data_dir)}")
        self.host = HostView(self.data_dir)
        self._instances: dict[InstanceId, Instance] = {}
        self._watches: dict[InstanceId, _Watch] = {}
        self._spawning: set[asyncio.Future] = set()  # spawns running in worker threads
        self._discarding: set[asyncio.Task] = set()  # stops of instances whose start was cancelled
        self.on_exit: Callable[[Instance], None] | None = None  # an instance died on its own
        # Instances with a network (a namespace, a veth, the egress proxy); shared by the backends
        # of one server, made on first use when not given.
        self.networking = networking
        self._agent_runtime: AgentRuntime | None = None  # made on the first start from a template
        self.sudo_shim = self.data_dir / "agent" / "sudo"

    # -- what a backend provides ----------------------------------------------------------------

    def _spawn(self, spec: InstanceSpec) -> tuple[Instance, subprocess.Popen | None, int]:
        """Build and launch the sandbox (in a worker thread): the instance, recorded with its
        host pid; the launcher to reap when the instance ends, if it lives that long; and the
        read end of a pipe where a failed start leaves its reason. Undoes itself on failure."""
        raise NotImplementedError

    def _teardown_steps(self, instance: Instance) -> list[Callable[[], None]]:
        """What to undo at stop besides cgroups, workspace and the instance's directory."""
        return []

    def _ready(self, instance: Instance) -> None:
        """The agent answered, and no user code has run yet: the last moment to lock the sandbox
        out of anything the host will go on trusting (gVisor: the run directory)."""

    # -- a template's root file system ---------------------------------------------------------

    @property
    def agent_runtime(self) -> AgentRuntime:
        """hutch's interpreter as template instances see it, and their `sudo` (written once)."""
        if self._agent_runtime is None:
            self._agent_runtime = AgentRuntime(self.host)
            shim = self.sudo_shim
            shim.parent.mkdir(mode=0o755, exist_ok=True)
            shim.write_text(self._agent_runtime.sudo_script())
            shim.chmod(0o755)
        return self._agent_runtime

    def _check_mount_points(self, spec: InstanceSpec, workspace_path: Path) -> None:
        """Refuse a root file system that has a link where a sandbox mounts (`MOUNT_POINTS`,
        `linked_mount_points`): in the template's layers, or in the session's upper layer. Every
        backend's and network setting's mount points are checked, so that an upper layer made
        without a network cannot plant a link for a later instance with one."""
        assert spec.rootfs is not None
        points = set(MOUNT_POINTS)
        # Named by layer id, never by host path: the message reaches the tenant.
        trees = {"the session's own changes": workspace_path / "upper"}
        trees |= {f"layer {Path(layer).name[:12]}": Path(layer) for layer in spec.rootfs.layer_paths}
        linked = linked_mount_points(trees, sorted(points))
        if linked:
            raise FailedPrecondition(
                f"template {spec.rootfs.template!r}: a symbolic link where the sandbox mounts hutch's files, "
                f"refused: {'; '.join(linked)}"
            )

    def _rootfs_agent_config(self, spec: InstanceSpec) -> dict:
        """The agent's boot configuration for a template: root inside, the template's defaults."""
        rootfs = spec.rootfs
        assert rootfs is not None
        return {
            "home": SANDBOX_HOME,
            "user": rootfs.user,
            "workdir": rootfs.workdir,
            "rootful": True,
            "env": {"PATH": SANDBOX_PATH, **CA_ENV, **spec.env},
            "python_path": self.agent_runtime.python_path,
            "kernel_python": "/usr/bin/python3",
        }

    # -- queries -------------------------------------------------------------------------------

    def channel(self, instance_id: InstanceId) -> AgentChannel:
        return AgentChannel(self.get(instance_id).socket_path)

    def free_disk_mb(self) -> int:
        """Free space on the data directory's disk (what root may use)."""
        st = os.statvfs(self.data_dir)
        return st.f_bfree * st.f_frsize // (1024 * 1024)

    def disk_room(self) -> bool:
        """Whether the data directory's disk has the room a new instance may start with."""
        return self.free_disk_mb() >= self.min_free_disk_mb

    def broken(self, instance_id: InstanceId) -> str | None:
        """Why a running instance can no longer work, or None (cheap: a few system calls)."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.state != InstanceState.RUNNING:
            return None
        failed = getattr(self.store, "failed", None)
        if failed is not None and failed(instance.workspace_path):
            return "its workspace's file system failed (a write to it was lost: was the host's disk full?)"
        return None

    async def stats(self, instance_id: InstanceId) -> InstanceStats:
        instance = self.get(instance_id)
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        cpu_s, memory, peak, pids = cgroup.stats()
        disk = await asyncio.to_thread(self.store.usage_bytes, instance.workspace, instance.workspace_path)
        return InstanceStats(cpu_s, memory, peak, pids, disk)

    # -- start ---------------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> Instance:
        if spec.backend != self.name:
            raise IsolationError(f"the {self.name} runtime cannot start a {spec.backend} instance")
        if spec.network is not None:
            if not self.supports_network:
                raise Unimplemented(f"the {self.name} backend runs instances with loopback only (no network policy)")
            egress_policy(spec.network)  # a malformed policy fails here, before anything is made
            await self.ensure_networking()
        if spec.instance_id in self._instances:
            raise IsolationError(f"instance {spec.instance_id} already exists")
        free = self.free_disk_mb()
        if free < self.min_free_disk_mb:
            raise Unavailable(
                f"the disk of hutch's data directory has {free} MB free, less than the "
                f"{self.min_free_disk_mb} MB kept for running sandboxes: no new instance until space is freed"
            )
        loop = asyncio.get_running_loop()
        spawning = loop.run_in_executor(None, self._spawn, spec)
        self._spawning.add(spawning)
        spawning.add_done_callback(self._spawning.discard)
        try:
            instance, popen, stderr_r = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # The caller gave up (shutdown), but the spawn goes on in its thread: stop what it
            # makes as soon as it is made, or the sandbox would run on with nobody knowing it.
            spawning.add_done_callback(lambda done: self._discard(loop, done))
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Unavailable(f"the disk of hutch's data directory is full: {exc}") from exc
            raise
        self._instances[spec.instance_id] = instance
        # No launcher: pid 1 may be our own child (restored by CRIU), reaped at its exit.
        self._watch(instance, popen, reap=popen is None)
        try:
            await self._wait_ready(instance, stderr_r)
            self._ready(instance)
        except BaseException:
            await self.stop(spec.instance_id)
            raise
        finally:
            os.close(stderr_r)
        instance.state = InstanceState.RUNNING
        self._save(instance)
        return instance

    def _discard(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        """Stop an instance whose start was cancelled while its spawn was running."""
        if done.cancelled() or done.exception() is not None:
            return  # the spawn undid itself
        instance, popen, stderr_r = done.result()
        os.close(stderr_r)
        self._instances[instance.instance_id] = instance
        self._watch(instance, popen)
        task = loop.create_task(self.stop(instance.instance_id))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    def default_layout(self) -> NetworkLayout:
        return layout_for(self.data_dir)

    async def ensure_networking(self) -> Networking:
        if self.networking is None:
            self.networking = Networking(self.default_layout())
        await self.networking.start()
        return self.networking

    def _attach_network(self, spec: InstanceSpec, prepared: Prepared, undo: list) -> Path | None:
        """For an instance with a network: its namespace (returned) and a resolv.conf pointing at
        the egress DNS forwarder, written into its directory (bound over /etc/resolv.conf)."""
        if spec.network is None:
            return None
        assert self.networking is not None
        addresses = self.networking.attach(prepared.slot, spec.network)
        undo.append(lambda: self.networking.detach(prepared.slot))
        (prepared.instance_dir / "resolv.conf").write_text(f"nameserver {self.networking.layout.dns_address}\n")
        return NETNS_DIR / addresses.netns

    def set_deadline(self, instance_id: InstanceId, at: float | None) -> None:
        """When the instance ends, hutch alive or not (`hutch.runtime.keeper`); None: warm."""
        self.get(instance_id)
        write_deadline(self.instances_dir / instance_id, at, self.warm_lease_s)

    async def freeze(self, instance_id: InstanceId) -> None:
        cgroup = self._running_cgroup(instance_id)
        if not cgroup.can_freeze():
            raise Unimplemented("this host's cgroups have no freezer: sessions cannot sleep")
        await asyncio.to_thread(cgroup.freeze)

    async def thaw(self, instance_id: InstanceId) -> None:
        await asyncio.to_thread(self._running_cgroup(instance_id).thaw)

    def frozen(self, instance_id: InstanceId) -> bool:
        try:
            return self._running_cgroup(instance_id).frozen()
        except (HutchError, OSError):
            return False

    def _adopt_hibernated(self, instance: Instance) -> None:
        """Make a hibernated instance found at start what its record says (the backend's own)."""

    def can_hibernate(self, instance_id: InstanceId | None = None) -> bool:
        return False

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        raise Unimplemented(f"the {self.name} backend cannot hibernate instances")

    async def restore(self, instance_id: InstanceId) -> Instance:
        raise Unimplemented(f"the {self.name} backend cannot hibernate instances")

    def can_checkpoint(self, instance_id: InstanceId) -> bool:
        return False

    def restores_checkpoints(self, backend: str) -> bool:
        return False

    async def checkpoint(self, instance_id: InstanceId, into: Path) -> HibernationImage:
        raise Unimplemented(f"the {self.name} backend cannot take memory snapshots")

    def _running_cgroup(self, instance_id: InstanceId) -> Cgroup:
        instance = self.get(instance_id)
        if instance.state != InstanceState.RUNNING:
            raise FailedPrecondition(f"instance {instance_id} is {instance.state.value}")
        return Cgroup.from_dict(instance.detail["cgroup"])

    async def set_network(self, instance_id: InstanceId, policy: dict) -> None:
        instance = self.get(instance_id)
        if instance.spec.network is None:
            raise FailedPrecondition(
                f"instance {instance_id} was started without a network; its policy cannot be changed"
            )
        egress_policy(policy)
        instance.spec = dataclasses.replace(instance.spec, network=dict(policy))
        self._save(instance)
        await self.ensure_networking()
        self.networking.set_policy(instance.detail["slot"], instance.spec.network)  # type: ignore[arg-type,union-attr]

    def _prepare(self, spec: InstanceSpec, undo: list[Callable[[], object]]) -> Prepared:
        """The first steps of every start: a uid slot, the instance's directory (with `run/` for
        the agent's socket) and the workspace, owned by the slot's sandbox uid. Each step pushes
        its undo on `undo`."""
        workspace = spec.workspace or f"{INSTANCE_WORKSPACE_PREFIX}{spec.instance_id}"
        slot = self.uid_slots.acquire(self._preferred_slot(workspace))
        undo.append(lambda: self.uid_slots.release(slot))
        host_uid = self.uid_slots.sandbox_uid(slot)
        instance_dir = self.instances_dir / spec.instance_id
        instance_dir.mkdir(mode=0o755)
        undo.append(lambda: shutil.rmtree(instance_dir, ignore_errors=True))
        # Before anything runs: no instance without a deadline (warm until a session binds it),
        # kept by the data directory's keeper whether or not hutch lives on.
        write_deadline(instance_dir, None, self.warm_lease_s)
        ensure_keeper(self.data_dir)
        (instance_dir / "run").mkdir(mode=0o755)
        # A root file system's upper layer keeps its inside owners on disk (root is 0) and reaches
        # the instance idmapped: the store must not give the tree to the sandbox uid.
        owner = 0 if spec.rootfs is not None else host_uid
        workspace_path = self.store.attach(workspace, owner, spec.resources.disk_mb)
        undo.append(lambda: self.store.detach(workspace, workspace_path))
        if workspace.startswith(INSTANCE_WORKSPACE_PREFIX):
            undo.append(lambda: self.store.delete(workspace))
        return Prepared(slot, host_uid, instance_dir, workspace, workspace_path)

    def _record(self, spec: InstanceSpec, prepared: Prepared, pid: int, detail: dict) -> Instance:
        """The new instance, saved to its `instance.json` (`detail` needs "cgroup")."""
        instance = self._new_instance(spec, prepared, pid, detail)
        self._save(instance)
        return instance

    def _new_instance(self, spec: InstanceSpec, prepared: Prepared, pid: int | None, detail: dict) -> Instance:
        """The new instance, not saved yet (`pid` None: it has no process yet)."""
        return Instance(
            instance_id=spec.instance_id,
            backend=self.name,
            socket_path=prepared.instance_dir / "run" / "agent.sock",
            workspace=prepared.workspace,
            workspace_path=prepared.workspace_path,
            host_uid=prepared.host_uid,
            pid=pid or 0,
            pid_start_time=(pid_start_time(pid) or 0) if pid else 0,
            started_at=time.time(),
            spec=spec,
            detail={"slot": prepared.slot, **detail},
        )

    def _preferred_slot(self, workspace: str) -> int | None:
        """Re-use the uid the workspace already belongs to, to spare a chown of the whole tree."""
        uid = self.store_owner(workspace)
        return self.uid_slots.slot_of_uid(uid) if uid is not None else None

    def store_owner(self, workspace: str) -> int | None:
        owner = getattr(self.store, "owner_uid", None)
        return owner(workspace) if owner else None

    async def _wait_ready(self, instance: Instance, stderr_r: int) -> None:
        channel = AgentChannel(instance.socket_path)
        watch = self._watches[instance.instance_id]
        try:
            health = asyncio.ensure_future(channel.wait_healthy(READY_TIMEOUT))
            exited = asyncio.ensure_future(watch.exited.wait())
            done, _ = await asyncio.wait({health, exited}, return_when=asyncio.FIRST_COMPLETED)
            if health in done:
                exited.cancel()
                health.result()
                return
            health.cancel()
            message = read_error(stderr_r)
            raise IsolationError(f"instance {instance.instance_id} died while starting: {message or 'no output'}")
        finally:
            await channel.aclose()

    # -- after a restore (hibernation) ---------------------------------------------------------

    async def _back_to_hibernated(
        self, instance: Instance, end: Callable[[], object], after: Callable[[], object] | None = None
    ) -> None:
        """A restored instance that did not come up: `end` it (then `after`, once its pid 1 is
        gone) and record it hibernated again; its image is intact, and a later restore may work."""
        watch = self._watches.pop(instance.instance_id, None)
        if watch is not None:
            watch.stopping = True
        await asyncio.to_thread(end)
        if watch is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.exited.wait(), 5)
        if after is not None:
            await asyncio.to_thread(after)
        instance.state = InstanceState.HIBERNATED
        self._save(instance)

    async def _restored(self, instance: Instance, images: Path) -> Instance:
        """A restored instance that came up: recorded running, and its image (the directory
        `images`) deleted, stale now that it runs on: never to be restored again."""
        instance.state = InstanceState.RUNNING
        self._save(instance)
        await asyncio.to_thread(shutil.rmtree, images, True)
        return instance

    # -- watching ------------------------------------------------------------------------------

    def _watch(self, instance: Instance, popen: subprocess.Popen | None, reap: bool = False) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(instance.pid)
        except ProcessLookupError:
            pidfd = -1
        watch = _Watch(pidfd, popen, instance.pid if reap else None)
        self._watches[instance.instance_id] = watch
        if pidfd < 0:
            watch.exited.set()
            return
        loop.add_reader(pidfd, self._on_exit, instance.instance_id)
        lifetime = instance.spec.resources.max_lifetime_s
        if lifetime is not None:
            remaining = max(0.0, instance.started_at + lifetime - time.time())
            watch.lifetime_timer = loop.call_later(remaining, self._kill_for_lifetime, instance.instance_id)

    def _on_exit(self, instance_id: InstanceId) -> None:
        watch = self._watches.get(instance_id)
        if watch is None:
            return
        asyncio.get_running_loop().remove_reader(watch.pidfd)
        os.close(watch.pidfd)
        watch.pidfd = -1
        if watch.popen is not None:
            # The launcher exits with the instance; reap it so it does not linger as a zombie.
            with contextlib.suppress(subprocess.TimeoutExpired):
                watch.popen.wait(timeout=1)
        if watch.reap is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(watch.reap, os.WNOHANG)
        if watch.lifetime_timer is not None:
            watch.lifetime_timer.cancel()
        watch.exited.set()
        instance = self._instances.get(instance_id)
        if instance is not None and not watch.stopping:
            instance.state = InstanceState.CRASHED
            log.warning("instance %s exited on its own", instance_id)
            if self.on_exit is not None:
                self.on_exit(instance)

    async def kill(self, instance_id: InstanceId) -> None:
        """End an instance that stopped working as if it had crashed (e.g. its agent died and its
        pid 1 lives on): `on_exit` reports it, and `stop` cleans up later. Returns once the exit
        was seen (at most 5 s)."""
        instance = self.get(instance_id)
        watch = self._watches.get(instance_id)
        log.warning("instance %s stopped working: killing it", instance_id)
        await asyncio.to_thread(self._kill, instance, Cgroup.from_dict(instance.detail["cgroup"]))
        if watch is not None:
            try:
                await asyncio.wait_for(watch.exited.wait(), 5)
            except TimeoutError:
                log.error("instance %s did not exit after SIGKILL", instance_id)

    async def halt(self, instance_id: InstanceId) -> None:
        instance = self.get(instance_id)
        watch = self._watches.get(instance_id)
        if watch is not None:
            watch.stopping = True  # ended on purpose: no crash to report
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        await asyncio.to_thread(self._kill, instance, cgroup)
        if watch is not None:
            try:
                await asyncio.wait_for(watch.exited.wait(), 5)
            except TimeoutError:
                raise IsolationError(f"instance {instance_id} did not exit after SIGKILL") from None
        # gVisor: the sentry's exit leaves its gofer and ptrace stubs a moment more to go.
        deadline = time.monotonic() + 5
        while cgroup.procs():
            if time.monotonic() > deadline:
                raise IsolationError(f"instance {instance_id}: processes left after SIGKILL: {cgroup.procs()}")
            await asyncio.sleep(0.01)

    def _kill_for_lifetime(self, instance_id: InstanceId) -> None:
        instance = self._instances.get(instance_id)
        if instance is not None:
            log.info("instance %s reached its wall-clock cap", instance_id)
            Cgroup.from_dict(instance.detail["cgroup"]).kill_all()
            with contextlib.suppress(ProcessLookupError):
                os.kill(instance.pid, signal.SIGKILL)

    # -- stop ----------------------------------------------------------------------------------

    async def stop(self, instance_id: InstanceId, keep_workspace: bool = False) -> None:
        instance = self.get(instance_id)
        watch = self._watches.get(instance_id)
        if watch is not None:
            watch.stopping = True
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        await asyncio.to_thread(self._kill, instance, cgroup)
        if watch is not None:
            try:
                await asyncio.wait_for(watch.exited.wait(), 5)
            except TimeoutError:
                log.error("instance %s did not exit after SIGKILL", instance_id)
        await asyncio.to_thread(self._cleanup, instance, cgroup, keep_workspace)
        instance.state = InstanceState.STOPPED
        self._instances.pop(instance_id, None)
        self._watches.pop(instance_id, None)

    @staticmethod
    def _kill(instance: Instance, cgroup: Cgroup) -> None:
        if still_running(instance.pid, instance.pid_start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(instance.pid, signal.SIGKILL)  # bwrap: pid 1 of its namespace takes all with it
        cgroup.kill_all()

    def _detach_network(self, instance: Instance) -> None:
        if instance.spec.network is None:
            return
        networking = self.networking or Networking(self.default_layout())
        networking.detach(instance.detail["slot"])

    def _cleanup(self, instance: Instance, cgroup: Cgroup, keep_workspace: bool) -> None:
        errors = []
        for step in (
            cgroup.remove,
            # Before the workspace goes: the upper layer is mounted from it.
            lambda: unmount_layers(self.instances_dir / instance.instance_id),
            lambda: self.store.detach(instance.workspace, instance.workspace_path),
            lambda: None if keep_workspace else self.store.delete(instance.workspace),
            *self._teardown_steps(instance),
            lambda: self._detach_network(instance),
            lambda: shutil.rmtree(self.instances_dir / instance.instance_id, ignore_errors=True),
        ):
            try:
                step()
            except HutchError as exc:
                errors.append(str(exc))
        self.uid_slots.release(instance.detail["slot"])
        if errors:
            raise IsolationError("; ".join(errors))

    async def claim_workspace(self, instance_id: InstanceId, key: str) -> None:
        """Give a running instance's fresh workspace a session's key (warm-pool claim)."""
        instance = self.get(instance_id)
        if instance.workspace == key:
            return
        moved = await asyncio.to_thread(self.store.rename, instance.workspace, key, instance.workspace_path)
        instance.workspace = key
        instance.workspace_path = moved or instance.workspace_path
        self._save(instance)

    # -- persistence and adoption --------------------------------------------------------------

    @staticmethod
    def _load(path: Path) -> Instance:
        record = json.loads(path.read_text())
        spec = record["spec"]
        spec["resources"] = Resources(**spec["resources"])
        if not isinstance(spec.get("network"), dict):
            spec["network"] = None  # records from before networks were policies
        if spec.get("rootfs") is not None:
            spec["rootfs"] = RootFS.from_dict(spec["rootfs"])
        record["spec"] = InstanceSpec(**spec)
        record["socket_path"] = Path(record["socket_path"])
        record["workspace_path"] = Path(record["workspace_path"])
        record["state"] = InstanceState(record["state"])
        return Instance(**record)

    async def adopt_running(self) -> list[Instance]:
        adopted = []
        for record_path in sorted(self.instances_dir.glob("*/instance.json")):
            try:
                instance = self._load(record_path)
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("unreadable instance record %s: removing the directory", record_path)
                shutil.rmtree(record_path.parent, ignore_errors=True)
                continue
            if instance.backend != self.name or instance.instance_id in self._instances:
                continue  # another backend's, or ours already
            self.uid_slots.claim(instance.detail["slot"])
            if instance.state == InstanceState.HIBERNATED:
                # Nothing of it runs: its image and workspace wait for `restore`.
                await asyncio.to_thread(self._adopt_hibernated, instance)
                self._instances[instance.instance_id] = instance
                adopted.append(instance)
                continue
            if still_running(instance.pid, instance.pid_start_time) and instance.state == InstanceState.RUNNING:
                self._instances[instance.instance_id] = instance
                self._watch(instance, None)
                if instance.spec.network is not None:
                    networking = await self.ensure_networking()  # the proxy died with the old hutch
                    networking.set_policy(instance.detail["slot"], instance.spec.network)
                adopted.append(instance)
                continue
            # Dead while hutch was away: clean up, keeping any workspace a session claimed.
            cgroup = Cgroup.from_dict(instance.detail["cgroup"])
            await asyncio.to_thread(self._kill, instance, cgroup)
            keep = not instance.workspace.startswith(INSTANCE_WORKSPACE_PREFIX)
            try:
                await asyncio.to_thread(self._cleanup, instance, cgroup, keep)
            except IsolationError as exc:
                log.error("cleanup of dead instance %s: %s", instance.instance_id, exc)
        return adopted

    def sweep_orphans(self, live: set[str]) -> list[str]:
        """Remove what a crash of hutch in the middle of a start or stop can leave behind: instance
        directories without a record, cgroups, workspace mounts and unclaimed workspaces that no
        live instance (`live`: ids of every backend on this data directory) owns. Returns what
        was removed."""
        removed = []
        for pid, instance_id in stray_processes(self.instances_dir, live):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"process {pid} of {instance_id}")
        for directory in self.instances_dir.iterdir():
            if directory.name in live or (directory / "instance.json").exists():
                continue
            for mount in _mounts_below(directory):
                subprocess.run(["umount", "--lazy", mount], capture_output=True)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(f"instance directory {directory.name}")
        for name in self.cgroups.children():
            if name not in live:
                cgroup = self.cgroups.open(name)
                cgroup.kill_all()
                try:
                    cgroup.remove()
                    removed.append(f"cgroups of {name}")
                except IsolationError as exc:
                    log.error("stray cgroups of %s: %s", name, exc)
        # Every backend's live instances, not only ours: they share the store and the networks.
        live_slots = set()
        live_paths = {str(i.workspace_path) for i in self._instances.values()}
        for record in self.instances_dir.glob("*/instance.json"):
            if record.parent.name in live:
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    saved = json.loads(record.read_text())
                    live_paths.add(str(saved["workspace_path"]))
                    live_slots.add(saved["detail"]["slot"])
        networking = self.networking or Networking(self.default_layout())
        removed += networking.sweep(live_slots)
        sweep = getattr(self.store, "sweep", None)
        if sweep is not None:
            removed += sweep(live_paths, {f"{INSTANCE_WORKSPACE_PREFIX}{i}" for i in live})
        if removed:
            log.warning("removed leftovers of an earlier crash: %s", ", ".join(removed))
        return removed

    async def close(self, unstage: bool = False) -> None:
        """Stop watching; instances keep running. `unstage`: also unmount the staged host binds and
        remove hutch's (empty) cgroup parents, for a runtime that is going away for good."""
        # Starts cancelled by a shutdown finish their spawn and then stop what they made.
        await asyncio.gather(*self._spawning, return_exceptions=True)
        await asyncio.gather(*self._discarding, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for watch in self._watches.values():
            if watch.pidfd >= 0:
                loop.remove_reader(watch.pidfd)
                os.close(watch.pidfd)
                watch.pidfd = -1
            if watch.lifetime_timer is not None:
                watch.lifetime_timer.cancel()
        self._watches.clear()
        self._instances.clear()
        if self.networking is not None:
            # The proxy goes with hutch (sandboxes' connections fail until it is back); the host
            # rules stay for a restart unless the runtime goes away for good.
            await self.networking.close(remove_rules=unstage)
        if self._holds_lock:
            release_serve_lock(self.data_dir)
            self._holds_lock = False
        if unstage:
            self.host.unstage()
            self.cgroups.remove_parents()
            if not any(self.instances_dir.glob("*/instance.json")):
                await asyncio.to_thread(stop_keeper, self.data_dir)  # nothing left to keep


def _mounts_below(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    return sorted((p for p in points if p.startswith(prefix)), reverse=True)  # deepest first
