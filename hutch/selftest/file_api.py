"""Attacks through the file APIs (envd's `/files` and `filesystem.Filesystem`): traversal with
`..`, absolute host paths, symlinks pointing out, NUL bytes and very long names, and a race that
swaps a path component for a symlink while uploads and downloads run.

The agent serves these as the sandbox user inside the sandbox, so the kernel is the final judge
there; hutch's own walks of a workspace on the host (disk usage, chown) are attacked the same way
(`host_walks`, `SymlinkSwapper`). What must hold is that every answer is the precise refusal
(400 for a path that cannot be one, 403 for a read-only system, 404 for what does not exist in
the sandbox), never a 5xx, never a byte of the host, and that the host's files and the other
sessions are untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import httpx

from hutch.selftest.api_abuse import Checks
from hutch.selftest.report import Outcome
from hutch.selftest.stage import ROOT, ROOTS, Stage, digests, runtime_of, template_digests


def traversal(stage: Stage, backend: str) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    session = stage.attacker_session(backend)
    canary = str(stage.canary_path)
    victim_file = stage.victims[backend].record["workspace_path"] + "/victim-secret.txt"
    made = session.sh(f"ln -sfn {canary} ~/out-file; ln -sfn / ~/out-root; ln -sfn {victim_file} ~/out-victim; echo ok")
    checks.expect("symlinks pointing out, made inside", made.text.strip(), "ok")
    for name, path, allowed in (
        ("`..` up to /etc/shadow", "../../../../etc/shadow", (404,)),
        ("the host canary's absolute path", canary, (404,)),
        ("through /proc/1/root to the canary", f"/proc/1/root/../..{canary}", (404,)),
        ("the victim's workspace by host path", victim_file, (404,)),
        ("a symlink to the canary", "out-file", (404,)),
        # gVisor (runsc 2022) resolves every path below a symlink to / as / itself: a directory
        ("a symlink to / then etc/shadow", "out-root/etc/shadow", (404, 400) if backend == "gvisor" else (404,)),
        ("a symlink to the victim's file", "out-victim", (404,)),
        ("a NUL byte", "a\x00b", (400,)),
        ("a 300-character name", "a" * 300, (400,)),
        ("a 5000-character path", "a/" * 2500, (400,)),
    ):
        answer = session.download(path)
        checks.status(f"GET /files {name}", answer, *allowed)
        checks.expect(
            f"GET /files {name}: host bytes in the answer", stage.canary_token.encode() in answer.content, False
        )
    for name, path, allowed in (
        ("/etc/passwd", "/etc/passwd", (403,)),
        ("a new file in /usr/bin", "/usr/bin/hutch-selftest", (403,)),
        ("through a symlink to the canary", "out-file", (403,)),
        ("through a symlink to /", "out-root/etc/hutch-selftest", (403, 400) if backend == "gvisor" else (403,)),
        ("the canary's absolute path", canary, (403,)),
        ("a NUL byte", "x\x00y", (400,)),
    ):
        checks.status(f"POST /files {name}", session.upload(path, b"owned"), *allowed)
    multipart = session.http.post(
        f"{session.base}/files",
        files={"file": ("../../../../etc/cron.d/hutch-selftest", b"* * * * * root id", "text/plain")},
    )
    checks.status("POST /files multipart, filename ../../../../etc/cron.d/...", multipart, 403)
    for method, message, allowed in (  # type: ignore[assignment]
        # /usr is another (read-only) file system: the kernel says EXDEV before EROFS
        ("Move", {"source": "/home/user/out-file", "destination": "/usr/bin/moved"}, "400 failed_precondition"),
        ("Move", {"source": "/etc/passwd", "destination": "/etc/passwd.old"}, "403 permission_denied"),
        ("Remove", {"path": "/usr/bin/python3"}, "403 permission_denied"),
        ("MakeDir", {"path": "/hutch-selftest"}, "403 permission_denied"),
        ("Stat", {"path": canary}, "404 not_found"),
        ("ListDir", {"path": stage.target.data_dir.as_posix()}, "404 not_found"),
    ):
        answer = session.rpc(f"filesystem.Filesystem/{method}", message)
        status, _, code = allowed.partition(" ")  # type: ignore[union-attr]
        checks.status(f"Filesystem/{method} {list(message.values())}", answer, int(status), code=code)
    title = "path traversal through the file APIs: .., absolute paths, symlinks out, NUL bytes, long names"
    return _outcome(stage, "file-api-traversal", title, backend, checks, started)


def traversal_as_root(stage: Stage, backend: str = ROOT) -> Outcome:
    """The same paths as root inside a template's session (E2B's `user="root"`): root owns its
    `/etc` and `/usr` (its copies in its upper layer), so reading and writing them succeeds; what
    must hold is that every read is the template's file or a refusal, never the host's, and every
    write lands in this session's upper layer, never in the template's shared layers or on the
    host. A fresh session: these writes spoil its system for the attacks after this one."""
    started = time.monotonic()
    checks = Checks()
    session = stage.attacker_session(backend, fresh=True)
    record = session.instance()
    layers = [Path(layer) for layer in record["spec"]["rootfs"]["layer_paths"]]
    upper = Path(record["workspace_path"]) / "upper"
    host_shadow, template_shadow = (
        digests(Path("/")).get("/etc/shadow"),
        template_digests(record["spec"]["rootfs"]["layer_paths"]).get("/etc/shadow"),
    )
    layer_before = {str(p): _digest_of(p) for layer in layers for p in (layer / "etc/issue", layer / "usr/bin/python3")}
    canary = str(stage.canary_path)
    victim_file = stage.victims[backend].record["workspace_path"] + "/victim-secret.txt"
    made = session.sh(f"ln -sfn {canary} ~/out-file; ln -sfn / ~/out-root; ln -sfn {victim_file} ~/out-victim; echo ok")
    checks.expect("symlinks pointing out, made inside", made.text.strip(), "ok")
    # gVisor (runsc 2022) resolves every path below a symlink to / as / itself, a directory: such
    # a path is refused (400), and reads and writes through it do not happen.
    below_root_link = (200, 400) if runtime_of(backend) == "gvisor" else (200,)
    for name, path, allowed in (
        ("`..` up to /etc/shadow", "../../../../etc/shadow", (200,)),
        ("a symlink to / then etc/shadow", "out-root/etc/shadow", below_root_link),
    ):
        answer = session.download(path)
        checks.status(f"GET /files {name}", answer, *allowed)
        if answer.status_code != 200:
            continue
        seen = hashlib.sha256(answer.content).hexdigest()
        checks.expect(
            f"GET /files {name}: the template's own /etc/shadow", seen == template_shadow != host_shadow, True
        )
    for name, path, allowed in (
        ("the host canary's absolute path", canary, (404,)),
        ("through /proc/1/root to the canary", f"/proc/1/root/../..{canary}", (404,)),
        ("the victim's workspace by host path", victim_file, (404,)),
        ("a symlink to the canary", "out-file", (404,)),
        ("a symlink to the victim's file", "out-victim", (404,)),
        ("a NUL byte", "a\x00b", (400,)),
        ("a 5000-character path", "a/" * 2500, (400,)),
    ):
        answer = session.download(path)
        checks.status(f"GET /files {name}", answer, *allowed)
        checks.expect(
            f"GET /files {name}: host bytes in the answer", stage.canary_token.encode() in answer.content, False
        )
    # Writes root may make: each must land in the session's upper layer.
    refused = set()
    for name, path, allowed in (
        # (not /etc/passwd: the agent finds root there, and a session that overwrote it has no root)
        ("a template's file: /etc/issue", "/etc/issue", (200,)),
        ("a new file in /usr/bin", "/usr/bin/hutch-selftest", (200,)),
        ("through a symlink to / then etc", "out-root/etc/hutch-selftest", below_root_link),
        ("the canary's absolute path (the session's own /var/tmp)", canary, (200,)),
        ("through a symlink to the canary", "out-file", (200,)),
    ):
        answer = session.upload(path, b"owned")
        checks.status(f"POST /files {name}", answer, *allowed)
        if answer.status_code != 200:
            refused.add(path)
    checks.status("POST /files a NUL byte", session.upload("x\x00y", b"owned"), 400)
    multipart = session.http.post(
        f"{session.base}/files",
        files={"file": ("../../../../etc/cron.d/hutch-selftest", b"* * * * * root id", "text/plain")},
        headers=session.headers,
    )
    checks.status("POST /files multipart, filename ../../../../etc/cron.d/...", multipart, 200)
    for method, message in (
        ("Move", {"source": "/etc/issue", "destination": "/etc/issue.old"}),
        ("Remove", {"path": "/usr/bin/python3"}),
        ("MakeDir", {"path": "/hutch-selftest"}),
    ):
        answer = session.rpc(f"filesystem.Filesystem/{method}", message)
        checks.status(f"Filesystem/{method} {list(message.values())}", answer, 200)
    for method, message in (("Stat", {"path": "/proc/1/root/../.." + canary + ".none"}),
                            ("ListDir", {"path": stage.target.data_dir.as_posix()})):  # fmt: skip
        answer = session.rpc(f"filesystem.Filesystem/{method}", message)
        checks.status(f"Filesystem/{method} {list(message.values())}", answer, 404, code="not_found")
    # Where it all went: the upper layer, nowhere else.
    for inside in ("etc/issue.old", "usr/bin/hutch-selftest", "etc/hutch-selftest", "etc/cron.d/hutch-selftest",
                   "hutch-selftest", canary.lstrip("/")):  # fmt: skip
        if inside == "etc/hutch-selftest" and "out-root/etc/hutch-selftest" in refused:
            checks.note("/etc/hutch-selftest: its write was refused")
        else:
            checks.expect(f"/{inside} is in the session's upper layer", os.path.lexists(upper / inside), True)
        if inside != canary.lstrip("/"):
            checks.expect(f"/{inside} on the host", os.path.lexists(Path("/") / inside), False)
        checks.expect(
            f"/{inside} in the template's layers", any(os.path.lexists(layer / inside) for layer in layers), False
        )
    layer_after = {path: _digest_of(Path(path)) for path in layer_before}
    checks.expect("the template's /etc/issue and /usr/bin/python3, unchanged", layer_after == layer_before, True)
    checks.expect("the host canary", _digest_of(stage.canary_path) == stage.canary_digest, True)
    session.delete()
    title = "the file APIs as root inside: reads are the template's, writes land in the session's upper layer"
    return _outcome(stage, "file-api-root", title, backend, checks, started)


def _digest_of(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


SWAPPER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
home = os.path.expanduser("~")
os.makedirs(f"{home}/race", exist_ok=True)
target = sys.argv[1]
if os.path.lexists(f"{home}/race.other"):
    os.unlink(f"{home}/race.other")
os.symlink(target, f"{home}/race.other")
a, b = f"{home}/race".encode(), f"{home}/race.other".encode()
end = time.monotonic() + float(sys.argv[2])
swaps = 0
while time.monotonic() < end:
    if libc.syscall(316, -100, a, -100, b, 2) != 0:  # renameat2(RENAME_EXCHANGE)
        try:  # no RENAME_EXCHANGE (gVisor): the same swap in three renames
            os.rename(a, f"{home}/race.tmp"); os.rename(b, a); os.rename(f"{home}/race.tmp", b)
        except OSError:
            continue  # an upload made the directory again meanwhile
    swaps += 1
print(swaps)
"""


def race(stage: Stage, backend: str) -> Outcome:
    """Swap `~/race` (a directory) with a symlink pointing out while uploads and downloads of
    `race/f` run, and while the host reads the session's disk usage."""
    started = time.monotonic()
    checks = Checks()
    session = stage.attacker_session(backend)
    seconds = 3.0
    swapped: list[str] = []
    # Its own client: the swapper's request runs beside the uploads and downloads.
    inside = dataclasses.replace(
        session, tenant=dataclasses.replace(session.tenant, http=httpx.Client(base_url=stage.target.url,
                                            headers={"X-API-Key": session.tenant.api_key}, timeout=60))
    )  # fmt: skip
    argv = ["python3", "-c", SWAPPER, str(stage.canary_path.parent), str(seconds)]
    swapper = threading.Thread(target=lambda: swapped.append(inside.run(argv).text.strip()), daemon=True)
    swapper.start()
    statuses: dict[int, int] = {}
    leaks = 0
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        up = session.upload("race/f", b"mine")
        down = session.download("race/f")
        for answer in (up, down):
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        leaks += stage.canary_token.encode() in down.content
        rounds += 1
    swapper.join(60)
    inside.http.close()
    usage = session.http.get(f"/v1/functions/{session.function}/sessions/{session.key}/usage").json()
    checks.note(f"{swapped[0] if swapped else '?'} swaps inside during {rounds} upload+download rounds")
    checks.note(f"answers: {dict(sorted(statuses.items()))}")
    checks.expect("answers that were 5xx", sum(n for s, n in statuses.items() if s >= 500), 0)
    checks.expect("downloads holding host bytes", leaks, 0)
    checks.expect("the agent afterwards", session.sh("echo alive").text.strip(), "alive")
    checks.note(f"the session's disk usage as the host measured it: {usage.get('diskPeakBytes', usage)} bytes")
    title = "a path component swapped for a symlink out while uploads and downloads run"
    return _outcome(stage, "file-api-race", title, backend, checks, started)


class SymlinkSwapper:
    """Plays, on the host, a sandbox rewriting its workspace while hutch walks it: swaps atomically
    and over and over a directory with a symlink to `host_dir`, and another with a FIFO."""

    RENAME_EXCHANGE = 2

    def __init__(self, workspace: Path, host_dir: Path) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.pairs = []
        for name, make in (("d", lambda p: os.symlink(host_dir, p)), ("e", os.mkfifo)):
            (workspace / name).mkdir()
            (workspace / name / "small").write_bytes(b"x")
            make(workspace / f"{name}.other")
            self.pairs.append((str(workspace / name).encode(), str(workspace / f"{name}.other").encode()))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._swap, daemon=True)

    def _swap(self) -> None:
        while not self.stop.is_set():
            for a, b in self.pairs:
                self.libc.syscall(316, -100, a, -100, b, self.RENAME_EXCHANGE)  # renameat2

    def __enter__(self) -> SymlinkSwapper:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def host_walks(stage: Stage) -> Outcome:
    """hutch's own walks of a workspace (disk usage, chown to a new uid) while a symlink out and a
    FIFO are swapped in and out of it: never a byte counted, an owner changed or a wait outside.
    On a plain-directory store, the one whose usage and chown walk the tree (images use statvfs)."""
    from hutch.storage.base import chown_tree
    from hutch.storage.local import DirectoryStore

    started = time.monotonic()
    checks = Checks()
    root = stage.root / "host-walks"
    host_dir = root / "host-dir"
    host_dir.mkdir(parents=True)
    (host_dir / "big").write_bytes(os.urandom(4 << 20))
    store = DirectoryStore(root / "store")
    uid = stage.target.uid_base + 1000
    workspace = store.attach("t/s", uid, 0)
    finished = threading.Event()
    sizes: list[int] = []

    def walks() -> None:
        for n in range(600):
            sizes.append(store.usage_bytes("t/s", workspace))
            chown_tree(workspace, uid + n % 2, uid + n % 2)
        finished.set()

    with SymlinkSwapper(workspace, host_dir):
        threading.Thread(target=walks, daemon=True).start()
        done = finished.wait(120)
    checks.expect("600 usage walks and chowns finished (none blocked on the FIFO)", done, True)
    checks.expect("walks that counted the 4 MiB host file", sum(size > 1 << 20 for size in sizes), 0)
    owners = {p.stat().st_uid for p in (host_dir, host_dir / "big")}
    checks.expect("owners of the host directory and its file afterwards", owners, {0})
    shutil.rmtree(root, ignore_errors=True)
    ok, bystanders = stage.bystanders()
    title = "hutch's walks of a workspace (usage, chown) while the sandbox swaps in a symlink out"
    return Outcome(
        "host-walks-workspace", "files", title, "host", checks.ok, checks.evidence, ok, bystanders, {},
        time.monotonic() - started,
    )  # fmt: skip


def _outcome(stage: Stage, attack: str, title: str, backend: str, checks: Checks, started: float) -> Outcome:
    ok, bystanders = stage.bystanders()
    return Outcome(
        attack, "files", title, backend, checks.ok, checks.evidence, ok, bystanders, {}, time.monotonic() - started
    )


def plan(backends: tuple[str, ...]) -> list:
    from hutch.selftest.battery import Attack, on_backend

    steps = [
        Attack(name, backend, on_backend(run, backend))
        for name, run in (("file-api-traversal", traversal), ("file-api-race", race))
        for backend in backends
        if backend not in ROOTS
    ]
    for cast in ROOTS:  # root's expectations are its own (it owns /etc); the race is the same
        if cast in backends:
            steps += [
                Attack("file-api-root", cast, on_backend(traversal_as_root, cast)),
                Attack("file-api-race", cast, on_backend(race, cast)),
            ]
    return [*steps, Attack("host-walks-workspace", "host", host_walks)]
