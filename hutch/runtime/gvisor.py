"""The stronger isolation backend: every instance under gVisor (`runsc`, Debian's package).

User code talks to gVisor's kernel (the sentry, a user-space Go process under a strict seccomp
filter), never to the host's; host files are reached only through the gofer. Behind the same
interface as bwrap, with the same uid slots, workspaces, cgroups, host view, agent and socket
path; stop, watching, records and adoption are shared (`hutch.runtime.local`).

Start of one instance, in order (each step undone if a later one fails):
1. a uid slot, the instance's directory and the workspace, as for bwrap;
2. `<data>/instances/<id>/run/` becomes a 64 KiB tmpfs owned by the sandbox uid (the agent creates
   its socket there, so the sandbox can write to it: a tmpfs keeps that off the host's disk);
3. cgroups under hutch's own, as for bwrap, except pids (below);
4. the OCI bundle: `config.json` in the instance's directory (`hutch.runtime.oci`) over a root of
   empty mount points shared by all instances (`<data>/gvisor/rootfs/`);
5. `sh -c 'echo $$ > <every cgroup.procs>; exec runsc ... run --detach'`: runsc, the gofer and
   the sentry are in the instance's cgroups from their first instruction, and runsc is told to
   leave cgroups alone (`--ignore-cgroups`; with `cgroupsPath` it would make and leave cgroups
   in the hierarchies hutch does not manage). `run --detach` returns once the agent is exec'd;
   the sentry's pid (from `--pid-file`) is the instance's pid, watched with a pidfd. Mounts are
   `--file-access-mounts=exclusive` (gVisor caches what it read: nothing on the host changes
   them while the instance runs; ~10% off a cold start and a process spawn);
6. the agent binds `/run/hutch/agent.sock`; runsc's `--host-uds=create` makes that a real socket
   in the host's run directory (gVisor cannot take a listening fd from the host, so no socket
   activation). We connect once it exists and wait for `/health`.

An instance booting a template (`spec.rootfs`) has the same barrier around a root file system of
its own, as bwrap's template instances (`hutch.runtime.rootfs`):
- its root is the overlay of the template's idmapped layers under the session's upper layer,
  made by hutch (`rootfs.mount_root`: by a helper that is root of the instance's user namespace,
  since host root's overlay cannot write through the idmapped upper layer) and attached at
  `<instance dir>/rootfs/root`, the bundle's writable `root.path`. The gofer, root of the OCI user
  namespace (the slot's base uid), serves it as root inside; on disk files keep their inside
  owners, so a workspace's upper layer is the same under either backend;
- a read-only layer of empty mount points (`<data>/gvisor/points/`) goes on top of the template's:
  runsc's gofer makes a bind's mount point in the root before mounting it, which would otherwise
  write `/opt/hutch/...`, `/run/hutch` and `/etc/ld.so.preload` into the session's upper layer;
- the process starts as root inside with a container's capabilities (bounding set included) and
  stays root: the agent acts per request as its user, and `sudo` is hutch's, as under bwrap. gVisor
  has no setfsuid, so the agent takes the user's ids per thread instead (`hutch.agent.users`).
  gVisor lets root inside kill its pid 1, which ends the instance: root may halt its own machine,
  and the session's next request starts another on its workspace;
- a link where it mounts is refused as under bwrap (the gofer resolves mount points inside the
  root, but a template and an upper layer are then accepted by both backends alike).

Hibernation (`runsc checkpoint` / `runsc restore`, every instance, template or host view): the
sentry saves the whole sandbox into one `checkpoint.img` in `<instance dir>/hibernation/image/`
(root's, 0700: it holds the session's memory; it goes with the directory), and the container
stops; its cgroups (the sentry, gofer and stubs) are removed and runsc's state with them. Run
directory, workspace and a template's overlay stay mounted for the restore, which runs a new
sentry from the image in new cgroups. What this runsc (2022-12-19) needs, and how it is met:
- It cannot save a host socket ("Cannot save endpoint with bound host socket"), and the agent's
  socket and every connection hutch made to it are ones (`--host-uds=create`). Before the
  checkpoint hutch asks the agent to let go of them (`POST /_hutch/release`, answered once the
  listener and every other connection are closed, with the agent's pid); after the restore the
  run directory is given back to the sandbox, `runsc kill --pid <agent> USR1` has the agent
  bind its socket again, and hutch waits for a socket of a new inode there (lstat, nothing
  followed), seals the directory and only then checks that it is a socket, as at start.
  Meanwhile restored user code runs and could bind a socket of its own there: one of its own
  sandbox's, as the agent's is (the same user or root inside), never a link hutch follows.
- It cannot save a TCP socket that a thread polls ("endpoint still has waiters upon save"), and
  a failed checkpoint ends the sandbox, `--leave-running` or not (measured). The agent refuses
  to let go while the sandbox holds any TCP socket (the instance runs on, frozen if it was, and
  the scheduler freezes it instead); Python kernels put ipykernel's one TCP socket on a Unix one
  (`hutch.agent.kernel_launch`). A user's TCP server, or Deno's kernel (TCP only), keeps its
  session from hibernating. No room on the disk for an image of the instance's memory is refused
  too. Any other failure ends the instance, reported as a crash.
- A frozen instance is thawed for the agent to let go (frozen again if it refuses); it comes
  back running. The save and the restore run in the sentry, under the instance's cpu limit.

State of runsc lives in `<data>/instances/<id>/runsc/` (`--root`): stop kills the cgroup (the
sentry, gofer and ptrace stubs), unmounts the run tmpfs and removes the directory, runsc's state
with it. `runsc delete` is not used: it waits for the sentry to be reaped by the host's init,
which takes over a second here. For a look inside: `runsc --root <data>/instances/<id>/runsc
ps|exec <id> ...`.

Where gVisor differs, and what is done about it:
- Host uids. The OCI user namespace maps the slot's range (0..65535 -> base..), so the gofer runs
  as the slot's base uid (root of that namespace, no capability on the host) and the files the
  sandbox user writes belong to host uid base+1000: the same owner as under bwrap, so a kept
  workspace moves between backends without a chown. The sentry and its ptrace stubs run as host
  `nobody` in a user namespace of their own (gVisor's design; they open no host file). Rootless
  mode (`--rootless`, runsc as the slot's uid) was not chosen: it maps one uid only, so the
  sandbox user's own files would show up inside as root's or nobody's.
- pid 1. gVisor lets the sandbox user kill its pid 1 (`kill -9 1` ended the instance), which
  Linux forbids. The process therefore starts as root inside with CAP_SETUID and CAP_SETGID
  only (empty bounding set, no-new-privileges) and the agent switches users itself: the reaper
  (pid 1) becomes `nobody`, the agent uid 1000, which cannot signal it.
- Seccomp. The bwrap policy in OCI form (`seccomp.oci_seccomp`, `--oci-seccomp`), enforced by
  gVisor's kernel: denied calls fail with EPERM as under bwrap (`/proc/self/status` shows
  `Seccomp: 2`). It has no NoNewPrivs line, but prctl(PR_GET_NO_NEW_PRIVS) answers 1.
- pidfd_open does not exist (ENOSYS): the agent waits for its processes with a thread blocked in
  waitid(WNOWAIT) instead (`hutch.agent.process`).
- statx and fstatat refuse AT_NO_AUTOMOUNT with EINVAL in this runsc, which breaks `ls -l` and
  `stat`. A tiny library compiled at start-up (needs `cc`; skipped with a warning without one)
  drops the flag, preloaded into every process through `/etc/ld.so.preload`.
- Limits. cpu and memory are the host cgroup's, and count the sentry and gofer too (about 30 MB
  of memory when idle). Going over the memory limit kills the whole instance, not just the
  biggest process: the host kernel's OOM killer can only pick a sentry or stub process (the
  instance is then reported crashed). The pids limit is RLIMIT_NPROC inside (gVisor counts every
  task of the sandbox user, as the pids cgroup does under bwrap); the host pids cgroup is only a
  backstop, since the sentry and gofer run ~185 host tasks when idle and ~14 more per process
  inside. `MemTotal` is the host's (as under bwrap). /tmp is gVisor's own tmpfs, with its size.
  `InstanceStats.pids` counts host tasks.
- `stat` of the agent's socket from inside fails (EPERM): `--host-uds=create` lets the sandbox
  make host sockets but not open existing ones, which stays refused on purpose.
- Speed. The ptrace platform (the only one that works here; `--platform=kvm` hangs on this
  kernel, and this runsc has no systrap) makes every system call dearer: a cold start takes ~7x
  bwrap's (~310 ms, two thirds of it in `runsc run`), a process spawn ~10x (bench/sandbox.py).
- No network but gVisor's own loopback (`--network=none`), as under bwrap, and no network policy
  either (starting one raises `Unimplemented`; functions refuse the combination): this runsc
  (2022-12-19) takes every network namespace for the root one on kernels whose namespaces all
  have `/proc/sys/net/core/rmem_default` (6.x), so `--network=sandbox` fails, and host network
  mode inside the instance's namespace fails its chroot set-up with EPERM. A newer runsc would
  take the instance's namespace (`--network=sandbox`) like bwrap does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import marshal
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from hutch.errors import BackendUnavailable, FailedPrecondition, IsolationError, Unimplemented
from hutch.runtime import oci, seccomp
from hutch.runtime.base import HibernationImage, Instance, InstanceSpec, InstanceState
from hutch.runtime.cgroups import Cgroup, CgroupManager
from hutch.runtime.hostfs import AGENT_LIB, RUN_DIR, SANDBOX_HOME
from hutch.runtime.local import (
    READY_TIMEOUT,
    LocalRuntime,
    agent_command,
    agent_config,
    pid_start_time,
    still_running,
    undo_all,
)
from hutch.runtime.network import Networking
from hutch.runtime.rootfs import AGENT_ROOT, CAPABILITIES, SANDBOX_PATH, mount_root, template_has, unmount_layers
from hutch.runtime.userns import SANDBOX_UID, UidSlots, create_userns
from hutch.storage.base import WorkspaceStore
from hutch.types import InstanceId

log = logging.getLogger(__name__)

RUN_TMPFS_OPTIONS = "size=64k,nr_inodes=16,mode=0700"
# Host tasks allowed per instance (the host pids cgroup): the sentry's and gofer's threads
# (~185 when idle) and ptrace stubs, measured at ~14 per process inside. Only a backstop: the
# limit inside is RLIMIT_NPROC = `Resources.pids`; hitting this one would kill the sentry.
HOST_TASKS_BASE = 512
HOST_TASKS_PER_PID = 16
COMPAT_TARGET = f"{AGENT_LIB}/gvisor-compat.so"
COMPAT_SOURCE = r"""
/* Preloaded into every process of a hutch gVisor sandbox (/etc/ld.so.preload). runsc 20221219
   answers EINVAL to statx and fstatat with AT_NO_AUTOMOUNT, which coreutils' ls and stat always
   pass; gVisor has no automounts, so the flag is dropped. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    return syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}

int fstatat(int dirfd, const char *path, struct stat *buf, int flags) {
    return syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}

int fstatat64(int dirfd, const char *path, struct stat64 *buf, int flags) {
    return syscall(SYS_newfstatat, dirfd, path, buf, flags & ~AT_NO_AUTOMOUNT);
}
"""

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def runsc_binary() -> str:
    found = shutil.which("runsc")
    if not found:
        raise BackendUnavailable("gVisor is not installed (apt-get install runsc)")
    return found


def build_compat_library(directory: Path) -> Path | None:
    """The statx/fstatat shim, compiled once per content into `directory`; None without `cc`."""
    digest = hashlib.sha256(COMPAT_SOURCE.encode()).hexdigest()[:12]
    library = directory / f"compat-{digest}.so"
    if library.exists():
        return library
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: `ls -l` and `stat` will fail in gVisor sandboxes (AT_NO_AUTOMOUNT)")
        return None
    source = directory / f"compat-{digest}.{os.getpid()}.c"
    scratch = library.with_suffix(f".{os.getpid()}.tmp")
    source.write_text(COMPAT_SOURCE)
    result = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(scratch), str(source)], capture_output=True, text=True
    )
    source.unlink()
    if result.returncode != 0:
        log.warning("cannot build the gVisor compatibility library: %s", result.stderr.strip())
        scratch.unlink(missing_ok=True)
        return None
    scratch.chmod(0o644)
    scratch.rename(library)
    return library


def _mount_run_dir(path: Path, uid: int) -> None:
    options = f"{RUN_TMPFS_OPTIONS},uid={uid},gid={uid}".encode()
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc.mount(b"hutch-run", os.fsencode(path), b"tmpfs", flags, options) != 0:
        raise IsolationError(f"cannot mount a tmpfs at {path}: {os.strerror(ctypes.get_errno())}")


def _unmount_run_dir(path: Path) -> None:
    if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise IsolationError(f"cannot unmount {path}: {os.strerror(err)}")


class GVisorRuntime(LocalRuntime):
    name = "gvisor"

    def __init__(
        self,
        data_dir: Path,
        store: WorkspaceStore,
        uid_slots: UidSlots | None = None,
        cgroups: CgroupManager | None = None,
        *,
        platform: str = "ptrace",
        runsc: str | None = None,
        runsc_flags: Sequence[str] = (),
        networking: Networking | None = None,
    ) -> None:
        self.runsc = runsc or runsc_binary()
        super().__init__(data_dir, store, uid_slots, cgroups, networking)
        self.platform = platform
        self.runsc_flags = tuple(runsc_flags)
        gvisor_dir = self.data_dir / "gvisor"
        gvisor_dir.mkdir(mode=0o755, exist_ok=True)
        self.rootfs = gvisor_dir / "rootfs"
        self.binds: list[oci.Bind] = []  # the same in every instance, besides the host view
        library = build_compat_library(gvisor_dir)
        if library is not None:
            preload = gvisor_dir / "ld.so.preload"
            preload.write_text(COMPAT_TARGET + "\n")
            preload.chmod(0o644)
            self.binds = [oci.Bind(str(library), COMPAT_TARGET), oci.Bind(str(preload), "/etc/ld.so.preload")]
        oci.ensure_rootfs(self.rootfs, self.host.entries(), self.binds, ["proc", "tmp", SANDBOX_HOME, RUN_DIR])
        # The mount points a template's tree lacks, as its topmost read-only layer (made on the
        # first start of a template; see `_points_layer`).
        self.points = gvisor_dir / "points"
        self._points_made = False

    def _spawn(self, spec: InstanceSpec) -> tuple[Instance, None, int]:
        undo: list = []
        try:
            prepared = self._prepare(spec, undo)
            uid_base = self.uid_slots.base(prepared.slot)
            root = self.rootfs
            if spec.rootfs is not None:
                self._check_mount_points(spec, prepared.workspace_path)
                undo.append(lambda: unmount_layers(prepared.instance_dir))
                userns_fd = create_userns(uid_base)
                try:
                    root = mount_root(
                        prepared.instance_dir,
                        (*spec.rootfs.layer_paths, str(self._points_layer())),
                        prepared.workspace_path,
                        userns_fd,
                        uid_base,
                    )
                finally:
                    os.close(userns_fd)
            run_dir = prepared.instance_dir / "run"
            # The agent binds its socket there: as root inside of a template, else as the user.
            run_owner = uid_base if spec.rootfs is not None else prepared.host_uid
            _mount_run_dir(run_dir, run_owner)
            undo.append(lambda: _unmount_run_dir(run_dir))

            cgroup = self._create_cgroup(spec)
            undo.append(cgroup.remove)
            undo.append(cgroup.kill_all)

            bundle = prepared.instance_dir
            if spec.rootfs is not None:
                oci.write_config(bundle, self._rootfs_config(spec, root, run_dir, uid_base))
            else:
                oci.write_config(bundle, self._config(spec, prepared.workspace_path, run_dir, uid_base))
            state_dir = bundle / "runsc"
            state_dir.mkdir(mode=0o700)
            pid_file = bundle / "sandbox.pid"
            argv = [
                *cgroup.join_argv(),
                *self._runsc(bundle),
                "run", "--bundle", str(bundle), "--detach", "--pid-file", str(pid_file), spec.instance_id,
            ]  # fmt: skip
            # Not a pipe: the sentry inherits it, and Go dies of SIGPIPE on a closed stderr.
            log_path = bundle / "runsc.log"
            with open(log_path, "wb") as log_file:
                try:
                    runsc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=log_file,
                        start_new_session=True,  # terminal signals to hutch never reach sandboxes
                        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                    )
                except OSError as exc:
                    raise IsolationError(f"cannot run runsc: {exc}") from None
            try:
                returncode = runsc.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                cgroup.kill_all()
                runsc.wait()
                raise IsolationError(
                    f"runsc did not start the sandbox within {READY_TIMEOUT:.0f} s (platform {self.platform})"
                ) from None
            if returncode != 0:
                message = log_path.read_text(errors="replace").strip()[-2000:]
                raise IsolationError(f"runsc failed to start the sandbox: {message or returncode}")
            pid = int(pid_file.read_text())
            detail = {"cgroup": cgroup.to_dict(), "platform": self.platform, "run_owner": run_owner}
            instance = self._record(spec, prepared, pid, detail)
            return instance, None, os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            undo_all(undo)
            raise

    def _config(self, spec: InstanceSpec, workspace_path: Path, run_dir: Path, uid_base: int) -> dict:
        resources = spec.resources
        config = {
            **agent_config(self.host, spec),
            "socket_path": f"{RUN_DIR}/agent.sock",
            "switch_user": [SANDBOX_UID, SANDBOX_UID],
            "releasable": True,
        }
        binds = [
            *self.binds,
            oci.Bind(str(workspace_path), SANDBOX_HOME, tuple(oci.READ_WRITE)),
            oci.Bind(str(run_dir), RUN_DIR, (*oci.READ_WRITE, "noexec")),
        ]
        return oci.config(
            root=self.rootfs,
            args=agent_command(self.host),
            env={
                "PATH": self.host.path_env,
                "HOME": SANDBOX_HOME,
                "USER": "user",
                "HUTCH_AGENT": "marshal:" + marshal.dumps(config).hex(),
            },
            mounts=oci.mounts(self.host.entries(), binds, resources.tmp_mb),
            uid_base=uid_base,
            rlimits={"nofile": resources.nofile, "nproc": resources.pids, "core": 0},
            seccomp=seccomp.oci_seccomp(),
            capabilities=["CAP_SETUID", "CAP_SETGID"],
        )

    def _points_layer(self) -> Path:
        """A read-only layer of empty mount points put over a template's layers: runsc's gofer
        makes every bind's mount point in the root file system before mounting it, which would
        otherwise write them into the session's upper layer. Only ever added to (instances use it)."""
        if not self._points_made:
            binds = [oci.Bind(bind.source, bind.target) for bind in self.agent_runtime.binds] + self.binds
            oci.ensure_rootfs(self.points, [], binds, [AGENT_ROOT, RUN_DIR])
            self._points_made = True
        return self.points

    def _rootfs_config(self, spec: InstanceSpec, root: Path, run_dir: Path, uid_base: int) -> dict:
        """`config.json` of an instance booting a template: its overlay (`mount_root`) as a
        writable root, and what bwrap gives such an instance (`BwrapRuntime._rootfs_argv`): root
        inside with a container's capabilities, the agent from `/opt/hutch`, hutch's `sudo`."""
        rootfs = spec.rootfs
        assert rootfs is not None
        resources = spec.resources
        agent = self.agent_runtime
        config = {
            **agent_config(self.host, spec),
            **self._rootfs_agent_config(spec),
            "socket_path": f"{RUN_DIR}/agent.sock",
            "releasable": True,
        }
        binds = [
            *(oci.Bind(bind.source, bind.target) for bind in agent.binds),
            *self.binds,
            *(
                [oci.Bind(str(self.sudo_shim), "/usr/bin/sudo")]
                if template_has(rootfs.layer_paths, "/usr/bin/sudo")
                else []
            ),
            oci.Bind(str(run_dir), RUN_DIR, (*oci.READ_WRITE, "noexec")),
        ]
        mounts = oci.mounts([], binds, resources.tmp_mb)
        # After /proc and /tmp, before the binds below it: a tmpfs holds the agent's mount points,
        # out of the upper layer, and lets every user reach `sudo`'s interpreter (as bwrap's).
        agent_tmpfs = {"size=1m", "mode=0755", "nosuid", "nodev"}
        mounts.insert(
            2, {"destination": AGENT_ROOT, "type": "tmpfs", "source": "tmpfs", "options": sorted(agent_tmpfs)}
        )
        return oci.config(
            root=root,
            args=agent.command(),
            env={"PATH": SANDBOX_PATH, "HUTCH_AGENT": "marshal:" + marshal.dumps(config).hex()},
            mounts=mounts,
            uid_base=uid_base,
            rlimits={"nofile": resources.nofile, "nproc": resources.pids, "core": 0},
            seccomp=seccomp.oci_seccomp(),
            capabilities=list(CAPABILITIES),
            bounding=list(CAPABILITIES),
            writable_root=True,
            cwd="/",
        )

    def _teardown_steps(self, instance: Instance) -> list[Callable[[], None]]:
        run_dir = self.instances_dir / instance.instance_id / "run"
        return [lambda: _unmount_run_dir(run_dir)]

    def _ready(self, instance: Instance) -> None:
        """Seal the run directory: the agent has bound its socket there, and from now on hutch
        connects to that path for every request. Left the sandbox user's, user code could put a
        symlink there to another instance's socket, and hutch would follow it (a session reaching
        another tenant's sandbox). Root's, and mapped to no uid of the sandbox, it cannot change."""
        _seal_run_dir(instance)

    def _runsc(self, bundle: Path) -> list[str]:
        """runsc and the flags every command on the instance of `bundle` takes (run, restore)."""
        return [
            self.runsc, "--root", str(bundle / "runsc"), f"--platform={self.platform}", "--network=none",
            "--host-uds=create", "--oci-seccomp", "--ignore-cgroups", "--file-access-mounts=exclusive",
            *self.runsc_flags,
        ]  # fmt: skip

    def _create_cgroup(self, spec: InstanceSpec) -> Cgroup:
        host_tasks = HOST_TASKS_BASE + HOST_TASKS_PER_PID * spec.resources.pids
        return self.cgroups.create(spec.instance_id, dataclasses.replace(spec.resources, pids=host_tasks))

    # -- hibernation (runsc checkpoint / restore) -----------------------------------------------

    def can_hibernate(self, instance_id: InstanceId | None = None) -> bool:
        if instance_id is None:
            return True
        instance = self._instances.get(instance_id)
        # Records of agents from before they could let go of their socket have no "run_owner".
        return instance is not None and "run_owner" in instance.detail

    def _images_dir(self, instance_id: InstanceId) -> Path:
        """`<instance dir>/hibernation/image/`, root's alone (0700): it holds the session's memory,
        and goes with the instance's directory. runsc reads and writes it as root."""
        return self.instances_dir / instance_id / "hibernation" / "image"

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        instance = self.get(instance_id)
        if not self.can_hibernate(instance_id):
            raise Unimplemented(f"instance {instance_id} cannot hibernate (it started before hutch could)")
        if instance.state != InstanceState.RUNNING:
            raise FailedPrecondition(f"instance {instance_id} is {instance.state.value}, not running")
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        await asyncio.to_thread(self._check_image_room, instance, cgroup)
        frozen = await asyncio.to_thread(cgroup.frozen)
        if frozen:
            await asyncio.to_thread(cgroup.thaw)  # the agent lets go of its socket only while it runs
        try:
            instance.detail["agent_pid"] = await asyncio.to_thread(_release_agent, instance)
        except BaseException:
            if frozen:
                await asyncio.to_thread(cgroup.freeze)
            raise
        watch = self._watches.get(instance_id)
        if watch is not None:
            watch.stopping = True  # its end after a good checkpoint is no crash
        try:
            image = await asyncio.to_thread(self._checkpoint, instance)
        except BaseException:
            await self._after_failed_checkpoint(instance, cgroup, frozen)
            raise
        if watch is not None:
            try:
                await asyncio.wait_for(watch.exited.wait(), 5)
            except TimeoutError:
                log.error("instance %s: the sentry is still there after its checkpoint", instance_id)
        self._watches.pop(instance_id, None)
        instance.state = InstanceState.HIBERNATED
        self._save(instance)
        # The gofer and ptrace stubs go with the sentry; nothing may hold memory in the cgroup.
        await asyncio.to_thread(cgroup.kill_all)
        await asyncio.to_thread(cgroup.remove, 5.0)
        await asyncio.to_thread(shutil.rmtree, self.instances_dir / instance_id / "runsc", True)
        return image

    def _check_image_room(self, instance: Instance, cgroup: Cgroup) -> None:
        """Refuse a checkpoint the disk may not hold (its image is about the memory the cgroup
        charges, sentry included): a failed checkpoint ends the sandbox with this runsc."""
        _, memory, _, _ = cgroup.stats()
        free = self.free_disk_mb() << 20
        if free < memory + (self.min_free_disk_mb << 20):
            raise IsolationError(
                f"hibernation of instance {instance.instance_id} refused (it runs on): "
                f"{free >> 20} MB free on the data directory's disk for an image of about {memory >> 20} MB"
            )

    def _checkpoint(self, instance: Instance) -> HibernationImage:
        images = self._images_dir(instance.instance_id)
        shutil.rmtree(images.parent, ignore_errors=True)
        images.parent.mkdir(mode=0o700)
        images.mkdir(mode=0o700)
        bundle = self.instances_dir / instance.instance_id
        started = time.monotonic()
        result = _run_runsc([*self._runsc(bundle), "checkpoint", "--image-path", str(images), instance.instance_id])
        took = time.monotonic() - started
        if result.returncode != 0:
            shutil.rmtree(images.parent, ignore_errors=True)
            raise IsolationError(f"hibernation of instance {instance.instance_id} failed: {_runsc_error(result)}")
        size = sum(entry.stat().st_size for entry in images.iterdir())
        return HibernationImage(images, size, took)

    async def _after_failed_checkpoint(self, instance: Instance, cgroup: Cgroup, frozen: bool) -> None:
        """This runsc ends the sandbox when its checkpoint fails (its known causes are refused
        before: a TCP socket, no room for the image): the instance is then reported crashed.
        One that still runs gets its agent's socket back, frozen again if it was."""
        watch = self._watches.get(instance.instance_id)
        if watch is not None and still_running(instance.pid, instance.pid_start_time):
            watch.stopping = False
            try:
                await asyncio.to_thread(self._rebind_agent, instance)
            finally:
                if frozen:
                    await asyncio.to_thread(cgroup.freeze)
            return
        log.error("instance %s: runsc ended it when its checkpoint failed", instance.instance_id)
        if watch is not None:
            watch.stopping = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.exited.wait(), 5)
        if instance.state != InstanceState.CRASHED:
            instance.state = InstanceState.CRASHED
            if self.on_exit is not None:
                self.on_exit(instance)

    def _rebind_agent(self, instance: Instance) -> None:
        """Have the agent bind its socket again (SIGUSR1, through runsc) and seal the run
        directory behind it. The directory is the sandbox's until then, and its processes run:
        hutch waits for a socket of a new inode there without following anything, seals it, and
        only then checks that it is a socket (a link refused), as at start."""
        run_dir = self.instances_dir / instance.instance_id / "run"
        try:
            stale = os.lstat(instance.socket_path).st_ino
        except FileNotFoundError:
            stale = None
        owner = instance.detail["run_owner"]
        os.chown(run_dir, owner, owner)
        os.chmod(run_dir, 0o700)
        bundle = self.instances_dir / instance.instance_id
        pid = str(instance.detail.get("agent_pid", 2))
        result = _run_runsc([*self._runsc(bundle), "kill", "--pid", pid, instance.instance_id, "USR1"])
        if result.returncode != 0:
            raise IsolationError(f"instance {instance.instance_id}: cannot wake its agent: {_runsc_error(result)}")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                st = os.lstat(instance.socket_path)
                if st.st_ino != stale:
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise IsolationError(f"instance {instance.instance_id}: its agent did not bind its socket again")
            time.sleep(0.002)
        _seal_run_dir(instance)

    async def restore(self, instance_id: InstanceId) -> Instance:
        instance = self.get(instance_id)
        if instance.state != InstanceState.HIBERNATED:
            raise FailedPrecondition(f"instance {instance_id} is {instance.state.value}, not hibernated")
        pid, cgroup = await asyncio.to_thread(self._restore, instance)
        instance.pid = pid
        instance.pid_start_time = pid_start_time(pid) or 0
        instance.detail["cgroup"] = cgroup.to_dict()
        instance.state = InstanceState.STARTING
        self._watch(instance, None)
        try:
            await asyncio.to_thread(self._rebind_agent, instance)
            channel = self.channel(instance_id)
            try:
                await channel.wait_healthy(READY_TIMEOUT)
            finally:
                await channel.aclose()
        except BaseException:
            await self._back_to_hibernated(instance, lambda: self._undo_restore(instance, cgroup))
            raise
        return await self._restored(instance, self._images_dir(instance_id).parent)

    def _restore(self, instance: Instance) -> tuple[int, Cgroup]:
        images = self._images_dir(instance.instance_id)
        if not (images / "checkpoint.img").is_file():
            raise IsolationError(f"instance {instance.instance_id} has no hibernation image")
        bundle = self.instances_dir / instance.instance_id
        cgroup = self._create_cgroup(instance.spec)
        try:
            shutil.rmtree(bundle / "runsc", ignore_errors=True)  # the checkpointed container's state
            (bundle / "runsc").mkdir(mode=0o700)
            pid_file = bundle / "sandbox.pid"
            pid_file.unlink(missing_ok=True)
            argv = [
                *cgroup.join_argv(),
                *self._runsc(bundle),
                "restore", "--image-path", str(images), "--bundle", str(bundle), "--detach",
                "--pid-file", str(pid_file), instance.instance_id,
            ]  # fmt: skip
            with open(bundle / "runsc.log", "ab") as log_file:
                # Not a pipe, as at start: the sentry inherits it.
                result = _run_runsc(argv, stderr=log_file)
            if result.returncode != 0:
                message = (bundle / "runsc.log").read_text(errors="replace").strip()[-1000:]
                raise IsolationError(
                    f"restore of instance {instance.instance_id} failed (it stays hibernated): "
                    f"{message or result.returncode}"
                )
            return int(pid_file.read_text()), cgroup
        except BaseException:
            self._undo_restore(instance, cgroup)
            raise

    def _undo_restore(self, instance: Instance, cgroup: Cgroup) -> None:
        cgroup.kill_all()
        cgroup.remove(5.0)
        shutil.rmtree(self.instances_dir / instance.instance_id / "runsc", ignore_errors=True)
        _seal_run_dir(instance, check=False)

    def _adopt_hibernated(self, instance: Instance) -> None:
        """A restore that a kill of hutch cut may have left a sandbox running (runsc's sentry is
        no child of hutch, to die with it) that no record names: it is ended and its set-up
        undone; the image, which a restore only reads, waits for the next one."""
        if instance.instance_id in self.cgroups.children():
            cgroup = self.cgroups.open(instance.instance_id)
            if cgroup.procs():
                log.warning("instance %s: a restore cut by a restart left it running: ended, its image kept",
                            instance.instance_id)  # fmt: skip
            self._undo_restore(instance, cgroup)
        else:
            _seal_run_dir(instance, check=False)


def _seal_run_dir(instance: Instance, check: bool = True) -> None:
    run_dir = instance.socket_path.parent
    os.chown(run_dir, 0, 0)
    os.chmod(run_dir, 0o755)
    if not check:
        return
    mode = os.lstat(instance.socket_path).st_mode
    if not stat.S_ISSOCK(mode):
        raise IsolationError(f"instance {instance.instance_id}: {instance.socket_path} is not the agent's socket")


RUNSC_TIMEOUT = 120.0


def _run_runsc(argv: list[str], stderr: int | IO[Any] = subprocess.PIPE) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
            timeout=RUNSC_TIMEOUT,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolationError(f"cannot run runsc: {exc}") from None


def _runsc_error(result: subprocess.CompletedProcess) -> str:
    """runsc's message, without the Go stack traces and state dumps it appends."""
    text = (result.stderr or "").strip()
    first = text.splitlines()[0] if text else f"runsc exited with {result.returncode}"
    return first if len(first) <= 300 else first[:240] + " ... " + first[-60:]


def _release_agent(instance: Instance, timeout: float = 10.0) -> int:
    """Ask the agent to let go of its socket and every connection (`POST /_hutch/release`);
    returns its pid inside. Raises IsolationError if it refuses (the instance runs on)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(instance.socket_path))
            sock.sendall(
                b"POST /_hutch/release HTTP/1.1\r\nhost: agent\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):  # until the agent closed its end
                answer += chunk
        except OSError as exc:
            raise IsolationError(f"hibernation of instance {instance.instance_id} failed (it runs on): {exc}") from None
    head, _, body = answer.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1:2]
    if status != [b"200"]:
        try:
            message = json.loads(body)["message"]
        except (ValueError, KeyError, TypeError):
            message = head[:200].decode(errors="replace") or "no answer"
        raise IsolationError(f"hibernation of instance {instance.instance_id} refused (it runs on): {message}")
    return int(json.loads(body)["pid"])
