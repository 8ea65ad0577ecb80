"""Benchmark of one sandbox per isolation backend on this machine, side by side.

    sudo .venv/bin/python bench/sandbox.py [--backends bwrap,gvisor] [--runs 30] [--json]

For each backend, in one process and one after the other (never concurrently):
- cold start: `runtime.start` until the agent answers `/health`;
- warm claim: what a new session costs when it takes an instance already running (warm pool):
  `claim_workspace` (the fresh workspace gets the session's key) + `/init` with its env, on a new
  connection, as `Scheduler.allocate` does;
- `echo hi` through the agent, in a running instance;
- idle memory (PSS of every host process of an instance without a kernel, bwrap's monitor and
  gVisor's sentry, gofer and stubs included);
- `run_code("1+1")` in a warm Jupyter context.

Reports medians and p90. Targets (README.md, "Benchmark", for the default backend): ready <= 60 ms p50,
`echo hi` <= 10 ms p50, `run_code` <= 10 ms p50, <= 20 MB PSS per idle instance. Needs root.
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

from hutch.runtime import BACKENDS, make_runtime
from hutch.runtime.base import InstanceSpec, Resources
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.storage.local import DirectoryStore, ImageStore

ROWS = [
    ("cold start to agent ready", "cold_start_ms", 60),
    ("warm claim (claim + /init)", "warm_claim_ms", None),
    ("echo hi through the agent", "echo_hi_ms", 10),
    ("run_code('1+1'), warm context", "run_code_ms", 10),
]


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
        "p90": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 2),
        "n": len(ordered),
    }


async def run(backend: str, runs: int, store_kind: str) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store_root = data_dir / "workspaces"
    store = ImageStore(store_root) if store_kind == "image" else DirectoryStore(store_root)
    runtime = make_runtime(backend, data_dir, store)
    results: dict = {"backend": backend, "store": store.name}

    def spec(instance_id: str) -> InstanceSpec:
        return InstanceSpec(instance_id=instance_id, backend=backend, resources=Resources(disk_mb=256))

    try:
        # 1. cold start to agent-ready (the first /health answered), 2 warm-ups thrown away
        starts = []
        for i in range(runs + 2):
            t0 = time.perf_counter()
            instance = await runtime.start(spec(f"cold-{i}"))
            elapsed = (time.perf_counter() - t0) * 1000
            await runtime.stop(instance.instance_id)
            if i >= 2:
                starts.append(elapsed)
        results["cold_start_ms"] = summary(starts)

        # 2. warm claim: instances started ahead, then taken by new sessions one by one
        claims = []
        for batch in range(0, runs, 5):
            warm = [await runtime.start(spec(f"warm-{batch + j}")) for j in range(min(5, runs - batch))]
            for j, instance in enumerate(warm):
                t0 = time.perf_counter()
                await runtime.claim_workspace(instance.instance_id, f"tenant/session-{batch + j}")
                async with AgentChannel(instance.socket_path, timeout=10) as channel:
                    await channel.init({"SESSION": str(batch + j)})
                claims.append((time.perf_counter() - t0) * 1000)
            for instance in warm:
                await runtime.stop(instance.instance_id)
        results["warm_claim_ms"] = summary(claims)

        # 3. echo hi through the agent, in a running instance
        instance = await runtime.start(spec("echo"))
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

        # 4. idle memory of an instance without a kernel: every host process it has
        await asyncio.sleep(1.0)
        pids = set(Cgroup.from_dict(instance.detail["cgroup"]).procs())
        if "bwrap_pid" in instance.detail:
            pids.add(instance.detail["bwrap_pid"])  # bwrap's monitor stays in hutch's cgroup
        results["idle_pss_mb"] = round(sum(pss_kb(pid) for pid in pids) / 1024, 2)
        results["idle_processes"] = len(pids)

        # 5. run_code("1+1") in a warm context
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


def print_table(all_results: list[dict]) -> None:
    store = all_results[0]["store"]
    print(f"sandbox benchmark ({os.cpu_count()} CPUs, workspace store: {store}); p50 / p90 in ms")
    width = 32
    print(f"  {'':<{width}}" + "".join(f"{r['backend']:>22}" for r in all_results) + "   target (bwrap)")
    for label, key, target in ROWS:
        cells = "".join(f"{r[key]['p50']:>10.2f} / {r[key]['p90']:>8.2f}" for r in all_results)
        print(f"  {label:<{width}}{cells}   {f'<= {target}' if target else ''}")
    cells = "".join(f"{r['idle_pss_mb']:>10.2f} MB ({r['idle_processes']:>3} pr)" for r in all_results)
    print(f"  {'idle instance memory (PSS)':<{width}}{cells}   <= 20 MB")
    counts = ", ".join(f"{r['backend']} {r['cold_start_ms']['n']} starts" for r in all_results)
    print(f"  (n: {counts})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="bwrap", help=f"comma-separated, from: {', '.join(BACKENDS)}")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--store", choices=["image", "directory"], default="image")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the benchmark starts real sandboxes: run it as root")
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown or not backends:
        raise SystemExit(f"unknown backend(s) {unknown}; available: {', '.join(BACKENDS)}")
    results = [asyncio.run(run(backend, args.runs, args.store)) for backend in backends]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print_table(results)


if __name__ == "__main__":
    main()
