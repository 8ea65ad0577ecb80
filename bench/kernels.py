"""Idle memory of a code-interpreter session: Python's kernel alone, then every language's.

    sudo .venv/bin/python bench/kernels.py [--store DIR] [--json]

Boots one bwrap instance of the built-in `code-interpreter-v1` template (built into `--store` with
mmdebstrap from the host's apt sources the first time, about 5 minutes; found there after) and
measures the PSS of every host process of the instance (bwrap's monitor included):
- with no kernel; with Python's kernel (after `x = 0`, as a session's first `run_code`);
- after each other language's first cell, one by one (JavaScript, TypeScript, Bash, R): each
  kernel's cost is the growth it brings. TypeScript shares nothing with JavaScript: its default
  context is a kernel of its own.
PSS is read after the instance has been idle for a few seconds. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sandbox import pss_kb
from hutch.config import TemplatesConfig
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, Resources
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.channel import AgentChannel
from hutch.runtime.rootfs import CA_ENV
from hutch.storage.local import DirectoryStore, ImageStore
from hutch.templates import debian
from hutch.templates.model import Template
from hutch.templates.service import BUILTIN, BUILTIN_SETUP
from hutch.templates.store import TemplateStore

NAME = "code-interpreter-v1"
CELLS = [("javascript", "let x = 0"), ("typescript", "const y: number = 0"), ("bash", "x=0"), ("r", "x <- 0")]
SETTLE_S = 3.0


def instance_pss(instance) -> tuple[float, int]:
    """(MB, processes) of every host process of the instance."""
    pids = set(Cgroup.from_dict(instance.detail["cgroup"]).procs())
    if "bwrap_pid" in instance.detail:
        pids.add(instance.detail["bwrap_pid"])  # bwrap's monitor stays in hutch's cgroup
    return round(sum(pss_kb(pid) for pid in pids) / 1024, 1), len(pids)


async def run(store_dir: Path) -> dict:
    config = TemplatesConfig()
    store = TemplateStore(store_dir)
    t0 = time.perf_counter()
    layer = debian.build(
        store, config.debian_suite, BUILTIN[NAME], config.debian_mirror, config.ca_files(),
        lambda line: None, BUILTIN_SETUP[NAME](), {**CA_ENV, **config.env},
    )  # fmt: skip
    results: dict = {"layer_s": round(time.perf_counter() - t0, 1)}
    store.put(Template(name=NAME, layers=(layer,), source="debian"))
    root = Path(tempfile.mkdtemp(prefix="hutch-bench-kernels-", dir="/var/tmp"))
    root.chmod(0o755)
    workspaces = root / "workspaces"
    runtime = make_runtime(
        "bwrap", root, ImageStore(workspaces) if ImageStore.available() else DirectoryStore(workspaces)
    )
    try:
        spec = InstanceSpec(
            instance_id="kernels", backend="bwrap", resources=Resources(memory_mb=2048, disk_mb=256, pids=1024),
            rootfs=store.rootfs(NAME),
        )  # fmt: skip
        instance = await runtime.start(spec)
        async with AgentChannel(instance.socket_path, timeout=120) as channel:
            await asyncio.sleep(SETTLE_S)
            results["no kernel"] = instance_pss(instance)
            lines = await channel.execute("x = 0")
            assert not [line for line in lines if line.get("type") == "error"], lines
            await asyncio.sleep(SETTLE_S)
            results["python"] = instance_pss(instance)
            for language, code in CELLS:
                lines = await channel.execute(code, language=language)
                assert not [line for line in lines if line.get("type") == "error"], lines
                await asyncio.sleep(SETTLE_S)
                results[f"+ {language}"] = instance_pss(instance)
        await runtime.stop(instance.instance_id)
    finally:
        for leftover in runtime.instances():
            await runtime.stop(leftover.instance_id)
        await runtime.close(unstage=True)
        shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("/var/tmp/hutch-bench-kernels-store"),
                        help="template store to build the template in, or find it (kept between runs)")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = asyncio.run(run(args.store))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"template layer: {results.pop('layer_s')} s (built or found)")
    previous = None
    for what, (mb, processes) in results.items():
        growth = f"  (+{mb - previous:.1f} MB)" if previous is not None else ""
        print(f"  {what:<14}{mb:>8.1f} MB PSS  {processes:>3} processes{growth}")
        previous = mb


if __name__ == "__main__":
    main()
