"""What a sandbox sees of the host's file system, computed once per runtime.

- Read-only system: `/usr` (with the merged-usr symlinks `/bin`, `/lib`, `/lib64`, `/sbin`), and
  a short list of `/etc` entries needed to run programs; `/etc/passwd`, `/etc/group`,
  `/etc/hosts`, `/etc/profile`... are generated (the sandbox user is `user`, uid 1000, home
  `/home/user`, as in E2B).
- The Python environment hutch runs in (its interpreter, its site-packages), at the same paths
  inside as outside, so the agent, the Jupyter kernels and user code share it. hutch's own
  package is bound at `/opt/hutch/lib/hutch` for the agent.

`HostView.entries()` is that view, independent of the backend: bwrap gets it as arguments
(`bwrap_mounts`), gVisor as OCI mounts (`hutch.runtime.oci`).

The sandbox is set up by an unprivileged host uid (bwrap runs as the instance's uid; gVisor's
gofer, which opens every host file a gVisor sandbox sees, as the slot's base uid), which cannot
traverse directories such as `/root` (pyenv lives in `/root/.pyenv` on these machines). Any
source that is not traversable by others is therefore bind-mounted once, read-only, under
`<data>/host/` (a directory of ours that is), and bound into sandboxes from there.
"""

from __future__ import annotations

import compileall
import hashlib
import os
import site
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import hutch
from hutch.errors import BackendUnavailable
from hutch.storage.base import is_mount_point

SANDBOX_HOME = "/home/user"
AGENT_LIB = "/opt/hutch/lib"
RUN_DIR = "/run/hutch"  # the per-instance host directory with the agent's socket

ETC_FROM_HOST = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "ssl",
    "ca-certificates", "ca-certificates.conf", "mime.types", "protocols", "services", "host.conf",
    "inputrc", "bash.bashrc", "fonts", "terminfo", "magic", "magic.mime", "gai.conf", "debian_version",
    "os-release", "mailcap", "xdg", "R",
)  # fmt: skip


def traversable_by_others(path: Path) -> bool:
    """True when a process of an unrelated uid can reach `path` (o+x on it and every parent)."""
    path = path.resolve()
    for part in [path, *path.parents]:
        try:
            if not os.stat(part).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def python_roots() -> list[Path]:
    """The directories that make up hutch's Python environment."""
    roots = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    # Shared libraries of a non-relocated interpreter (rare, but e.g. /usr/local/lib).
    return sorted(roots)


def site_packages() -> list[str]:
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    return paths


@dataclass(frozen=True)
class HostEntry:
    """One thing of the host in the sandbox: a read-only bind of `source` at `target`, or (symlink)
    a symbolic link at `target` whose content is `source`."""

    target: str
    source: str
    symlink: bool = False


class HostView:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        if not traversable_by_others(data_dir):
            raise BackendUnavailable(
                f"the data directory {data_dir} must be reachable by other users (o+x on it and on every "
                "parent): sandboxes are set up under unprivileged host uids"
            )
        self.stage_dir = data_dir / "host"
        self.etc_dir = data_dir / "etc"
        self.stage_dir.mkdir(mode=0o755, exist_ok=True)
        self.etc_dir.mkdir(mode=0o755, exist_ok=True)
        self.python_binds: list[tuple[Path, str]] = [(self.reachable(p), str(p)) for p in python_roots()]
        package = Path(hutch.__file__).resolve().parent
        # Sandboxes see the package read-only: compile it here, or every agent would compile at boot.
        compileall.compile_dir(package, quiet=1, workers=1)
        self.agent_package = self.reachable(package)
        self.python = sys.executable
        self.path_env = ":".join(
            dict.fromkeys(
                [
                    str(Path(sys.executable).parent),
                    "/usr/local/sbin",
                    "/usr/local/bin",
                    "/usr/sbin",
                    "/usr/bin",
                    "/sbin",
                    "/bin",
                ]
            )
        )
        self._write_etc()

    def unstage(self) -> None:
        """Unmount the staged binds (running sandboxes keep their own copies of them)."""
        for target in sorted(self.stage_dir.iterdir()):
            if is_mount_point(target):
                subprocess.run(["umount", "--lazy", str(target)], capture_output=True)
            try:
                target.rmdir()
            except OSError:
                pass

    def reachable(self, source: Path) -> Path:
        """`source`, or a read-only bind of it under our stage dir when others cannot reach it."""
        if traversable_by_others(source):
            return source
        digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
        target = self.stage_dir / f"{source.name}-{digest}"
        target.mkdir(mode=0o755, exist_ok=True)
        if not is_mount_point(target):
            for argv in (
                ["mount", "--bind", str(source), str(target)],
                ["mount", "-o", "remount,bind,ro,nosuid,nodev", str(target)],
            ):
                result = subprocess.run(argv, capture_output=True, text=True)
                if result.returncode != 0:
                    raise BackendUnavailable(f"cannot stage {source} for sandboxes: {result.stderr.strip()}")
        return target

    def _write_etc(self) -> None:
        files = {
            "passwd": f"root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:user:{SANDBOX_HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            "group": "root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n",
            "hostname": "sandbox\n",
            "hosts": "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
            # bash -l (how E2B runs commands) reads /etc/profile; Debian's would reset PATH.
            "profile": f'export PATH="{self.path_env}"\nexport LANG="${{LANG:-C.UTF-8}}"\n'
            'if [ "${PS1-}" ] && [ -n "${BASH_VERSION-}" ] && [ -f /etc/bash.bashrc ]; then . /etc/bash.bashrc; fi\n',
            "resolv.conf": "nameserver 127.0.0.1\n",
        }
        for name, content in files.items():
            path = self.etc_dir / name
            if not path.exists() or path.read_text() != content:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(content)
                tmp.chmod(0o644)
                tmp.rename(path)

    def entries(self) -> list[HostEntry]:
        """Everything the sandbox sees of the host, in mount order: read-only binds and symlinks."""
        entries = [HostEntry("/usr", "/usr")]
        for name in ("bin", "sbin", "lib", "lib64", "lib32"):
            if name in ("bin", "sbin", "lib") or os.path.isdir(f"/usr/{name}"):
                entries.append(HostEntry(f"/{name}", f"usr/{name}", symlink=True))
        for name in ETC_FROM_HOST:
            if os.path.exists(f"/etc/{name}"):
                entries.append(HostEntry(f"/etc/{name}", f"/etc/{name}"))
        for path in sorted(self.etc_dir.iterdir()):
            if path.suffix != ".tmp":
                entries.append(HostEntry(f"/etc/{path.name}", str(path)))
        for source, target in self.python_binds:
            if not target.startswith("/usr/"):
                entries.append(HostEntry(target, str(source)))
        entries.append(HostEntry(f"{AGENT_LIB}/hutch", str(self.agent_package)))
        return entries

    def bwrap_mounts(self) -> list[str]:
        """The bwrap arguments for everything the sandbox sees of the host, in order."""
        args = []
        for entry in self.entries():
            if entry.symlink:
                args += ["--symlink", entry.source, entry.target]
            else:
                args += ["--ro-bind", entry.source, entry.target]
        return args
