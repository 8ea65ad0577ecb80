"""Write docs/reliability-faults.md: the fault battery's results and a load run, measured here.

    sudo .venv/bin/python bench/reliability.py [--sessions 200] [--requests 25] [--concurrency 32]
                                               [--out docs/reliability-faults.md]

1. Runs the fault battery (`pytest tests/faults tests/metadb/test_sqlite_faults.py`) with
   `HUTCH_FAULT_REPORT` set, so that every fault test records what it injected, what clients
   saw and what was checked after (`tests/faults/conftest.py`).
2. Runs `bench/load.py` at the given size (every answer checked for its session).
3. Renders both into the report, with the machine they ran on. Nothing in it is typed by hand
   but the list of defects the battery found (they are fixed; each has its test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from load import table  # noqa: E402  (bench/load.py, a script beside this one)

BATTERY = ["tests/faults", "tests/metadb/test_sqlite_faults.py"]

# What the battery found when it was written (issue 6), each fixed where it lived, with its test.
DEFECTS = [
    (
        "A MetaDB locked by another process stopped the whole server: SQLite waited for the lock on the "
        "event loop (busy_timeout 5 s per write, an activity flush every second), so even hot sessions, "
        "which never touch MetaDB, stalled for seconds; creates failed with `500 internal error: "
        "OperationalError`.",
        "`hutch/metadb/sqlite.py`: SQLite never waits itself (busy_timeout 0); a locked call is retried "
        "after asynchronous sleeps for up to 5 s, then is a 503 naming the lock; SQLITE_FULL and I/O "
        "errors are 503s naming their cause.",
        "tests/metadb/test_sqlite_faults.py, tests/faults/test_metadb_faults.py",
    ),
    (
        "After one activity flush failed on a locked MetaDB, its connection stayed inside the failed "
        "transaction: every later write went into a transaction never committed (lost at the next crash, "
        "invisible to other readers) and every `BEGIN` failed, so no session could be created until a restart.",
        "`touch_sessions` rolls back on failure; every failed transaction is rolled back only if SQLite "
        "has not already (a full disk rolls it back itself, and a second ROLLBACK hid the real error).",
        "tests/metadb/test_sqlite_faults.py",
    ),
    (
        "A create or recovery whose MetaDB write failed after its instance started left that instance "
        "running for nobody, or a session Active in MetaDB that the server did not serve (409 for its key "
        "until a restart); a failed activity flush lost the activity it had drained.",
        "`hutch/scheduler/sessions.py`, `scheduler.py`, `activity.py`: the instance is released when its "
        "binding cannot be written; a session Active in MetaDB only is taken back by the next request for "
        "its key; undrained activity is queued again.",
        "tests/faults/test_metadb_faults.py",
    ),
    (
        "A frozen instance (alive, answering nothing) held every request sent to it forever: the proxy had "
        "no timeout at all.",
        "`hutch/gateway/proxy.py`: an instance must begin its answer (or take more of a request body) "
        "within `[gateway] head_timeout` (300 s by default), else 504 `deadline_exceeded`; a slow client "
        "does not count, a started answer has no timeout.",
        "tests/gateway/test_proxy.py, tests/faults/test_unresponsive.py",
    ),
    (
        "A command or `run_code` whose instance was killed ended in a broken chunked stream: "
        "`httpx.RemoteProtocolError` from the code-interpreter SDK, `incomplete chunked read` for curl.",
        "`hutch/gateway/endings.py`: an agent's Connect stream cut between messages ends with a Connect "
        "`unavailable` error (as E2B's proxy does), an NDJSON `/execute` stream with an `error` line "
        "(`InstanceStopped`); user servers' streams are never touched.",
        "tests/gateway/test_proxy.py, tests/faults/test_instance_kill.py",
    ),
    (
        "A request arriving just after an instance's agent died, before hutch saw the exit, was a 502 "
        "(`Connection refused`; the E2B SDK's health probe after a broken stream hit exactly that); an "
        "instance whose agent died but whose pid 1 lived on was a 502 for every request, forever.",
        "`hutch/gateway/upstream.py` (`InstanceGone` on ECONNREFUSED/ENOENT, idle connections polled before "
        "reuse), `proxy.py`/`app.py` (`reroute`), `SessionManager.reroute`, `Runtime.kill`: the instance is "
        "ended as a crash and the request, which never reached it, goes to its replacement.",
        "tests/gateway/test_proxy.py, tests/faults/test_instance_kill.py",
    ),
    (
        "A kill -9 of `hutch serve` in the middle of an instance start left a sandbox running that nobody "
        "knew of (hutch's death closed the block pipe, which released bwrap), outside every cgroup when it "
        "died early enough; and `Cgroup.kill_all` on cgroup v1 trusted `cgroup.kill` of the hybrid "
        "hierarchy, missing processes that had joined only the controllers' cgroups, so the sweep at restart "
        "could not remove them (EBUSY).",
        "`hutch/runtime/bwrap.py` + `hutch/agent/main.py`: a `go_fd` pipe the runtime writes once the "
        "instance is recorded; the agent exits on end of file. `hutch/runtime/cgroups.py`: on v1 the sweep "
        "runs after `cgroup.kill`.",
        "tests/faults/test_server_kill.py, tests/agent/test_go_fd.py",
    ),
    (
        "A full data disk: creates were `500 internal error: OperationalError` (or 201 with a workspace "
        "that broke at once); every workspace that wrote (sessions', and warm instances' through ext4's "
        "lazy inode-table init) turned read-only when its sparse image could not grow, and stayed read-only "
        "after the disk was freed, until the session ended.",
        "`hutch/runtime/local.py`: no instance starts with less than 128 MB free (503 naming the disk); "
        "`hutch/storage/local.py`: images mounted `noinit_itable`, a failed workspace is detected "
        "(`errors_count`), an image recording errors is repaired with e2fsck before it is mounted again; "
        "`hutch/scheduler/scheduler.py`: instances whose workspace failed are replaced once there is room.",
        "tests/faults/test_disk_full.py",
    ),
    (
        "`X-Accel-Buffering: no, no` on the agent's streamed answers (the gateway added its own to the agent's).",
        "`hutch/gateway/proxy.py`: added only when absent.",
        "tests/gateway/test_proxy.py",
    ),
]

LIMITS = [
    "What a sandbox wrote without fsync in the seconds before its workspace failed on a full disk may be "
    "gone after the repair (ext4 had not committed it), as on any disk that fails under a file system; "
    "acknowledged uploads are fsynced and are never lost.",
    "Workspaces are sparse images: they promise more than the disk may hold. hutch keeps 128 MB free for "
    "them and refuses new instances below that, but another process can still fill the disk.",
    "`head_timeout` bounds the wait for the start of an answer, not a stream: a frozen instance in the "
    "middle of a stream holds that stream until the client gives up (the E2B SDKs have their own timeouts).",
    "The `go_fd` guard is bwrap's; a gVisor instance whose start is cut by a crash of hutch is found by "
    "the cgroup sweep at the next start, not by itself.",
    "Latencies are measured with the load generator, hutch and every instance on the same 2 cores (and "
    "whatever else runs on the machine then); they describe this machine under that load, not a target.",
]


def run_battery(report: Path) -> tuple[int, str]:
    env = {**os.environ, "HUTCH_FAULT_REPORT": str(report)}
    argv = [sys.executable, "-m", "pytest", "-p", "no:asyncio", "-q", *BATTERY]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    last = [line for line in done.stdout.splitlines() if line.strip()][-1:] or [""]
    return done.returncode, last[0]


def run_load(sessions: int, requests: int, concurrency: int, out: Path) -> int:
    argv = [sys.executable, str(ROOT / "bench" / "load.py"), "--sessions", str(sessions), "--requests", str(requests),
            "--concurrency", str(concurrency), "--json", str(out)]  # fmt: skip
    return subprocess.run(argv, cwd=ROOT).returncode


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(faults: list[dict], battery_line: str, load: dict, command: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability: faults and load",
        "",
        f"Generated by `{command}` on {now}, on a {os.cpu_count()}-CPU host (kernel {os.uname().release}). "
        "Do not edit: run it again. The attacks side is in [reliability-security.md](reliability-security.md).",
        "",
        "Every fault below was injected into a real `hutch serve` with real sandboxes (`tests/faults/`), and "
        "what clients saw during and after it was checked by the test named; the load ran through the same "
        "gateway with every answer checked against the session it was meant for (`bench/load.py`).",
        "",
        f"## Faults injected and survived ({battery_line})",
        "",
        "| fault | injected | observed | test | result |",
        "|---|---|---|---|---|",
    ]
    for entry in faults:
        if not entry.get("fault"):
            continue
        observed = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in entry["observed"].items())
        lines.append(
            f"| {_cell(entry['fault'])} | {_cell(entry['injected'])} | {_cell(observed)} | "
            f"`{_cell(entry['test'])}` | {entry['outcome']} ({entry.get('seconds', 0)} s) |"
        )
    lines += ["", "## Load: every answer from its own session's instance", ""]
    if load:
        lines += ["| what | measured |", "|---|---|"]
        lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in table(load)]
        if load.get("error_examples"):
            lines += ["", "Errors seen (first ten):", ""]
            lines += [f"- `{_cell(e)}`" for e in load["error_examples"]]
    else:
        lines.append("Not run.")
    lines += ["", "## Defects the battery found, and their fixes", "", "| defect | fix | test |", "|---|---|---|"]
    lines += [f"| {_cell(d)} | {_cell(f)} | {_cell(t)} |" for d, f, t in DEFECTS]
    lines += ["", "## Limits", ""]
    lines += [f"- {limit}" for limit in LIMITS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability-faults.md")
    parser.add_argument("--skip-battery", action="store_true", help="only the load (keeps no fault rows)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/reliability.py starts sandboxes and injects host faults: run it as root")
    with tempfile.TemporaryDirectory() as scratch:
        faults_path, load_path = Path(scratch) / "faults.json", Path(scratch) / "load.json"
        code, line = (0, "not run") if args.skip_battery else run_battery(faults_path)
        print(f"fault battery: {line}")
        load_code = run_load(args.sessions, args.requests, args.concurrency, load_path)
        faults = json.loads(faults_path.read_text()) if faults_path.exists() else []
        load = json.loads(load_path.read_text()) if load_path.exists() else {}
    command = "sudo .venv/bin/python bench/reliability.py"
    if (args.sessions, args.requests, args.concurrency) != (200, 25, 32):
        command += f" --sessions {args.sessions} --requests {args.requests} --concurrency {args.concurrency}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(faults, line, load, command))
    print(f"wrote {args.out}")
    sys.exit(code or load_code)


if __name__ == "__main__":
    main()
