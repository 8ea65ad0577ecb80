"""Benchmark of hibernation to disk of an idle code-interpreter session, runtime level.

    sudo .venv/bin/python bench/hibernate.py [--backend bwrap|gvisor] [--runs 10] [--templates DIR] [--json]
                                               [--fork] [--compare]

One template instance (the tests' `mini` Debian template: Python, ipykernel) with a live Python
kernel holding an 80 MB heap, idle. Each run: `Runtime.hibernate` (from the call to its return:
processes and cgroups gone; and of it the `criu dump` or `runsc checkpoint` alone), then `Runtime.restore` (to the
agent's /health), then the first answer of the kernel after it (resume to first answer: restore +
one `print(x)`). Medians and p90 of `--runs` cycles on the same session; the image size; the
session's memory before.
Targets (issue 13): pause <= 200 ms, resume <= 150 ms.
`--compare`: each cycle twice, page images compressed (zstd) and not (`[hibernation] compress`),
alternating on the same session: both sets of medians and their ratios (zstd / none).

`--fork`: instead, each run checkpoints the same session (`Runtime.checkpoint`, the instance
frozen around it and its upper layer copied into a new top layer first, as a fork does; the copy
is not timed), then starts a new instance from the checkpoint (`RootFS.memory_image`, to its
agent's /health) and times its first answer, then stops it.

Builds the template in a temporary store (about a minute; `--templates DIR` reuses a store that
holds `mini`), runs on a temporary data dir under /var/tmp, and removes all of it when done.
Needs root and, for bwrap, a usable CRIU (scripts/install-criu.sh); for gvisor, runsc.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sandbox import summary
from hutch.config import TemplatesConfig
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec
from hutch.runtime.channel import AgentChannel
from hutch.runtime.pages import PageCompression
from hutch.runtime.rootfs import CA_ENV
from hutch.storage.local import DirectoryStore, ImageStore
from hutch.templates import debian
from hutch.templates.model import Template
from hutch.templates.store import TemplateStore
from tests.conftest import TEST_TEMPLATE, TEST_TEMPLATE_PACKAGES, TEST_TEMPLATE_SETUP

HEAP = "x = 42\nheap = bytearray(b'\\x07') * (80 << 20)"


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


def template_store(root: Path) -> TemplateStore:
    store = TemplateStore(root)
    try:
        store.rootfs(TEST_TEMPLATE)
        return store
    except Exception:
        pass
    config = TemplatesConfig()
    layer = debian.build(
        store, config.debian_suite, TEST_TEMPLATE_PACKAGES, "", config.ca_files(),
        setup=TEST_TEMPLATE_SETUP, setup_env={**CA_ENV, **config.env},
    )  # fmt: skip
    store.put(Template(name=TEST_TEMPLATE, layers=(layer,), source="debian"))
    return store


async def _print_x(channel: AgentChannel) -> str:
    lines = await channel.execute("print(x)")
    return "".join(line.get("text", "") for line in lines if line.get("type") == "stdout").strip()


async def bench(
    templates: TemplateStore, runs: int, compressions: tuple[str, ...] = ("zstd",), backend: str = "bwrap"
) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-hib-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store_root = data_dir / "workspaces"
    store = ImageStore(store_root) if ImageStore.available() else DirectoryStore(store_root)
    runtime = make_runtime(backend, data_dir, store)
    try:
        if not runtime.can_hibernate():
            raise SystemExit(f"no hibernation here: {runtime.hibernation_off_reason}")  # type: ignore[attr-defined]
        spec = InstanceSpec(
            instance_id=f"b-{uuid.uuid4().hex[:8]}", backend=backend, rootfs=templates.rootfs(TEST_TEMPLATE)
        )
        instance = await runtime.start(spec)
        channel = AgentChannel(instance.socket_path)
        await channel.execute(HEAP)
        memory_mb = (await runtime.stats(instance.instance_id)).memory_bytes / 2**20
        await asyncio.sleep(1)  # idle
        samples: dict[str, dict[str, list[float]]] = {
            method: {"image_mb": [], "hibernate_ms": [], "of_which_criu_dump_ms": [], "restore_ms": [],
                     "resume_to_first_answer_ms": []}
            for method in compressions
        }  # fmt: skip
        for _ in range(runs):
            for method in compressions:  # alternating: a load that comes and goes hits both alike
                if backend == "bwrap":  # gVisor's runsc compresses its images itself
                    runtime.pages = PageCompression(method)  # type: ignore[attr-defined]
                taken = samples[method]
                await channel.aclose()
                started = time.perf_counter()
                image = await runtime.hibernate(instance.instance_id)
                taken["hibernate_ms"].append(_ms(started))
                taken["of_which_criu_dump_ms"].append(image.dump_seconds * 1000)
                taken["image_mb"].append(image.size_bytes / 2**20)
                started = time.perf_counter()
                await runtime.restore(instance.instance_id)
                taken["restore_ms"].append(_ms(started))
                channel = AgentChannel(instance.socket_path)
                assert await _print_x(channel) == "42"
                taken["resume_to_first_answer_ms"].append(_ms(started))
        await channel.aclose()
        result: dict = {"session_memory_mb": round(memory_mb, 1)}
        for method, taken in samples.items():
            prefix = f"{method}_" if len(compressions) > 1 else ""
            result[f"{prefix}image_mb"] = round(statistics.median(taken.pop("image_mb")), 1)
            result.update({f"{prefix}{name}": summary(values) for name, values in taken.items()})
        if len(compressions) > 1:
            first, second = compressions
            for name in ("image_mb", "hibernate_ms", "restore_ms", "resume_to_first_answer_ms"):
                ratio = _p50(result[f"{first}_{name}"]) / _p50(result[f"{second}_{name}"])
                result[f"ratio_{first}_{second}_{name}"] = round(ratio, 2)
        return result
    finally:
        for each in runtime.instances():
            await runtime.stop(each.instance_id)
        await runtime.close(unstage=True)  # type: ignore[attr-defined]
        shutil.rmtree(data_dir, ignore_errors=True)


async def bench_fork(templates: TemplateStore, runs: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-fork-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store_root = data_dir / "workspaces"
    store = ImageStore(store_root) if ImageStore.available() else DirectoryStore(store_root)
    runtime = make_runtime("bwrap", data_dir, store)
    try:
        if not runtime.can_hibernate():
            raise SystemExit(f"no checkpoints here: {runtime.hibernation_off_reason}")  # type: ignore[attr-defined]
        rootfs = templates.rootfs(TEST_TEMPLATE)
        source = await runtime.start(
            InstanceSpec(instance_id=f"b-{uuid.uuid4().hex[:8]}", backend="bwrap", rootfs=rootfs)
        )
        channel = AgentChannel(source.socket_path)
        await channel.execute(HEAP)
        await channel.aclose()
        await asyncio.sleep(1)  # idle
        checkpoints, starts, first_answers, images = [], [], [], []
        for run in range(runs):
            into = data_dir / "checkpoints" / str(run)
            layer = into / "layer"
            layer.mkdir(parents=True)
            await runtime.freeze(source.instance_id)
            try:
                await asyncio.to_thread(
                    subprocess.run, ["cp", "-a", f"{source.workspace_path}/upper/.", f"{layer}/"], check=True
                )
                started = time.perf_counter()
                image = await runtime.checkpoint(source.instance_id, into / "image")
                checkpoints.append(_ms(started))
            finally:
                await runtime.thaw(source.instance_id)
            images.append(image.size_bytes / 2**20)
            spec = InstanceSpec(
                instance_id=f"f-{uuid.uuid4().hex[:8]}",
                backend="bwrap",
                rootfs=dataclasses.replace(
                    rootfs, layer_paths=(*rootfs.layer_paths, str(layer)), memory_image=str(image.path)
                ),
            )
            started = time.perf_counter()
            copy = await runtime.start(spec)
            starts.append(_ms(started))
            copy_channel = AgentChannel(copy.socket_path)
            assert await _print_x(copy_channel) == "42"
            first_answers.append(_ms(started))
            await copy_channel.aclose()
            await runtime.stop(copy.instance_id)
        return {
            "image_mb": round(sorted(images)[len(images) // 2], 1),
            "checkpoint_ms": summary(checkpoints),
            "start_from_checkpoint_ms": summary(starts),
            "start_to_first_answer_ms": summary(first_answers),
        }
    finally:
        for each in runtime.instances():
            await runtime.stop(each.instance_id)
        await runtime.close(unstage=True)  # type: ignore[attr-defined]
        shutil.rmtree(data_dir, ignore_errors=True)


def _p50(value: float | dict) -> float:
    return value["p50"] if isinstance(value, dict) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("bwrap", "gvisor"), default="bwrap")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--templates", type=Path, help="a template store holding `mini` (else one is built)")
    parser.add_argument("--compare", action="store_true", help="page images compressed (zstd) vs not, alternating")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--fork", action="store_true", help="checkpoints and starts from them instead")
    args = parser.parse_args()
    compressions = ("zstd", "none") if args.compare else ("zstd",)
    own = args.templates is None
    root = Path(tempfile.mkdtemp(prefix="hutch-bench-tpl-", dir="/var/tmp")) if own else args.templates
    try:
        if args.fork:
            result = asyncio.run(bench_fork(template_store(root), args.runs))  # bwrap's checkpoints
        else:
            result = asyncio.run(bench(template_store(root), args.runs, compressions, args.backend))
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    for name, value in result.items():
        print(f"{name:28} {value}")


if __name__ == "__main__":
    main()
