"""Resource abuse: an attacker session tries to exhaust what it was given, and everyone else must
not notice.

Each attack runs in a fresh attacker session (a spoiled one is deleted afterwards) on one
backend, and is judged on the kernel's own evidence, never on timing: the error the abuse met
inside (`EAGAIN`, `ENOSPC`, `EMFILE`, an OOM kill), the instance's cgroup counters seen from the
host (pids, peak memory, OOM kills, CPU throttling), and what is left on the host after the
session is deleted. While it runs, a `Watch` samples how long another tenant's session takes to
run a command, how long `/health` takes and how long the host takes to run `/bin/true`: those
are reported, and only failures (not slowness) count against containment.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from hutch.agent import envelope
from hutch.runtime.cgroups import Cgroup
from hutch.selftest.report import Outcome
from hutch.selftest.stage import LIMITS, ROOTS, Stage, cgroup_procs
from hutch.selftest.target import Session, rss_mb


class Watch:
    """Samples bystanders' response times in a thread while an abuse runs."""

    def __init__(self, stage: Stage, backend: str, interval: float = 0.2) -> None:
        victim = stage.victims[backend]
        self.base = victim.session.base
        self.http = httpx.Client(base_url=stage.target.url, headers={"X-API-Key": victim.session.tenant.api_key})
        self.health_url = f"{stage.target.url}/health"
        self.interval = interval
        self.samples: dict[str, list[float]] = {"neighbour": [], "health": [], "host": []}
        self.failures: list[str] = []
        self.hutch_pid = stage.target.pid
        self.peak_rss = stage.target.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.http.close()

    def _time(self, name: str, action: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            action()
        except Exception as exc:
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            return
        self.samples[name].append((time.perf_counter() - started) * 1000)

    def _neighbour(self) -> None:
        response = self.http.post(
            f"{self.base}/process.Process/Start",
            content=envelope.encode({"process": {"cmd": "true"}}),
            headers={"content-type": "application/connect+json"},
            timeout=30,
        )
        if response.status_code != 200 or b'"end"' not in response.content:
            raise RuntimeError(f"HTTP {response.status_code}: {response.content[:200]!r}")

    def _health(self) -> None:
        httpx.get(self.health_url, timeout=30).raise_for_status()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._time("neighbour", self._neighbour)
            self._time("health", self._health)
            self._time("host", lambda: subprocess.run(["/bin/true"], check=True))
            self.peak_rss = max(self.peak_rss, rss_mb(self.hutch_pid))
            self._stop.wait(self.interval)

    def report(self) -> dict[str, str]:
        out = {}
        for name, values in self.samples.items():
            if values:
                out[f"{name} ms"] = f"p50 {statistics.median(values):.1f} / max {max(values):.1f} (n={len(values)})"
        out["hutch RSS peak"] = f"{self.peak_rss:.0f} MiB"
        if self.failures:
            out["failures"] = str(len(self.failures))
        return out


def _cgroup(session: Session) -> tuple[Cgroup, dict]:
    record = session.instance()
    return Cgroup.from_dict(record["detail"]["cgroup"]), record


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _counter(text: str, key: str) -> int:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _finish(
    stage: Stage,
    attack: str,
    title: str,
    backend: str,
    started: float,
    contained: bool,
    evidence: list[str],
    watch: Watch | None,
) -> Outcome:
    if watch is not None and watch.failures:
        contained = False
        evidence.append("bystanders failed during the abuse: " + "; ".join(watch.failures[:3]))
    ok, bystanders = stage.bystanders()
    return Outcome(
        attack,
        "resources",
        title,
        backend,
        contained,
        evidence,
        ok,
        bystanders,
        watch.report() if watch is not None else {},
        time.monotonic() - started,
    )


def _teardown(session: Session, evidence: list[str]) -> bool:
    """Delete the session; True when nothing of its instance is left on the host."""
    try:
        cgroup, record = _cgroup(session)
    except Exception as exc:
        evidence.append(f"instance record unreadable before delete: {exc}")
        return False
    pids = cgroup_procs(record)
    started = time.perf_counter()
    status = session.delete()
    took = (time.perf_counter() - started) * 1000
    alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    cgroups_left = [str(d) for d in cgroup.dirs.values() if d.exists()]
    instance_dir = session.tenant.target.data_dir / "instances" / record["instance_id"]
    clean = status == 204 and not alive and not cgroups_left and not instance_dir.exists()
    evidence.append(
        f"delete: HTTP {status} in {took:.0f} ms; host processes left {len(alive)} of {len(pids)}; "
        f"cgroups left {len(cgroups_left)}; instance directory {'left' if instance_dir.exists() else 'gone'}"
    )
    return clean


def _state(pid: int) -> str:
    for line in _read(Path(f"/proc/{pid}/status")).splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return ""


# -- the attacks -----------------------------------------------------------------------------------


def fork_bomb(stage: Stage, backend: str) -> Outcome:
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    with Watch(stage, backend) as watch:
        session.sh("(bash -c ':(){ :|:& };:' >/dev/null 2>&1 &) ; echo started", timeout=30)
        time.sleep(3)
        try:
            fork = "import os\ntry:\n    os.fork()\nexcept OSError as e:\n    print(e.errno)"
            probe = session.python(fork, timeout=30)
            inside = f"fork inside: {probe.text.strip() or probe.describe()}"
            # EAGAIN from fork, or the agent could not start the process, or not even take the
            # request (no thread left to serve it): each is the pids limit holding.
            refused = probe.text.strip() == "11" or any(
                word in str(probe.error) for word in ("resource_exhausted", "no process or thread left")
            )
        except Exception as exc:
            inside, refused = f"no command could start: {type(exc).__name__}", True
        cgroup, _ = _cgroup(session)
        pids_dir = cgroup.dirs.get("pids") or cgroup.dirs["unified"]
        current, limit = _read(pids_dir / "pids.current").strip(), _read(pids_dir / "pids.max").strip()
        hit = _counter(_read(pids_dir / "pids.events"), "max")
        evidence.append(inside + " (11 = EAGAIN)")
        evidence.append(f"host pids cgroup: {current} tasks of at most {limit}, limit hit {hit} times")
        within = current.isdigit() and limit.isdigit() and int(current) <= int(limit)
        clean = _teardown(session, evidence)
    return _finish(stage, "fork-bomb", "fork bomb", backend, started, refused and within and clean, evidence, watch)


HOG = "a = []\nwhile True:\n    a.append(bytearray(8 << 20))\n"
SLACK = 1 << 20


def memory_hog(stage: Stage, backend: str) -> Outcome:
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    cgroup, _ = _cgroup(session)
    epoch = session.info.get("epoch", 0)
    with Watch(stage, backend) as watch:
        try:
            result = session.python(HOG, timeout=120)
            evidence.append(f"the hog: {result.describe()}")
        except httpx.HTTPError as exc:
            evidence.append(f"the hog's stream broke: {type(exc).__name__} (its instance was killed)")
        peak = cgroup.stats()[2]
        kills = cgroup.oom_kills()
        limit = LIMITS["memoryMB"] * 1024 * 1024
        evidence.append(f"peak memory {peak} bytes of a {limit} byte limit; OOM kills {kills}")
        after = session.sh("echo alive", timeout=60)
        epoch_after = session.refresh().get("epoch", 0)
        answer = after.text.strip() or after.describe()
        evidence.append(f"the session afterwards: {answer} (epoch {epoch} -> {epoch_after})")
        # The kernel charges pages to a cgroup in per-CPU batches: its peak may pass the limit by those.
        contained = kills >= 1 and peak <= limit + SLACK and after.text.strip() == "alive"
        _teardown(session, evidence)
    return _finish(stage, "memory-hog", "memory hog", backend, started, contained, evidence, watch)


def cpu_spin(stage: Stage, backend: str) -> Outcome:
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    cgroup, _ = _cgroup(session)
    cpu_dir = cgroup.dirs.get("cpu") or cgroup.dirs["unified"]
    before = cgroup.stats()[0]
    throttled_before = _counter(_read(cpu_dir / "cpu.stat"), "nr_throttled")
    with Watch(stage, backend) as watch:
        wall = time.monotonic()
        session.sh("for i in 1 2 3 4; do timeout 3 sh -c 'while :; do :; done' & done; wait", timeout=60)
        wall = time.monotonic() - wall
    used = cgroup.stats()[0] - before
    throttled = _counter(_read(cpu_dir / "cpu.stat"), "nr_throttled") - throttled_before
    evidence.append(f"4 spinners for 3 s used {used:.2f} CPU-s in {wall:.1f} s wall with a {LIMITS['cpu']} vCPU quota")
    evidence.append(f"CFS throttled the instance {throttled} times")
    _teardown(session, evidence)
    return _finish(stage, "cpu-spin", "CPU spin", backend, started, throttled > 0, evidence, watch)


def _fill(stage: Stage, backend: str, attack: str, title: str, code: str, judge) -> Outcome:
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    free_before = _host_free()
    with Watch(stage, backend) as watch:
        result = session.python(code, timeout=180)
        evidence.append(f"inside: {result.text.strip() or result.describe()}")
        contained = judge(result.text.strip())
        used = (free_before - _host_free()) >> 20
        evidence.append(f"host disk of the data directory used meanwhile: {used} MiB")
        after = session.sh("echo alive")
        evidence.append(f"the session afterwards: {after.text.strip() or after.describe()}")
        contained &= after.text.strip() == "alive"
        _teardown(session, evidence)
    return _finish(stage, attack, title, backend, started, contained, evidence, watch)


def _host_free() -> int:
    import os

    st = os.statvfs("/var/tmp")
    return st.f_bavail * st.f_frsize


FILL_DISK = """
import errno, os
written = 0
try:
    with open(os.path.expanduser("~/fill"), "wb") as f:
        while True:
            f.write(b"x" * (1 << 20)); f.flush(); os.fsync(f.fileno()); written += 1
except OSError as e:
    print(errno.errorcode[e.errno], written)
"""


def disk_fill(stage: Stage, backend: str) -> Outcome:
    limit = LIMITS["diskMB"]

    def judge(text: str) -> bool:
        name, _, written = text.partition(" ")
        return name in ("ENOSPC", "EDQUOT") and written.isdigit() and int(written) <= limit

    return _fill(stage, backend, "workspace-disk-fill", "fill the workspace's disk", FILL_DISK, judge)


FILL_SYSTEM = FILL_DISK.replace('os.path.expanduser("~/fill")', '"/usr/lib/hutch-selftest-fill"')


def overlay_fill(stage: Stage, backend: str) -> Outcome:
    """Root inside fills the disk through its root file system (the overlay's upper layer, in the
    session's workspace): the workspace's limit stops it, the template's layer takes nothing."""
    limit = LIMITS["diskMB"]

    def judge(text: str) -> bool:
        name, _, written = text.partition(" ")
        return name in ("ENOSPC", "EDQUOT") and written.isdigit() and int(written) <= limit

    return _fill(stage, backend, "overlay-disk-fill", "as root, fill the disk through /usr (the overlay)",
                 FILL_SYSTEM, judge)  # fmt: skip


FILL_INODES = """
import errno, os
os.makedirs(os.path.expanduser("~/many"), exist_ok=True)
n = 0
try:
    while True:
        open(os.path.expanduser(f"~/many/{n}"), "w").close(); n += 1
except OSError as e:
    print(errno.errorcode[e.errno], n)
"""


def inode_fill(stage: Stage, backend: str) -> Outcome:
    def judge(text: str) -> bool:
        name, _, made = text.partition(" ")
        return name in ("ENOSPC", "EDQUOT") and made.isdigit() and int(made) < 1_000_000

    return _fill(stage, backend, "workspace-inode-fill", "fill the workspace's inodes", FILL_INODES, judge)


FILL_TMP = FILL_DISK.replace('os.path.expanduser("~/fill")', '"/tmp/fill"')


def tmp_fill(stage: Stage, backend: str) -> Outcome:
    limit = LIMITS["tmpMB"]

    def judge(text: str) -> bool:
        name, _, written = text.partition(" ")
        return name == "ENOSPC" and written.isdigit() and int(written) <= limit

    return _fill(stage, backend, "tmp-fill", "fill /tmp", FILL_TMP, judge)


FDS = """
import errno, resource
files = []
try:
    while True:
        files.append(open("/dev/null"))
except OSError as e:
    print(errno.errorcode[e.errno], len(files), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
"""


def fd_exhaustion(stage: Stage, backend: str) -> Outcome:
    def judge(text: str) -> bool:
        return text.partition(" ")[0] == "EMFILE"

    return _fill(stage, backend, "fd-exhaustion", "exhaust file descriptors", FDS, judge)


THREADS = """
import threading, time
stop = threading.Event()
n = 0
try:
    while True:
        threading.Thread(target=stop.wait, daemon=True).start(); n += 1
except RuntimeError as e:
    print("refused", n, str(e).replace(" ", "-"))
stop.set()
"""


def thread_flood(stage: Stage, backend: str) -> Outcome:
    def judge(text: str) -> bool:
        word, _, rest = text.partition(" ")
        count = rest.split(" ")[0]
        return word == "refused" and count.isdigit() and int(count) <= LIMITS["pids"]

    return _fill(stage, backend, "thread-flood", "a flood of threads", THREADS, judge)


def _agent_rss(record: dict) -> float:
    """The largest resident size among the instance's host processes running the agent (bwrap)."""
    best = 0.0
    for pid in cgroup_procs(record):
        try:
            if b"hutch.agent" in Path(f"/proc/{pid}/cmdline").read_bytes():
                best = max(best, rss_mb(pid))
        except OSError:
            pass
    return best


def stdout_flood(stage: Stage, backend: str) -> Outcome:
    """`yes` through the gateway: read as fast as possible for a while, then not at all."""
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    cgroup, record = _cgroup(session)
    rss_before = stage.target.rss_mb()
    agent_peak = _agent_rss(record)
    with Watch(stage, backend) as watch:
        # 1. A fast reader: what goes through is bounded by nothing but speed.
        got = 0
        began = time.monotonic()
        with session.http.stream(
            "POST",
            f"{session.base}/process.Process/Start",
            content=envelope.encode({"process": {"cmd": "yes"}}),
            headers={"content-type": "application/connect+json"},
            timeout=60,
        ) as response:
            for chunk in response.iter_raw():
                got += len(chunk)
                agent_peak = max(agent_peak, _agent_rss(record))
                if time.monotonic() - began > 3:
                    break
        rate = got / (time.monotonic() - began) / (1 << 20)
        evidence.append(f"fast reader: {got >> 20} MiB of `yes` in 3 s ({rate:.0f} MiB/s)")
        # 2. A reader that stalls: the agent and the gateway must hold back, not buffer.
        with session.http.stream(
            "POST",
            f"{session.base}/process.Process/Start",
            content=envelope.encode({"process": {"cmd": "yes"}}),
            headers={"content-type": "application/connect+json"},
            timeout=60,
        ):
            for _ in range(15):
                time.sleep(0.2)
                agent_peak = max(agent_peak, _agent_rss(record))
        session.sh("pkill -x yes; true")
        memory_peak = cgroup.stats()[2] >> 20
        grew = watch.peak_rss - rss_before
        evidence.append(f"hutch RSS {rss_before:.0f} -> peak {watch.peak_rss:.0f} MiB (+{grew:.0f})")
        if backend == "bwrap":
            evidence.append(f"agent RSS peak {agent_peak:.0f} MiB")
        evidence.append(f"instance memory peak {memory_peak} MiB (cgroup, limit {LIMITS['memoryMB']})")
        after = session.sh("echo alive")
        evidence.append(f"the session afterwards: {after.text.strip() or after.describe()}")
        contained = grew < 64 and after.text.strip() == "alive" and (backend != "bwrap" or agent_peak < 128)
        _teardown(session, evidence)
    return _finish(stage, "stdout-flood", "huge output on stdout (`yes`)", backend, started, contained, evidence, watch)


def interpreter_flood(stage: Stage, backend: str) -> Outcome:
    """A cell that prints without end: the kernel may die of its own memory, nothing else."""
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    rss_before = stage.target.rss_mb()
    with Watch(stage, backend) as watch:
        got = 0
        began = time.monotonic()
        lines: list[bytes] = []
        try:
            with session.http.stream(
                "POST", f"{session.base}/execute", json={"code": "while True: print('x' * 10000)"}, timeout=120
            ) as response:
                for line in response.iter_lines():
                    got += len(line)
                    if '"type":"error"' in line.replace(" ", ""):
                        lines.append(line.encode()[:300])
                    if time.monotonic() - began > 4:
                        break
        except httpx.HTTPError as exc:  # gVisor: the instance died of its memory under the stream
            lines.append(f"the stream broke: {type(exc).__name__}".encode())
        evidence.append(f"read {got >> 20} MiB of the cell's output; errors: {b' '.join(lines)[:300]!r}")
        grew = watch.peak_rss - rss_before
        evidence.append(f"hutch RSS {rss_before:.0f} -> peak {watch.peak_rss:.0f} MiB (+{grew:.0f})")
        # An instance that died under the stream may still take a connection for a moment before
        # hutch sees its exit (a clear 502 "did it crash?"): the session must carry on within
        # seconds, on a new instance if need be; every attempt is in the evidence.
        deadline = time.monotonic() + 10
        while True:
            after = session.http.post(f"{session.base}/execute", json={"code": "6 * 7"}, timeout=120)
            evidence.append(f"the next cell: HTTP {after.status_code} {after.text.strip()[-120:]!r}")
            if after.status_code not in (502, 503) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        contained = grew < 64 and '"text":"42"' in after.text
        _teardown(session, evidence)
    title = "a code-interpreter cell printing without end"
    return _finish(stage, "interpreter-flood", title, backend, started, contained, evidence, watch)


def ignores_sigterm(stage: Stage, backend: str) -> Outcome:
    started = time.monotonic()
    session = stage.attacker_session(backend, fresh=True)
    evidence: list[str] = []
    pids = [
        session.spawn(["python3", "-c", "import signal, time; signal.signal(15, signal.SIG_IGN); time.sleep(1e6)"]),
        session.spawn(["bash", "-c", "trap '' TERM; while :; do sleep 1; done"]),
    ]
    time.sleep(0.5)  # let them install their handlers
    for pid in pids:
        session.rpc("process.Process/SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGTERM"})
    time.sleep(0.5)
    listed = {p["pid"] for p in session.rpc("process.Process/List", {}).json().get("processes", [])}
    survivors = len(set(pids) & listed)
    evidence.append(f"after SIGTERM (envd's SendSignal) {survivors} of {len(pids)} still run")
    clean = _teardown(session, evidence)
    title = "processes that ignore SIGTERM, then the session is deleted"
    return _finish(stage, "ignores-sigterm", title, backend, started, clean, evidence, None)


ATTACKS: tuple[tuple[str, Callable[[Stage, str], Outcome]], ...] = (
    ("fork-bomb", fork_bomb),
    ("memory-hog", memory_hog),
    ("cpu-spin", cpu_spin),
    ("workspace-disk-fill", disk_fill),
    ("workspace-inode-fill", inode_fill),
    ("tmp-fill", tmp_fill),
    ("fd-exhaustion", fd_exhaustion),
    ("thread-flood", thread_flood),
    ("stdout-flood", stdout_flood),
    ("interpreter-flood", interpreter_flood),
    ("ignores-sigterm", ignores_sigterm),
)


# Only where root inside has a root file system of its own to write.
ROOT_ATTACKS: tuple[tuple[str, Callable[[Stage, str], Outcome]], ...] = (("overlay-disk-fill", overlay_fill),)


def plan(backends: tuple[str, ...]) -> list:
    from hutch.selftest.battery import Attack, on_backend

    steps = [Attack(name, backend, on_backend(run, backend)) for name, run in ATTACKS for backend in backends]
    for cast in ROOTS:
        if cast in backends:
            steps += [Attack(name, cast, on_backend(run, cast)) for name, run in ROOT_ATTACKS]
    return steps
