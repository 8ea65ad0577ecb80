"""Benchmark of sleeping sessions through a real `hutch serve` and the official E2B SDK.

    sudo .venv/bin/python bench/sleep.py [--runs 10] [--json]

For an idle code-interpreter sandbox holding a live kernel and an 80 MB heap:
(a) `pause()` (frozen, memory kept) and `Sandbox.connect()` + the first `run_code` answer after it
    (resume to first answer), medians of `--runs` cycles on the same sandbox; targets pause
    <= 200 ms, resume <= 150 ms;
(b) the same with `pause(mode="filesystem")` (the instance stopped, files kept; the resume boots
    a new instance and a new kernel);
(c) the cgroup freeze and thaw alone (`Runtime.freeze`/`thaw` of the instance, in this process's
    view of the host: the freezer's state file), target <= 1 ms;
(d) the memory a frozen sandbox still holds (its cgroup's, which a freeze does not release) next to
    a running one: a freeze saves CPU, not RAM (hibernation to disk is what would).

It starts its own `hutch serve` on a temporary data dir under /var/tmp and stops it and every
instance it left when done. Needs root (sandboxes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sandbox import summary
from hutch.runtime.cgroups import Cgroup
from tests.e2e.conftest import Server
from tests.e2e.teardown import stop_leftover_instances

HEAP = "heap = bytearray(80 * 2**20)\nfor i in range(0, len(heap), 4096):\n    heap[i] = 1"


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def _cgroup_of(server: Server, tenant: httpx.Client, sandbox_id: str) -> Cgroup:
    """The cgroups of the sandbox's instance, from the instance records of the data directory."""
    session = tenant.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]
    instance_id = next(s["containerId"] for s in session if s["sessionId"] == sandbox_id)
    record = json.loads((server.data_dir / "instances" / instance_id / "instance.json").read_text())
    return Cgroup.from_dict(record["detail"]["cgroup"])


def bench(server: Server, tenant: httpx.Client, runs: int) -> dict:
    from e2b import Sandbox
    from e2b_code_interpreter import Sandbox as CodeSandbox

    box = CodeSandbox.create(timeout=600)
    results: dict = {}
    try:
        box.run_code(HEAP)
        pause, resume = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            box.pause()
            pause.append(_ms(t0))
            t0 = time.perf_counter()
            Sandbox.connect(box.sandbox_id, timeout=600)
            assert box.run_code("len(heap)").text == str(80 * 2**20)
            resume.append(_ms(t0))
        results["pause_frozen_ms"] = summary(pause)
        results["resume_to_first_answer_ms"] = summary(resume)

        cgroup = _cgroup_of(server, tenant, box.sandbox_id)
        running_memory = cgroup.stats()[1]
        freeze, thaw = [], []
        for _ in range(runs * 5):
            t0 = time.perf_counter()
            cgroup.freeze()
            freeze.append(_ms(t0))
            t0 = time.perf_counter()
            cgroup.thaw()
            thaw.append(_ms(t0))
        results["cgroup_freeze_ms"] = summary(freeze)
        results["cgroup_thaw_ms"] = summary(thaw)
        box.pause()
        results["memory_mib_running"] = round(running_memory / 2**20, 1)
        results["memory_mib_frozen"] = round(_cgroup_of(server, tenant, box.sandbox_id).stats()[1] / 2**20, 1)
        Sandbox.connect(box.sandbox_id, timeout=600)

        fs_pause, fs_resume = [], []
        for _ in range(max(1, runs // 2)):
            t0 = time.perf_counter()
            box.pause(mode="filesystem")
            fs_pause.append(_ms(t0))
            t0 = time.perf_counter()
            Sandbox.connect(box.sandbox_id, timeout=600)
            assert box.run_code("1 + 1").text == "2"
            fs_resume.append(_ms(t0))
        results["pause_filesystem_ms"] = summary(fs_pause)
        results["resume_filesystem_to_first_answer_ms"] = summary(fs_resume)
    finally:
        box.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hutch-bench-sleep-", dir="/var/tmp"))
    root.chmod(0o755)
    # No template is prepared: the sandboxes run on the host's system, as the README's numbers say.
    config = '[warm_pools]\nbase = 0\n"code-interpreter-v1" = 1\n[templates]\nprepare = []\n'
    server = Server(root / "data", config)
    try:
        server.start()
        tenant = server.new_tenant("bench-sleep")
        os.environ.update(E2B_API_URL=server.url, E2B_SANDBOX_URL=server.url, E2B_API_KEY=tenant.headers["X-API-Key"])
        results = bench(server, tenant, args.runs)
    finally:
        server.stop()
        stop_leftover_instances(server.data_dir)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, value in results.items():
        print(f"{name:40} {value}")


if __name__ == "__main__":
    main()
