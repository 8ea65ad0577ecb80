"""What this test run left on the host: the check behind `tests/conftest.py`'s leak guard.

Scoped to this run, so that other hutch processes on the machine (other checkouts running their
own tests at the same time) never fail it:
- roots: every directory the run made with `tempfile.mkdtemp` (recorded by a wrapper installed
  at import) and pytest's own base temp directory;
- data dirs: the directories at most two levels below a root that hold an `instances/` directory
  (a runtime made it), recorded before each test's fixtures are torn down;
- from those, the names hutch derives from a data dir: cgroups `hutch-<hash>`, network
  namespaces `hutch-<tag>-<slot>`, links `hv<tag>…`, the nftables table `hutch_<tag>`.

`leaks()` lists, naming each: processes whose command line names a root, mounts whose point or
source lies below a root, loop devices backed by a file below a root, and the derived cgroups,
namespaces, links and tables that still exist.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

roots: set[str] = set()
data_dirs: set[str] = set()


def record_mkdtemp() -> None:
    """Record every directory `tempfile.mkdtemp` makes from now on (idempotent)."""
    original = tempfile.mkdtemp
    if getattr(original, "_records_roots", False):
        return

    @functools.wraps(original)
    def mkdtemp(*args, **kwargs):
        path = original(*args, **kwargs)
        roots.add(os.path.realpath(path))
        return path

    mkdtemp._records_roots = True  # type: ignore[attr-defined]
    tempfile.mkdtemp = mkdtemp


def find_data_dirs() -> None:
    for root in list(roots):
        if not os.path.isdir(root):
            continue
        level = [root]
        for _ in range(3):
            deeper = []
            for directory in level:
                try:
                    entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
                if any(e.name == "instances" for e in entries):
                    data_dirs.add(directory)
                deeper += [e.path for e in entries if not e.name.startswith(".") and e.name != "workspaces"]
            level = deeper


def _derived(dirs: set[str]) -> tuple[set[str], set[str]]:
    from hutch.runtime.local import short_hash
    from hutch.runtime.network import network_tag

    cgroups = {f"hutch-{short_hash(Path(d))}" for d in dirs}
    tags = {network_tag(Path(d)) for d in dirs}
    return cgroups, tags


def leaks(only: Path | None = None) -> list[str]:
    """What is left on the host of this run (or, with `only`, of that one data directory)."""
    scope = {os.path.realpath(only)} if only is not None else roots
    dirs = scope if only is not None else data_dirs

    def _under(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in scope)

    found: list[str] = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmdline and any(r in cmdline for r in scope):
            found.append(f"process {entry.name}: {cmdline[:200]}")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            source = fields[fields.index("-") + 2] if "-" in fields else ""
            if _under(point) or _under(source):
                found.append(f"mount {point} ({source})")
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    for line in loops.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and _under(parts[1].strip().removesuffix(" (deleted)")):
            found.append(f"loop device {parts[0]} ({parts[1].strip()})")
    cgroups, tags = _derived(dirs)
    if cgroups:
        for top in Path("/sys/fs/cgroup").iterdir():
            for directory, names, _ in os.walk(top):
                if directory.count("/") > 9:
                    names[:] = []
                    continue
                for name in names:
                    if name in cgroups:
                        found.append(f"cgroup {directory}/{name}")
    if tags:
        netns = Path("/run/netns")
        for entry in sorted(netns.iterdir()) if netns.is_dir() else []:
            if any(entry.name.startswith(f"hutch-{t}-") for t in tags):
                found.append(f"network namespace {entry.name}")
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            name = line.split(":", 2)[1].strip().split("@", 1)[0] if line.count(":") >= 2 else ""
            if any(name.startswith(f"hv{t}") for t in tags):
                found.append(f"link {name}")
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        for line in tables.splitlines():
            if any(line.strip() == f"table inet hutch_{t}" for t in tags):
                found.append(f"nftables {line.strip()}")
    return found
