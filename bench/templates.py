"""Benchmark of templates on this machine: what booting from a root file system of its own costs
beside the host's read-only system, what an untouched session writes, and build times.

    sudo .venv/bin/python bench/templates.py [--runs 20] [--json] [--backend gvisor]

In one process, on one runtime and workspace store:
- cold start to agent ready, `host` template vs a Debian template (overlay of its layer under the
  session's upper layer, idmapped mounts, agent from /opt/hutch), alternating so that both see the
  same machine; 2 warm-ups each thrown away;
- `echo hi` through the agent in each;
- disk of an untouched session's upper layer (started, stopped keeping its workspace);
- template build times: the Debian base layer (mmdebstrap: python3) first and again (cached), and
  one RUN step first and again (cached).

Reports medians and p90. Target: cold start with an overlay root <= 60 ms p50 (bwrap). Needs root
and mmdebstrap. `--backend gvisor` measures gVisor's starts and upper layer (its instances have no
network, which build steps need: no RUN step there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hutch.config import TemplatesConfig
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, Resources, Runtime
from hutch.runtime.channel import AgentChannel
from hutch.storage.local import DirectoryStore, ImageStore
from hutch.templates import debian
from hutch.templates.builder import Step, StepRunner
from hutch.templates.model import Template
from hutch.templates.store import TemplateStore


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 2),
        "n": len(ordered),
    }


async def run(runs: int, backend: str = "bwrap") -> dict:
    root = Path(tempfile.mkdtemp(prefix="hutch-bench-tpl-", dir="/var/tmp"))
    root.chmod(0o755)
    results: dict = {}
    config = TemplatesConfig()
    try:
        store = TemplateStore(root / "templates")
        t0 = time.perf_counter()
        layer = debian.build(store, config.debian_suite, ["python3"], "", config.ca_files())
        results["debian_layer_first_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        debian.build(store, config.debian_suite, ["python3"], "", config.ca_files())
        results["debian_layer_cached_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        base = Template(name="bench", layers=(layer,), source="debian")
        store.put(base)
        workspaces = root / "workspaces"
        workspace_store = ImageStore(workspaces) if ImageStore.available() else DirectoryStore(workspaces)
        (root / "data").mkdir(mode=0o755)
        runtime = make_runtime(backend, root / "data", workspace_store)
        try:
            return await measure(runtime, store, base, results, runs, root)
        finally:
            for instance in runtime.instances():
                await runtime.stop(instance.instance_id)
            await runtime.close(unstage=True)  # its network table, staged binds and cgroups too
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def measure(runtime: Runtime, store: TemplateStore, base: Template, results: dict, runs: int, root: Path) -> dict:
    """The timed part, on a runtime the caller cleans up."""
    rootfs = store.rootfs("bench")

    def spec(instance_id: str, with_rootfs: bool, workspace: str | None = None) -> InstanceSpec:
        return InstanceSpec(
            instance_id=instance_id, resources=Resources(disk_mb=256), rootfs=rootfs if with_rootfs else None,
            workspace=workspace, backend=runtime.name,
        )  # fmt: skip

    starts: dict[str, list[float]] = {"host": [], "template": []}
    echoes: dict[str, list[float]] = {"host": [], "template": []}
    for i in range(runs + 2):
        for kind in ("host", "template"):
            t0 = time.perf_counter()
            instance = await runtime.start(spec(f"{kind}-{i}", kind == "template"))
            elapsed = (time.perf_counter() - t0) * 1000
            async with AgentChannel(instance.socket_path) as channel:
                await channel.run("echo hi")
                t1 = time.perf_counter()
                await channel.run("echo hi")
                echo = (time.perf_counter() - t1) * 1000
            await runtime.stop(instance.instance_id)
            if i >= 2:
                starts[kind].append(elapsed)
                echoes[kind].append(echo)
    results["cold_start_ms"] = {kind: summary(samples) for kind, samples in starts.items()}
    results["echo_hi_ms"] = {kind: summary(samples) for kind, samples in echoes.items()}

    instance = await runtime.start(spec("untouched", True, workspace="untouched"))
    upper = instance.workspace_path / "upper"
    used = subprocess.run(["du", "-sk", str(upper)], capture_output=True, text=True).stdout.split()[0]
    results["untouched_upper_kb"] = int(used)
    await runtime.stop(instance.instance_id)
    if runtime.name != "bwrap":
        return results

    runner = StepRunner(store, runtime, root / "files", {})
    steps = [Step("RUN", ("echo layer > /etc/bench-layer", "root"), None)]
    t0 = time.perf_counter()
    await runner.build("bench2", base, steps, lambda line: None)
    results["run_step_first_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    await runner.build("bench2", base, steps, lambda line: None)
    results["run_step_cached_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--backend", default="bwrap", choices=("bwrap", "gvisor"))
    args = parser.parse_args()
    results = asyncio.run(run(args.runs, args.backend))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for kind in ("host", "template"):
        start, echo = results["cold_start_ms"][kind], results["echo_hi_ms"][kind]
        print(f"cold start to agent ready, {kind:8}: p50 {start['p50']:7.2f} ms  p90 {start['p90']:7.2f} ms"
              f"   echo hi p50 {echo['p50']:.2f} ms  (n={start['n']})")  # fmt: skip
    print(f"disk of an untouched session's upper layer: {results['untouched_upper_kb']} KiB")
    print(f"Debian layer (python3): first {results['debian_layer_first_s']} s, "
          f"cached {results['debian_layer_cached_ms']} ms")  # fmt: skip
    if "run_step_first_s" in results:
        print(f"one RUN step: first {results['run_step_first_s']} s, cached {results['run_step_cached_ms']} ms")


if __name__ == "__main__":
    main()
