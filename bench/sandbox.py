"""Benchmark of one sandbox on this machine: cold start, `echo hi`, `run_code("1+1")`, idle memory.

    sudo .venv/bin/python bench/sandbox.py [--runs 30] [--json]

Reports medians (and p90) over repeated runs in one process. Targets (DESIGN.md §6): ready
<= 60 ms p50 without a kernel, `echo hi` <= 10 ms p50, `run_code` <= 10 ms p50, <= 20 MB PSS per
idle instance without a kernel. Needs root (cgroups, user namespace maps).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from hutch.runtime.base import InstanceSpec, Resources
from hutch.runtime.bwrap import BwrapRuntime
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.storage.local import DirectoryStore, ImageStore


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(len(ordered) * 0.9) - 1], 2),
        "n": len(ordered),
    }


async def run(runs: int, store_kind: str) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store_root = data_dir / "workspaces"
    store = ImageStore(store_root) if store_kind == "image" else DirectoryStore(store_root)
    runtime = BwrapRuntime(data_dir, store)
    results: dict = {"store": store.name}
    try:
        # 1. cold start to agent-ready (the first /health answered), 2 warm-ups thrown away
        starts = []
        for i in range(runs + 2):
            t0 = time.perf_counter()
            instance = await runtime.start(InstanceSpec(instance_id=f"cold-{i}", resources=Resources(disk_mb=256)))
            elapsed = (time.perf_counter() - t0) * 1000
            await runtime.stop(instance.instance_id)
            if i >= 2:
                starts.append(elapsed)
        results["cold_start_ms"] = summary(starts)

        # 2. echo hi through the agent, in a running instance
        instance = await runtime.start(InstanceSpec(instance_id="warm", resources=Resources(disk_mb=256)))
        channel = AgentChannel(instance.socket_path)
        echoes = []
        for i in range(runs * 3 + 5):
            t0 = time.perf_counter()
            result = await channel.run("/bin/echo", shell=False, args=["hi"])
            elapsed = (time.perf_counter() - t0) * 1000
            assert result.stdout == b"hi\n", result
            if i >= 5:
                echoes.append(elapsed)
        results["echo_hi_ms"] = summary(echoes)

        # 3. idle memory of an instance without a kernel: PSS of its processes and its bwrap monitor
        await asyncio.sleep(1.0)
        cgroup = Cgroup.from_dict(instance.detail["cgroup"])
        pids = [*cgroup.procs(), instance.detail["bwrap_pid"]]
        results["idle_pss_mb"] = round(sum(pss_kb(pid) for pid in pids) / 1024, 2)
        results["idle_processes"] = len(pids)

        # 4. run_code("1+1") in a warm context
        await channel.execute("x = 0")  # starts the kernel
        codes = []
        for i in range(runs * 3 + 5):
            t0 = time.perf_counter()
            lines = await channel.execute("1+1")
            elapsed = (time.perf_counter() - t0) * 1000
            assert any(line.get("text") == "2" for line in lines), lines
            if i >= 5:
                codes.append(elapsed)
        results["run_code_ms"] = summary(codes)
        await channel.aclose()
        await runtime.stop(instance.instance_id)
    finally:
        for leftover in runtime.instances():
            await runtime.stop(leftover.instance_id)
        await runtime.close(unstage=True)
        shutil.rmtree(data_dir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--store", choices=["image", "directory"], default="image")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark starts real sandboxes: run it as root")
    results = asyncio.run(run(args.runs, args.store))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"sandbox benchmark ({os.cpu_count()} CPUs, workspace store: {results['store']})")
    rows = [
        ("cold start to agent ready", "cold_start_ms", "ms", 60),
        ("echo hi through the agent", "echo_hi_ms", "ms", 10),
        ("run_code('1+1'), warm context", "run_code_ms", "ms", 10),
    ]
    for label, key, unit, target in rows:
        r = results[key]
        print(
            f"  {label:<32} p50 {r['p50']:>7.2f} {unit}  p90 {r['p90']:>7.2f} {unit}  (n={r['n']}, target <= {target})"
        )
    print(
        f"  {'idle instance memory (PSS)':<32} {results['idle_pss_mb']:>11.2f} MB"
        f"  ({results['idle_processes']} processes, target <= 20)"
    )


if __name__ == "__main__":
    main()
