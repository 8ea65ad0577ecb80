"""Attacks of root inside that only the host can judge: writing the template's shared lower layer,
and who root inside is on the host.

A template's layers are one tree on the host that every instance of the template mounts
read-only under an upper layer of its own (`hutch.runtime.rootfs`). Root inside may change any
file of its `/`: what it writes, replaces or deletes must land in its session's upper layer
only, the layer on the host must stay byte for byte what it was, and another session of the
same template (the victim's, another tenant's; and a fresh one of the attacker's own tenant)
must still see the template's files. Inside, the layer's host paths must not exist at all.

Root inside is namespaced root: on the host every process of the session runs as a uid of the
instance's own range, never host root, never another instance's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from hutch.runtime.userns import RANGE
from hutch.selftest.api_abuse import Checks
from hutch.selftest.report import Outcome
from hutch.selftest.stage import ROOT, ROOTS, Stage, cgroup_procs, runtime_of
from hutch.selftest.target import Session

# A file of every Debian template that root replaces, and one it deletes, in its own session.
REPLACED = "/etc/debian_version"
NOBODY = 65534
DELETED = "/etc/issue.net"


def _layer_file(layers: list[str], path: str) -> Path | None:
    """The host path of the topmost layer's copy of `path` (layers are bottom first)."""
    for layer in reversed(layers):
        candidate = Path(layer) / path.lstrip("/")
        if os.path.lexists(candidate):
            return candidate
    return None


def _digest(path: Path | None) -> str:
    if path is None:
        return "absent"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _tree_digest(layers: list[str]) -> str:
    """Names, sizes, modes, owners and mtimes of every entry of the layers' /etc and /usr/local."""
    h = hashlib.sha256()
    for layer in layers:
        for top in ("etc", "usr/local"):
            for directory, dirs, files in os.walk(Path(layer) / top):
                dirs.sort()
                for name in sorted(dirs + files):
                    st = os.lstat(os.path.join(directory, name))
                    h.update(f"{directory}/{name} {st.st_size} {st.st_mode} {st.st_uid} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _sees(session: Session, new_file: str) -> str:
    """What a session of the template sees of the attacker's three changes, as JSON."""
    code = (
        "import json, os, hashlib\n"
        f"print(json.dumps([os.path.exists({new_file!r}), "
        f"hashlib.sha256(open({REPLACED!r}, 'rb').read()).hexdigest()[:16], os.path.exists({DELETED!r})]))"
    )
    return session.python(code, timeout=60).text.strip()


def lower_layer(stage: Stage, backend: str = ROOT) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker_session(backend)
    record = attacker.instance()
    layers = list(record["spec"]["rootfs"]["layer_paths"])
    token = "hutch-selftest-" + uuid.uuid4().hex[:12]
    new_file = f"/usr/lib/{token}"
    before = {path: _digest(_layer_file(layers, path)) for path in (REPLACED, DELETED)}
    tree_before = _tree_digest(layers)
    checks.note(f"template layers on the host: {', '.join(layers)}")

    program = f"""
import json, os
results = {{}}
def attempt(name, fn):
    try:
        fn(); results[name] = "ok"
    except OSError as exc:
        import errno
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
def write(path, data):
    with open(path, "w") as f:
        f.write(data)
attempt("write-new-file", lambda: write({new_file!r}, {token!r}))
attempt("replace-template-file", lambda: write({REPLACED!r}, {token!r}))
attempt("delete-template-file", lambda: os.unlink({DELETED!r}))
# overlayfs's own metadata, forged through the overlay: a redirect out of /usr, an opaque /etc
attempt("forge-overlay-redirect", lambda: os.setxattr("/usr", "user.overlay.redirect", b"/../../.."))
attempt("forge-overlay-opaque", lambda: os.setxattr("/etc", "user.overlay.opaque", b"y"))
layers = {json.dumps(layers)}
attempt("write-layer-by-host-path", lambda: write(layers[-1] + {REPLACED!r}, {token!r}))
attempt("list-layer-by-host-path", lambda: os.listdir(layers[-1]))
attempt("list-layers-dir", lambda: os.listdir(os.path.dirname(layers[-1])))
# The directories the overlay's mount options name (as bwrap saw them while setting up).
named = []
for line in open("/proc/self/mountinfo").read().splitlines():
    head, _, tail = line.partition(" - ")
    if tail.startswith("overlay "):
        for option in tail.split()[2].split(","):
            if option.split("=")[0] in ("lowerdir", "upperdir", "workdir"):
                named += [p for p in option.split("=", 1)[1].split(":") if p]
results["overlay-dirs-named"] = ",".join(named) or "none"
outcomes = set()
for path in named:
    attempt("one", lambda: os.listdir(path))
    outcomes.add(results.pop("one"))
results["list-overlay-dirs"] = "|".join(sorted(outcomes)) or "none named"
print(json.dumps(results))
"""
    ran = attacker.python(program, timeout=60)
    try:
        seen = json.loads(ran.text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        seen = {}
        checks.expect("the attack ran", ran.describe(), "printed its results")
    # Inside: root changes its own copies; the layers' host paths, and what the overlay's
    # mountinfo names as its lower directories, are not there.
    checks.expect("as root, write a new file in /usr/lib", seen.get("write-new-file"), "ok")
    checks.expect(f"as root, replace {REPLACED}", seen.get("replace-template-file"), "ok")
    checks.expect(f"as root, delete {DELETED}", seen.get("delete-template-file"), "ok")
    # Linux 6.7+ stores overlay xattrs set through an overlay escaped (`user.overlay.overlay.*`):
    # plain data to the next mount of the upper layer, never its metadata. Older kernels refuse.
    # gVisor keeps no user.* attributes through its gofer (ENOTSUP), and its mountinfo is its own
    # kernel's, naming no host directory.
    gvisor = runtime_of(backend) == "gvisor"
    xattrs = ("ENOTSUP",) if gvisor else ("ok", "EPERM")
    checks.expect("set overlayfs's redirect xattr on /usr", seen.get("forge-overlay-redirect"), *xattrs)
    checks.expect("set overlayfs's opaque xattr on /etc", seen.get("forge-overlay-opaque"), *xattrs)
    checks.expect("write the layer by its host path", seen.get("write-layer-by-host-path"), "ENOENT")
    checks.expect("list the layer by its host path", seen.get("list-layer-by-host-path"), "ENOENT")
    checks.expect("list the template store's layers", seen.get("list-layers-dir"), "ENOENT")
    checks.note(f"the overlay's directories, as mountinfo names them: {seen.get('overlay-dirs-named')}")
    checks.expect("list the directories mountinfo names", seen.get("list-overlay-dirs"),
                  "none named" if gvisor else "ENOENT")  # fmt: skip

    # On the host: the layers are what they were; the changes are in the attacker's upper layer.
    after = {path: _digest(_layer_file(layers, path)) for path in (REPLACED, DELETED)}
    checks.expect(f"the layer's {REPLACED} unchanged", after[REPLACED] == before[REPLACED], True)
    checks.expect(f"the layer's {DELETED} still there", after[DELETED] == before[DELETED] != "absent", True)
    checks.expect("the new file in no layer", _layer_file(layers, new_file) is None, True)
    checks.expect("the layers' /etc and /usr/local unchanged (names, sizes, modes, owners, times)",
                  _tree_digest(layers) == tree_before, True)  # fmt: skip
    upper = Path(record["workspace_path"]) / "upper"
    landed = upper / new_file.lstrip("/")
    checks.expect("the new file landed in the attacker's upper layer", landed.exists(), True)
    whiteout = upper / DELETED.lstrip("/")
    checks.expect(
        f"{DELETED} deleted by a whiteout in the attacker's upper layer",
        whiteout.is_char_device() and os.stat(whiteout, follow_symlinks=False).st_rdev == 0,
        True,
    )

    for name, key in (("usr", "redirect"), ("etc", "opaque")):
        path = upper / name
        names = set(os.listxattr(path, follow_symlinks=False)) if path.exists() else set()
        checks.expect(f"the upper layer's {name} carries overlayfs's {key} xattr",
                      f"user.overlay.{key}" in names or f"trusted.overlay.{key}" in names, False)  # fmt: skip
    listing = attacker.python("import os; print(len(os.listdir('/usr')), len(os.listdir('/etc')))").text.split()
    checks.expect("/usr and /etc still list the template's entries inside", all(int(n) > 5 for n in listing)
                  and len(listing) == 2, True)  # fmt: skip

    # Other sessions of the template see the template's files.
    template_view = json.dumps([False, before[REPLACED], True])
    checks.expect("another tenant's session of the template sees", _sees(stage.victims[backend].session, new_file),
                  template_view)  # fmt: skip
    fresh = stage.attacker_session(backend, fresh=True)
    try:
        checks.expect("a new session of the attacker's own tenant sees", _sees(fresh, new_file), template_view)
    finally:
        fresh.delete()
    checks.expect("the attacker's own session sees its changes", _sees(attacker, new_file),
                  json.dumps([True, hashlib.sha256(token.encode()).hexdigest()[:16], False]))  # fmt: skip
    ok, bystanders = stage.bystanders()
    return Outcome(
        "rootfs-lower-layer", "files",
        "as root inside, write, replace and delete the template's files, and its shared layer by host path",
        backend, checks.ok, checks.evidence, ok, bystanders, seconds=time.monotonic() - started,
    )  # fmt: skip


def host_identity(stage: Stage, backend: str = ROOT) -> Outcome:
    """Every process of a root session, seen from the host, runs as a uid of its own instance's
    range: root inside is host uid `base`, never 0."""
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker_session(backend)
    attacker.spawn(["sleep", "60"])  # a process of root's, besides the agent
    record = attacker.instance()
    victim = stage.victims[backend].record
    gvisor = runtime_of(backend) == "gvisor"
    uid_map = _uid_map(record, gvisor)
    base = int(uid_map[1])
    victim_base = int(_uid_map(victim, gvisor)[1])
    checks.expect("uid_map of the instance (inside, count)", (uid_map[0], uid_map[2]), ("0", str(RANGE)))
    checks.expect("root inside is an unprivileged host uid", base >= RANGE, True)
    checks.expect("the attacker's range is apart from the victim's", abs(base - victim_base) >= RANGE, True)
    uids = set()
    for pid in cgroup_procs(record):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(("Uid:", "Gid:")):
                uids |= {int(x) for x in line.split()[1:]}
    checks.note(f"host uids and gids of the session's processes: {sorted(uids)} (range from {base})")
    # gVisor's sentry (and its ptrace stubs) run as host `nobody` in a user namespace of their
    # own, by gVisor's design: they open no host file. Its gofer is the instance's root.
    apart = {NOBODY} if gvisor else set()
    checks.expect("every host uid/gid within the instance's range" + (" (or the sentry's nobody)" if gvisor else ""),
                  all(base <= u < base + RANGE or u in apart for u in uids), True)  # fmt: skip
    checks.expect("a process runs as host root", 0 in uids, False)
    # What root inside makes is stored with its inside owners: a setuid-root file is setuid host
    # root on disk. Only host root may reach it, and its file system runs nothing setuid.
    made = attacker.sh("cp /bin/true /usr/local/bin/suid-true && chmod 4755 /usr/local/bin/suid-true && echo made")
    checks.expect("as root, make a setuid-root file", made.text.strip(), "made")
    workspace = Path(record["workspace_path"])
    on_disk = workspace / "upper/usr/local/bin/suid-true"
    st = os.stat(on_disk) if on_disk.exists() else None
    checks.note(f"on the host it is {on_disk}: " + (f"uid {st.st_uid}, mode {st.st_mode:o}" if st else "absent"))
    home = os.stat(workspace)
    checks.expect("the workspace holding it: owner and mode", (home.st_uid, f"{home.st_mode & 0o777:o}"), (0, "700"))
    checks.expect("its host mount is nosuid (or it is no mount: a directory workspace under 0700)",
                  _nosuid(workspace), True, None)  # fmt: skip
    ok, bystanders = stage.bystanders()
    return Outcome(
        "rootfs-host-identity", "privilege", "who root inside is on the host",
        backend, checks.ok, checks.evidence, ok, bystanders, seconds=time.monotonic() - started,
    )  # fmt: skip


MOUNT_POINT_PLANTS = r"""
import errno, json, os
results = {}
def attempt(name, fn):
    try:
        fn(); results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode.get(exc.errno, str(exc.errno))
# While mounted, bwrap's mount points cannot be swapped for links: busy, or (a directory of
# the template's) not renamed across the overlay's layers.
attempt("unlink-sudo", lambda: os.unlink("/usr/bin/sudo"))
attempt("rename-run-dir", lambda: os.rename("/run/hutch", "/run/hutch.old"))
attempt("rmdir-agent-root", lambda: os.rmdir("/opt/hutch"))
attempt("rename-run", lambda: os.rename("/run", "/run.old"))
attempt("rename-opt", lambda: os.rename("/opt", "/opt.old"))
attempt("rename-usr-bin", lambda: os.rename("/usr/bin", "/usr/bin.old"))
attempt("rmdir-tmp", lambda: os.rmdir("/tmp"))
# Not mounted without a network: root may replace it, for a later instance to follow.
def plant():
    os.unlink("/etc/resolv.conf")
    os.symlink("/oldroot" + __HOST_DIR__ + "/planted", "/etc/resolv.conf")
attempt("plant-resolv-conf", plant)
print(json.dumps(results))
"""


def mount_point_links(stage: Stage, backend: str = ROOT) -> Outcome:
    """Root inside tries to replace the places bwrap mounts on with links into the host (bwrap
    sets up with the host's root at `/oldroot`); the one it can plant (`/etc/resolv.conf`,
    mounted only with a network) makes the session's next instance refuse to start, and the
    host's world-writable directory it pointed at stays empty."""
    import shutil
    import signal
    import tempfile

    started = time.monotonic()
    checks = Checks()
    host_dir = Path(tempfile.mkdtemp(prefix="hutch-selftest-plant-", dir="/var/tmp"))
    host_dir.chmod(0o1777)
    session = stage.attacker_session(backend, fresh=True)
    try:
        ran = session.python(MOUNT_POINT_PLANTS.replace("__HOST_DIR__", repr(str(host_dir))), timeout=60)
        try:
            seen = json.loads(ran.text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            seen = {}
            checks.expect("the attack ran", ran.describe(), "printed its results")
        for name, expected in (
            ("unlink-sudo", ("EBUSY",)),
            ("rename-run-dir", ("EBUSY",)),
            ("rmdir-agent-root", ("EBUSY",)),
            ("rename-run", ("EXDEV",)),
            ("rename-opt", ("EXDEV",)),
            ("rename-usr-bin", ("EXDEV",)),
            ("rmdir-tmp", ("EBUSY",)),
            ("plant-resolv-conf", ("ok",)),
        ):
            checks.expect(name, seen.get(name), *expected)
        record = session.instance()
        # The instance dies (as if it crashed): the session's next request starts another on
        # the same upper layer, which must refuse to follow the link.
        os.kill(record["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and Path(f"/proc/{record['pid']}").exists():
            time.sleep(0.1)
        again = session.run(["true"], timeout=60)
        answer = json.dumps(again.error)[:300] if again.error else again.describe()
        checks.note(f"the session's next command: {answer}")
        checks.expect("the next instance refuses the planted link",
                      "symbolic link where the sandbox mounts" in answer, True)  # fmt: skip
        checks.expect("the host directory the link named", sorted(os.listdir(host_dir)), [])
    finally:
        session.delete()
        shutil.rmtree(host_dir, ignore_errors=True)
    ok, bystanders = stage.bystanders()
    return Outcome(
        "rootfs-mount-point-links", "files",
        "as root inside, swap the places bwrap mounts on for links into the host, for the next instance",
        backend, checks.ok, checks.evidence, ok, bystanders, seconds=time.monotonic() - started,
    )  # fmt: skip


def _uid_map(record: dict, gvisor: bool) -> list[str]:
    """An instance's uid map (inside, host, count): of its pid 1 (bwrap), or of the OCI config
    its gofer runs under (gVisor: pid 1 is inside the sentry, no host process)."""
    if gvisor:
        config = json.loads((Path(record["socket_path"]).parent.parent / "config.json").read_text())
        mapping = config["linux"]["uidMappings"][0]
        return [str(mapping["containerID"]), str(mapping["hostID"]), str(mapping["size"])]
    return Path(f"/proc/{record['pid']}/uid_map").read_text().split()


def _nosuid(path: Path) -> bool | None:
    """Whether `path`'s own mount is nosuid; None when it is no mount point of its own."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return "nosuid" in fields[5].split(",")
    return None


ATTACKS = (
    ("rootfs-lower-layer", lower_layer),
    ("rootfs-host-identity", host_identity),
    ("rootfs-mount-point-links", mount_point_links),
)


def plan(backends: tuple[str, ...]) -> list:
    from hutch.selftest.battery import Attack, on_backend

    return [Attack(name, cast, on_backend(run, cast)) for cast in ROOTS if cast in backends for name, run in ATTACKS]
