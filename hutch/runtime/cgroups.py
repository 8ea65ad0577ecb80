"""Cgroups for instances: limits, accounting and whole-tree teardown, on cgroup v1 and v2.

Every instance gets cgroups of its own, nested under the cgroups of the hutch process itself
(read from /proc/self/cgroup), so the host's or CI's accounting of hutch covers its sandboxes.

- v1 (one hierarchy per controller, as on these machines): memory, cpu, cpuacct, pids, and
  freezer when present. A v2 hierarchy mounted beside them without controllers ("hybrid") is
  used for `cgroup.kill` when it exists.
- v2 (unified): memory, cpu, pids enabled in the subtree. v2 forbids processes in a cgroup
  whose children have controllers, so hutch first moves itself into a leaf (`hutch-server`).

The root of the cgroup filesystem is a parameter so the path logic can be tested on a plain
directory tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

from hutch.errors import BackendUnavailable, IsolationError
from hutch.runtime.base import Resources

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V1_REQUIRED = ("memory", "cpu", "pids")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _read_int(path: Path) -> int:
    try:
        return int(_read(path).split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def parse_mountinfo(text: str) -> tuple[dict[str, Path], Path | None]:
    """v1 controller -> mount point, and the cgroup2 mount point (if any), from /proc/self/mountinfo."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype, _source, super_opts = [*right.split(), "", ""][:3]
        mount_point = Path(left.split()[4])
        if fstype == "cgroup2":
            v2 = v2 or mount_point
        elif fstype == "cgroup":
            for opt in super_opts.split(","):
                if opt in V1_CONTROLLERS:
                    v1.setdefault(opt, mount_point)
    return v1, v2


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """v1 controller -> this process's path, and its v2 path, from /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            if controller in V1_CONTROLLERS:
                v1[controller] = path
    return v1, v2


class Cgroup:
    """The cgroups of one instance: one directory per v1 controller, or one v2 directory."""

    def __init__(self, version: int, dirs: dict[str, Path], kill_dir: Path | None = None) -> None:
        self.version = version
        self.dirs = dirs  # v1: controller -> dir; v2: {"unified": dir}
        self.kill_dir = kill_dir  # a v2 dir whose cgroup.kill ends the tree (hybrid v1 hosts)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "dirs": {k: str(v) for k, v in self.dirs.items()},
            "kill_dir": str(self.kill_dir) if self.kill_dir else None,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Cgroup:
        kill_dir = Path(data["kill_dir"]) if data.get("kill_dir") else None
        return cls(data["version"], {k: Path(v) for k, v in data["dirs"].items()}, kill_dir)

    def _dir(self, controller: str) -> Path | None:
        if self.version == 2:
            return self.dirs["unified"]
        return self.dirs.get(controller)

    def set_limits(self, resources: Resources) -> None:
        memory = resources.memory_mb * 1024 * 1024
        quota = max(1000, int(resources.cpu * CFS_PERIOD_US))
        if self.version == 1:
            mem = self.dirs["memory"]
            _write(mem / "memory.limit_in_bytes", str(memory))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(memory))  # no swapping past it
            cpu = self.dirs["cpu"]
            _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
            _write(self.dirs["pids"] / "pids.max", str(resources.pids))
        else:
            unified = self.dirs["unified"]
            _write(unified / "memory.max", str(memory))
            if (unified / "memory.swap.max").exists():
                _write(unified / "memory.swap.max", "0")
            _write(unified / "cpu.max", f"{quota} {CFS_PERIOD_US}")
            _write(unified / "pids.max", str(resources.pids))

    def proc_files(self) -> list[Path]:
        """The `cgroup.procs` files a process is written to to join every hierarchy."""
        return [d / "cgroup.procs" for d in [*self.dirs.values(), *([self.kill_dir] if self.kill_dir else [])]]

    def join_argv(self, own_namespace: bool = False) -> list[str]:
        """The prefix of a command line that runs the rest of it in these cgroups (joined before
        it starts, so that whatever it forks is in them too); `own_namespace`: in a cgroup
        namespace rooted there, so that it sees its cgroups as the root."""
        then = "exec unshare --cgroup" if own_namespace else "exec"
        script = f'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; {then} "$@"'
        return ["/bin/sh", "-c", script, "hutch-join", *map(str, self.proc_files()), "--"]

    def add_process(self, pid: int) -> None:
        for path in self.proc_files():
            _write(path, str(pid))

    def procs(self) -> list[int]:
        directory = self._dir("pids") or next(iter(self.dirs.values()))
        try:
            return [int(line) for line in _read(directory / "cgroup.procs").split()]
        except OSError:
            return []

    def stats(self) -> tuple[float, int, int, int]:
        """(cpu seconds, memory bytes, peak memory bytes, pids) used by the whole tree."""
        if self.version == 1:
            cpuacct = self.dirs.get("cpuacct")
            cpu_s = _read_int(cpuacct / "cpuacct.usage") / 1e9 if cpuacct else 0.0
            mem = self.dirs["memory"]
            return (
                cpu_s,
                _read_int(mem / "memory.usage_in_bytes"),
                _read_int(mem / "memory.max_usage_in_bytes"),
                _read_int(self.dirs["pids"] / "pids.current"),
            )
        unified = self.dirs["unified"]
        usage_usec = 0
        try:
            for line in _read(unified / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    usage_usec = int(value)
        except OSError:
            pass
        current = _read_int(unified / "memory.current")
        peak = _read_int(unified / "memory.peak") or current
        return usage_usec / 1e6, current, peak, _read_int(unified / "pids.current")

    def oom_kills(self) -> int:
        """How many processes the kernel killed for going over the memory limit."""
        path = self.dirs["memory"] / "memory.oom_control" if self.version == 1 else None
        if self.version == 2:
            path = self.dirs["unified"] / "memory.events"
        try:
            for line in _read(path).splitlines():  # type: ignore[arg-type]
                key, _, value = line.partition(" ")
                if key in ("oom_kill",):
                    return int(value)
        except (OSError, TypeError):
            pass
        return 0

    def kill_all(self) -> None:
        """SIGKILL every process in the tree (a fork bomb cannot outrun cgroup.kill or the sweep)."""
        kill_dir = self.dirs["unified"] if self.version == 2 else self.kill_dir
        if kill_dir is not None and (kill_dir / "cgroup.kill").exists():
            try:
                _write(kill_dir / "cgroup.kill", "1")
                if self.version == 2:
                    return
            except OSError:
                pass
        # v1: cgroup.kill reached the processes in the hybrid hierarchy only. One that joined the
        # controllers' cgroups but not that one (hutch died between the writes of add_process)
        # is found by the sweep.
        for _ in range(100):
            pids = self.procs()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # A frozen task takes its SIGKILL only once thawed (v1's freezer).
            with contextlib.suppress(IsolationError, OSError):
                self.thaw()

    # -- freezing (a sleeping session: no CPU, its memory kept) ----------------------------------

    def _freezer(self) -> tuple[Path, str, str] | None:
        """(file, frozen value, thawed value) of this tree's freezer; None without one."""
        if self.version == 2:
            return self.dirs["unified"] / "cgroup.freeze", "1", "0"
        directory = self.dirs.get("freezer")
        return (directory / "freezer.state", "FROZEN", "THAWED") if directory is not None else None

    def can_freeze(self) -> bool:
        return self._freezer() is not None

    def frozen(self) -> bool:
        """Whether the tree is frozen (or being frozen)."""
        freezer = self._freezer()
        if freezer is None:
            return False
        if self.version == 2:
            return _read(freezer[0]).strip() == "1"
        return _read(freezer[0]).strip() in ("FROZEN", "FREEZING")

    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every process of the tree where it stands (memory kept); returns once all are.

        Raises:
            IsolationError: no freezer, or the tree did not freeze in time (it is thawed again).
        """
        freezer = self._freezer()
        if freezer is None:
            raise IsolationError("this host's cgroups have no freezer")
        path, frozen, _ = freezer
        try:
            _write(path, frozen)
        except OSError as exc:
            raise IsolationError(f"cannot freeze {path.parent}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while not self._all_frozen():
            if time.monotonic() > deadline:
                self.thaw()
                raise IsolationError(f"{path.parent} did not freeze within {timeout:g} s")
            time.sleep(0.001)

    def _all_frozen(self) -> bool:
        if self.version == 2:
            events = _read(self.dirs["unified"] / "cgroup.events")
            return "frozen 1" in events.splitlines()
        return _read(self.dirs["freezer"] / "freezer.state").strip() == "FROZEN"

    def thaw(self) -> None:
        """Let the tree run again (nothing if it has no freezer or is gone)."""
        freezer = self._freezer()
        if freezer is not None:
            try:
                _write(freezer[0], freezer[2])
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise IsolationError(f"cannot thaw {freezer[0].parent}: {exc.strerror}") from None

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir every directory; processes still exiting make it EBUSY for a few ms, so retry."""
        deadline = time.monotonic() + timeout
        for directory in [*self.dirs.values(), *([self.kill_dir] if self.kill_dir else [])]:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise IsolationError(f"cannot remove cgroup {directory}: {exc.strerror}") from None
                    self.kill_all()
                    time.sleep(0.005)


class CgroupManager:
    """Creates instance cgroups under `<own cgroup>/<group_name>/` in every hierarchy."""

    def __init__(
        self,
        group_name: str = "hutch",
        root: Path = Path("/"),
        mountinfo: str | None = None,
        proc_cgroup: str | None = None,
    ) -> None:
        self.root = root
        mountinfo = mountinfo if mountinfo is not None else _read(Path("/proc/self/mountinfo"))
        proc_cgroup = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup"))
        v1_mounts, v2_mount = parse_mountinfo(mountinfo)
        v1_paths, v2_path = parse_proc_cgroup(proc_cgroup)
        self.parents: dict[str, Path] = {}
        self.kill_parent: Path | None = None
        if all(c in v1_mounts for c in V1_REQUIRED):
            self.version = 1
            for controller, mount in v1_mounts.items():
                own = v1_paths.get(controller, "/")
                self.parents[controller] = self._at(mount, own) / group_name
            if v2_mount is not None and v2_path is not None:
                candidate = self._at(v2_mount, v2_path) / group_name
                if (self._at(v2_mount, "/") / "cgroup.procs").exists():
                    self.kill_parent = candidate
        elif v2_mount is not None and v2_path is not None:
            self.version = 2
            controllers = _read(self._at(v2_mount, "/") / "cgroup.controllers").split()
            missing = [c for c in V2_CONTROLLERS if c not in controllers]
            if missing:
                raise BackendUnavailable(f"cgroup v2 lacks the controllers {missing}")
            self.parents["unified"] = self._prepare_v2(self._at(v2_mount, v2_path), group_name)
        else:
            raise BackendUnavailable("no usable cgroup hierarchy (need memory, cpu and pids)")
        for parent in [*self.parents.values(), *([self.kill_parent] if self.kill_parent else [])]:
            parent.mkdir(exist_ok=True)

    def _at(self, mount: Path, path: str) -> Path:
        return self.root / str(mount).lstrip("/") / path.lstrip("/")

    @staticmethod
    def _prepare_v2(own: Path, group_name: str) -> Path:
        """Enable the controllers below our own cgroup, moving ourselves into a leaf first."""
        enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
        try:
            _write(own / "cgroup.subtree_control", enable)
        except OSError:
            leaf = own / "hutch-server"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            try:
                _write(own / "cgroup.subtree_control", enable)
            except OSError as exc:
                raise BackendUnavailable(
                    f"cannot enable {V2_CONTROLLERS} below {own}: {exc.strerror} "
                    "(other processes share hutch's cgroup; give hutch a delegated cgroup of its own)"
                ) from None
        parent = own / group_name
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", enable)
        return parent

    def children(self) -> list[str]:
        """Names of the instance cgroups under our parents (any hierarchy)."""
        names: set[str] = set()
        for parent in [*self.parents.values(), *([self.kill_parent] if self.kill_parent else [])]:
            try:
                names.update(entry.name for entry in parent.iterdir() if entry.is_dir())
            except OSError:
                continue
        return sorted(names)

    def open(self, name: str) -> Cgroup:
        """The cgroups of an instance by name (what `create` made), without touching them."""
        dirs = {key: parent / name for key, parent in self.parents.items()}
        return Cgroup(self.version, dirs, self.kill_parent / name if self.kill_parent else None)

    def remove_parents(self) -> None:
        """Remove hutch's group directories if no instance is left in them."""
        for parent in [*self.parents.values(), *([self.kill_parent] if self.kill_parent else [])]:
            try:
                parent.rmdir()
            except OSError:
                pass

    def create(self, name: str, resources: Resources) -> Cgroup:
        dirs = {key: parent / name for key, parent in self.parents.items()}
        kill_dir = self.kill_parent / name if self.kill_parent else None
        cgroup = Cgroup(self.version, dirs, kill_dir)
        try:
            for directory in [*dirs.values(), *([kill_dir] if kill_dir else [])]:
                directory.mkdir(exist_ok=True)
            cgroup.set_limits(resources)
        except OSError as exc:
            cgroup.remove()
            raise IsolationError(f"cannot set up cgroups for {name}: {exc}") from None
        return cgroup
