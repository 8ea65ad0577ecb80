"""The root file system of an instance booted from a template, and the agent's place in it.

Layout inside such an instance:
- `/`: an overlay of the template's layers (read-only, shared by every instance of the template)
  under an upper layer of the instance's own, `<workspace>/upper`, in the session's workspace:
  what a session installs survives a crash of its instance, counts against its disk limit, and is
  never seen by another session. Layers and the upper layer are stored with their inside
  ownership and reach the instance through idmapped mounts (`hutch.runtime.idmap`), made under
  `<instance dir>/rootfs/` on the host and removed at stop.
- `/opt/hutch`: the agent's own interpreter and libraries, read-only and apart from the
  template's: `host/usr` (the host's `/usr`, whose dynamic loader and libraries run it, so the
  agent works whatever libc the template has), `python` (hutch's interpreter), `venv` (its
  site-packages), `lib/hutch` (the package). Nothing of it is on user code's `PATH` or
  `sys.path`: user code runs the template's own `python3`, `pip` and `node`.
- `/usr/bin/sudo`: hutch's `sudo` (`hutch.agent.sudo`), when the template has one. bwrap sets
  no_new_privs, so a setuid `sudo` cannot elevate; hutch's asks the agent, which runs as root
  inside, to start the command as root for the caller (passwordless, as in E2B's templates).

The agent runs as root of the instance's user namespace with a container's capabilities
(`CAPABILITIES`), which act only on what that namespace owns; it starts commands as `user` by
default and as root when asked.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hutch.errors import FailedPrecondition, IsolationError
from hutch.runtime import idmap
from hutch.runtime.hostfs import AGENT_LIB, RUN_DIR, HostView, site_packages

ROOT_MOUNT = "root"  # where `mount_root` mounts the overlay, in `<instance dir>/rootfs/`
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)

AGENT_ROOT = "/opt/hutch"
HOST_USR = f"{AGENT_ROOT}/host/usr"
AGENT_PYTHON = f"{AGENT_ROOT}/python"
AGENT_VENV = f"{AGENT_ROOT}/venv"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The capabilities of root inside (Docker's default set, less raw sockets, device nodes, chroot
# and audit): namespaced, so they act on the instance's own files and processes only.
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_NET_BIND_SERVICE",
)  # fmt: skip
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Every tool's own way to be told the trust store, pointed at the template's (which holds the
# host's extra CA certificates: `hutch.templates.debian`).
CA_ENV = {
    name: CA_BUNDLE
    for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                 "NODE_EXTRA_CA_CERTS")
}  # fmt: skip


def elf_interpreter(path: str) -> str:
    """The dynamic loader an ELF executable names (PT_INTERP)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise IsolationError(f"{path} is not a 64-bit ELF executable")
        endian = "<" if head[5] == 1 else ">"
        (phoff,) = struct.unpack_from(endian + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack(endian + "IIQQQQ", f.read(40))
            if p_type == 3:  # PT_INTERP
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    raise IsolationError(f"{path} names no dynamic loader")


@dataclass(frozen=True)
class Bind:
    source: str
    target: str


class AgentRuntime:
    """hutch's interpreter as instances with a root file system of their own see it."""

    def __init__(self, host: HostView) -> None:
        executable = os.path.realpath(sys.executable)
        base_prefix, prefix = str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve())
        self.binds: list[Bind] = [Bind("/usr", HOST_USR)]
        self._translations: list[tuple[str, str]] = []
        if base_prefix == "/usr" or base_prefix.startswith("/usr/"):
            self._translations.append(("/usr", HOST_USR))
        else:
            self.binds.append(Bind(str(host.reachable(Path(base_prefix))), AGENT_PYTHON))
            self._translations.append((base_prefix, AGENT_PYTHON))
        if prefix != base_prefix:
            self.binds.append(Bind(str(host.reachable(Path(prefix))), AGENT_VENV))
            self._translations.insert(0, (prefix, AGENT_VENV))
        self.binds.append(Bind(str(host.agent_package), f"{AGENT_LIB}/hutch"))
        self.python = self.inside(executable)
        loader = os.path.realpath(elf_interpreter(executable))
        if not loader.startswith("/usr/"):
            raise IsolationError(f"the dynamic loader {loader} is not under /usr")
        self.loader = HOST_USR + loader[len("/usr") :]
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        library_dirs = [
            os.path.join(os.path.dirname(os.path.dirname(executable)), "lib"),  # a relocated interpreter's
            "/usr/local/lib", f"/usr/local/lib/{multiarch}", f"/usr/lib/{multiarch}", "/usr/lib", "/usr/lib64",
        ]  # fmt: skip
        self.library_path = ":".join(
            dict.fromkeys(self.inside(d) for d in library_dirs if os.path.isdir(d) and self.inside(d, strict=False))
        )
        self.python_path = [self.inside(p) for p in site_packages() if self.inside(p, strict=False)]

    def inside(self, path: str, strict: bool = True) -> str:
        """Where a host path of hutch's environment is inside ("" if nowhere and not `strict`)."""
        for outside, inside in self._translations:
            if path == outside or path.startswith(outside + "/"):
                return inside + path[len(outside) :]
        if path.startswith("/usr/"):
            return HOST_USR + path[len("/usr") :]
        if strict:
            raise IsolationError(f"{path} is not part of hutch's environment as sandboxes see it")
        return ""

    def interpreter(self) -> list[str]:
        """The command line prefix that runs hutch's Python inside, on the host's loader."""
        return [self.loader, "--inhibit-cache", "--library-path", self.library_path, self.python, "-I", "-S", "-B"]

    def command(self) -> list[str]:
        return [
            *self.interpreter(),
            "-c",
            f"import sys; sys.path.insert(0, {AGENT_LIB!r}); from hutch.agent.main import main; main([])",
        ]

    def sudo_script(self) -> str:
        """The `sudo` of templates (`hutch.agent.sudo`), a shell script run by the template's sh."""
        argv = " ".join(f"'{part}'" for part in self.interpreter())
        return (
            f"#!/bin/sh\nexec {argv} -c \"import sys; sys.path.insert(0, '{AGENT_LIB}'); "
            f'from hutch.agent.sudo import main; main()" "$@"\n'
        )

    def bwrap_mounts(self) -> list[str]:
        # A tmpfs holds the mount points, so that they are not written to the upper layer, and
        # every user can traverse to `sudo`'s interpreter.
        args = ["--perms", "0755", "--size", str(1 << 20), "--tmpfs", AGENT_ROOT]
        made = {AGENT_ROOT}
        for bind in self.binds:
            parents = []
            parent = os.path.dirname(bind.target)
            while parent not in made and parent != "/":
                parents.append(parent)
                parent = os.path.dirname(parent)
            for directory in reversed(parents):
                args += ["--perms", "0755", "--dir", directory]
                made.add(directory)
            args += ["--ro-bind", bind.source, bind.target]
        return args


def idmap_layers(
    instance_dir: Path, layer_paths: Sequence[str], workspace_path: Path, userns_fd: int, owner: int
) -> tuple[list[Path], Path]:
    """Idmap the layers and the instance's workspace into `<instance_dir>/rootfs/`: the layers'
    mount points, lowest first, and the workspace's."""
    base = instance_dir / "rootfs"
    base.mkdir(mode=0o700, exist_ok=True)
    # Only host root and the instance's own root (`owner`, who sets the overlay up) may pass:
    # the idmapped layers show the template's tree, and the workspace the session's files.
    os.chown(base, owner, owner)
    os.chmod(base, 0o700)
    # The upper layer and overlayfs's work directory, owned by root inside (0 on disk). On disk
    # they hold what root inside made, setuid-root files included: only host root may reach
    # them (the instance sees them through its idmapped, nosuid mount).
    os.chmod(workspace_path, 0o700)
    for name in ("upper", "work"):
        (workspace_path / name).mkdir(mode=0o755, exist_ok=True)
    targets = []
    for index, layer in enumerate(layer_paths):
        target = base / f"layer{index}"
        target.mkdir(mode=0o755, exist_ok=True)
        idmap.idmapped_mount(Path(layer), target, userns_fd, read_only=True)
        targets.append(target)
    workspace = base / "workspace"
    workspace.mkdir(mode=0o755, exist_ok=True)
    idmap.idmapped_mount(workspace_path, workspace, userns_fd, read_only=False)
    return targets, workspace


def mount_layers(
    instance_dir: Path, layer_paths: tuple[str, ...], workspace_path: Path, userns_fd: int, owner: int
) -> list[str]:
    """Idmap the template's layers and the instance's workspace into `<instance_dir>/rootfs/`
    and return the bwrap arguments of the overlay root over them. The caller undoes it with
    `unmount_layers` (also on failure)."""
    targets, workspace = idmap_layers(instance_dir, layer_paths, workspace_path, userns_fd, owner)
    args = [arg for target in targets for arg in ("--overlay-src", str(target))]
    return [*args, "--overlay", str(workspace / "upper"), str(workspace / "work"), "/"]


# Run by a fresh interpreter (single-threaded, as setns(CLONE_NEWUSER) requires): it joins the
# instance's user namespace as its root, makes the overlay there (a mount namespace of its own
# lets it) and hands the detached mount back over a socket. The overlay acts on its layers with
# these credentials: created as root inside, through the idmapped upper layer its files get
# their inside owners on disk. Made by host root instead, overlayfs cannot write through the
# idmapped upper layer, where host uid 0 maps to nothing (EOVERFLOW: it mounts read-only).
_OVERLAY_HELPER = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result < 0:
        sys.stderr.write(f"{what}: {os.strerror(ctypes.get_errno())}")
        os._exit(1)
    return result
userns, sock = int(sys.argv[1]), int(sys.argv[2])
os.chdir(sys.argv[3])  # paths relative to it: fsconfig takes values of 256 bytes at most
check(libc.setns(userns, 0x10000000), "setns")
os.setresgid(0, 0, 0)
os.setresuid(0, 0, 0)
check(libc.unshare(0x00020000), "unshare")
fs = check(libc.syscall(430, b"overlay", 1), "fsopen")
for option in sys.argv[5:]:
    key, _, value = option.partition("=")
    check(libc.syscall(431, fs, 1 if value else 0, key.encode(), value.encode() if value else None, 0), key)
check(libc.syscall(431, fs, 6, None, None, 0), "create")
socket.send_fds(socket.socket(fileno=sock), [b"m"], [check(libc.syscall(432, fs, 1, int(sys.argv[4])), "fsmount")])
"""
_SYS_MOVE_MOUNT = 429
_MOUNT_NOSUID_NODEV = 0x6  # fsmount's MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
_MOVE_MOUNT_F_EMPTY_PATH = 4


def mount_root(
    instance_dir: Path,
    layer_paths: Sequence[str],
    workspace_path: Path,
    userns_fd: int,
    owner: int,
) -> Path:
    """The overlay of `layer_paths` (lowest first) under the workspace's upper layer, made by root
    of the user namespace `userns_fd` and mounted (nosuid, nodev) at `<instance_dir>/rootfs/root`,
    which is returned: a root file system that the host can hand to a runtime (gVisor's gofer).
    The caller undoes it with `unmount_layers` (also on failure)."""
    idmap_layers(instance_dir, layer_paths, workspace_path, userns_fd, owner)
    root = instance_dir / "rootfs" / ROOT_MOUNT
    root.mkdir(mode=0o755, exist_ok=True)
    mount_overlay(instance_dir, len(layer_paths), userns_fd, root, nosuid=True)
    return root


def mount_overlay(instance_dir: Path, layers: int, userns_fd: int, target: Path, nosuid: bool) -> None:
    """Mount at `target` the overlay over the idmapped mounts `idmap_layers` made under
    `<instance_dir>/rootfs/` (`layers` of them), made by root of the user namespace `userns_fd`
    (one with the instance's map), as bwrap's is: an overlay host root made could not write
    through the idmapped upper layer (it would be read-only). `nosuid`: also nodev; without,
    the flags of bwrap's root, which CRIU gives a restored root (it may not clear locked ones)."""
    # One layer per `lowerdir+` (Linux 6.8+), the topmost first: `lowerdir=` takes them all in
    # one value, which fsconfig cuts at 256 bytes (a few layers' paths).
    base = instance_dir / "rootfs"
    options = [
        *(f"lowerdir+=layer{index}" for index in reversed(range(layers))),
        "upperdir=workspace/upper",
        "workdir=workspace/work",
        "userxattr",  # as bwrap's overlay, made in a user namespace too: one upper layer format
    ]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        try:
            helper = subprocess.run(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _OVERLAY_HELPER,
                    str(userns_fd),
                    str(theirs.fileno()),
                    str(base),
                    str(_MOUNT_NOSUID_NODEV if nosuid else 0),
                    *options,
                ],
                pass_fds=(userns_fd, theirs.fileno()),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise IsolationError(f"cannot mount the root file system: {exc}") from None
        if helper.returncode != 0:
            raise IsolationError(f"cannot mount the root file system: {helper.stderr.decode(errors='replace')}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise IsolationError("cannot mount the root file system: no mount came back")
    try:
        if _libc.syscall(_SYS_MOVE_MOUNT, fds[0], b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH) < 0:
            raise IsolationError(f"cannot mount the root file system at {target}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fds[0])


def unmount_layers(instance_dir: Path) -> None:
    """Remove the mounts of `mount_layers` or `mount_root` (lazily: a dying sandbox may still hold
    them), the overlay first."""
    base = instance_dir / "rootfs"
    if not base.is_dir():
        return
    for entry in sorted(base.iterdir(), key=lambda path: (path.name == ROOT_MOUNT, path.name), reverse=True):
        idmap.detach(entry)
        try:
            entry.rmdir()
        except OSError as exc:
            raise IsolationError(f"cannot remove {entry}: {exc.strerror}") from None
    base.rmdir()


# Where an instance's sandbox mounts hutch's own things on a template's tree (sudo only where the
# template has one, resolv.conf only with a network): none of them, nor a directory above them,
# may be a link in a template's layer (`linked_mount_points`).
MOUNT_POINTS = (
    "/proc", "/dev", "/tmp", AGENT_ROOT, RUN_DIR, "/usr/bin/sudo", "/etc/resolv.conf",
    "/etc/ld.so.preload",  # gVisor's: its statx shim (`hutch.runtime.gvisor`)
)  # fmt: skip


def linked_mount_points(trees: Mapping[str, Path], targets: Iterable[str]) -> list[str]:
    """The mount points, or directories above them, that some tree (a template's layer, an
    upper layer; by name) holds as a symbolic link: "<name>: <path> -> <link>".

    bwrap builds the sandbox under `/newroot` while the host's root is still reachable at
    `/oldroot`, and follows links in a mount's destination: a template with `/run` linked to
    `/oldroot/var/tmp` had bwrap create `run/hutch` (and an empty file for `/usr/bin/sudo`) in the
    host's `/var/tmp`, as the instance's host uid. Each tree is walked one component at a time
    with `lstat`, never through a link (the trees are the tenant's)."""
    found = []
    for name, tree in trees.items():
        for target in targets:
            current = Path(tree)
            for part in Path(target).relative_to("/").parts:
                current = current / part
                try:
                    st = os.lstat(current)
                except OSError:
                    break
                if stat.S_ISLNK(st.st_mode):
                    found.append(f"{name}: /{current.relative_to(tree)} -> {os.readlink(current)}")
                    break
                if not stat.S_ISDIR(st.st_mode):
                    break
    return sorted(set(found))


def refuse_linked_mount_points(layer: Path, what: str) -> None:
    """Fail a build whose new layer has a link where sandboxes mount hutch's files: no sandbox
    could boot from it (`LocalRuntime` refuses it at every start), so it is never registered."""
    linked = linked_mount_points({what: layer}, MOUNT_POINTS)
    if linked:
        raise FailedPrecondition(
            f"{what} left a symbolic link where sandboxes mount hutch's files: {'; '.join(linked)}; "
            "a template may not link these paths"
        )


def template_has(layer_paths: tuple[str, ...], path: str) -> bool:
    """Whether some layer holds `path` (absolute, inside)."""
    return any(os.path.lexists(os.path.join(layer, path.lstrip("/"))) for layer in layer_paths)
