"""Density: how many idle code-interpreter sessions one host holds with hibernation on.

    sudo .venv/bin/python bench/density.py [--sessions 2000] [--live 100] [--concurrency 4]
                                           [--wake 20] [--max-minutes M] [--forks] [--templates DIR] [--json]

Runtime level, in this process (as `bench/hibernate.py`: the runtime `hutch serve` runs, without
its HTTP layer): template instances of the tests' `mini` Debian template (Python, ipykernel).
1. `--live` sessions, each with a live Python kernel holding `x = <its number>`: the latency of
   `print(x)` on each (3 rounds) with nothing else on the host: median and p95.
2. `--sessions` more such sessions (fewer if `--max-minutes` runs out first: the rest of the
   run measures what was made), `--concurrency` at a time: start, the kernel and its `x`, then
   hibernated (`Runtime.hibernate`, the same call an idle session's sleep makes). `--forks`:
   each starts from a checkpoint of one such session taken first (as E2B's fork does: its own
   uid slot, cgroups, upper layer and kernel process, restored instead of booted, which spares
   the kernel's start-up), sets its own `x`, and is hibernated into an image of its own. Progress is
   printed as it goes. Measured: time per session, the host's MemAvailable drop and free disk
   drop per hibernated session, the image's size (`HibernationImage.size_bytes`), this process's
   RSS (the runtime's own memory).
3. The live sessions' latency again, with every hibernated one on the host (and the ratio).
4. `--wake` hibernated sessions picked at random, restored: their `x` checked, restore time.
Everything is stopped and removed at the end, also on Ctrl-C or SIGTERM: instances (hibernated
ones with their images), mounts, cgroups, the data dir and (unless `--templates`) the template.
Needs root and a usable CRIU (scripts/install-criu.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hibernate import _print_x, template_store
from bench.sandbox import summary
from hutch.runtime import make_runtime
from hutch.runtime.base import Instance, InstanceSpec, RootFS, Runtime
from hutch.runtime.channel import AgentChannel
from hutch.runtime.userns import UidSlots
from hutch.storage.local import DirectoryStore, ImageStore
from hutch.templates.store import TemplateStore
from tests.conftest import TEST_TEMPLATE


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _latency(samples: list[float]) -> dict:
    return {**summary(samples), "p95": round(statistics.quantiles(samples, n=20)[-1], 2)}


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


class Fleet:
    """The sessions of one run: numbered, each with `x` = its number."""

    def __init__(self, runtime: Runtime, templates: TemplateStore) -> None:
        self.runtime = runtime
        self.rootfs = templates.rootfs(TEST_TEMPLATE)
        self.numbers: dict[str, int] = {}

    async def start(self, number: int, rootfs: RootFS | None = None) -> tuple[Instance, AgentChannel]:
        spec = InstanceSpec(instance_id=f"d-{uuid.uuid4().hex[:10]}", backend="bwrap", rootfs=rootfs or self.rootfs)
        instance = await self.runtime.start(spec)
        self.numbers[instance.instance_id] = number
        channel = AgentChannel(instance.socket_path)
        await channel.execute(f"x = {number}")  # the kernel starts on its first cell
        return instance, channel

    async def check(self, instance: Instance, channel: AgentChannel) -> float:
        """Milliseconds of one `print(x)`, its answer checked."""
        started = time.perf_counter()
        assert await _print_x(channel) == str(self.numbers[instance.instance_id])
        return (time.perf_counter() - started) * 1000


async def _checkpointed(fleet: Fleet, data_dir: Path) -> RootFS:
    """A root file system that starts new sessions from a checkpoint of one with a live kernel:
    its upper layer copied into a layer of its own while it is frozen, and its checkpoint taken
    in that moment (what `hutch.scheduler.snapshots` does for a fork). The source is stopped."""
    runtime = fleet.runtime
    source, channel = await fleet.start(-1)
    await channel.aclose()  # hutch's connections go before a dump
    layer = data_dir / "fork-layer"
    layer.mkdir(mode=0o755)
    await runtime.freeze(source.instance_id)
    try:
        copy = await asyncio.create_subprocess_exec("cp", "-a", f"{source.workspace_path}/upper/.", f"{layer}/")
        assert await copy.wait() == 0, "the upper layer could not be copied"
        image = await runtime.checkpoint(source.instance_id, data_dir / "fork-checkpoint" / "image")
    finally:
        await runtime.thaw(source.instance_id)
    await runtime.stop(source.instance_id)
    return dataclasses.replace(
        fleet.rootfs, layer_paths=(*fleet.rootfs.layer_paths, str(layer)), memory_image=str(image.path)
    )


async def _latencies(fleet: Fleet, live: list[tuple[Instance, AgentChannel]], rounds: int = 3) -> list[float]:
    return [await fleet.check(*each) for _ in range(rounds) for each in live]


async def bench(
    templates: TemplateStore,
    sessions: int,
    live_count: int,
    concurrency: int,
    wake: int,
    max_seconds: float,
    forks: bool = False,
) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="hutch-bench-density-", dir="/var/tmp"))
    data_dir.chmod(0o755)
    store_root = data_dir / "workspaces"
    store = ImageStore(store_root) if ImageStore.available() else DirectoryStore(store_root)
    # UidSlots' default count (4096) covers --sessions + --live up to there; asked for more, more.
    slots = UidSlots(count=max(4096, sessions + live_count + 16))
    runtime = make_runtime("bwrap", data_dir, store, slots)
    fleet = Fleet(runtime, templates)
    live: list[tuple[Instance, AgentChannel]] = []
    result: dict = {
        "sessions": sessions,
        "live": live_count,
        "concurrency": concurrency,
        "store": store.name,
        "made_as": "forks of one checkpoint" if forks else "booted",
    }
    try:
        if not runtime.can_hibernate():
            raise SystemExit(f"no hibernation here: {runtime.hibernation_off_reason}")  # type: ignore[attr-defined]
        compression = runtime.pages.method  # type: ignore[attr-defined]
        result["compress"] = compression
        origin = None
        if forks:
            origin = await _checkpointed(fleet, data_dir)
            await asyncio.sleep(5)  # the source's memory and workspace given back before measuring
        mem0, disk0, rss0 = _mem_available(), _disk_free(data_dir), _rss()
        numbers = iter(range(live_count))

        async def starter() -> None:
            for number in numbers:  # shared: `concurrency` starters take the next in turn
                live.append(await fleet.start(number))

        await asyncio.gather(*(starter() for _ in range(concurrency)))
        await asyncio.sleep(2)  # idle
        mem_live = _mem_available()
        result["ram_per_live_session_mib"] = _mib((mem0 - mem_live) / max(1, live_count))
        before = await _latencies(fleet, live)
        result["live_print_x_ms_before"] = _latency(before)
        print(f"{live_count} live sessions; print(x) {result['live_print_x_ms_before']}", flush=True)

        mem1, disk1, rss1 = _mem_available(), _disk_free(data_dir), _rss()
        hibernated: list[Instance] = []
        images: list[int] = []
        per_session: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(live_count, live_count + sessions):
            queue.put_nowait(number)
        started = time.perf_counter()

        async def worker() -> None:
            while not queue.empty() and time.perf_counter() - started < max_seconds:
                number = queue.get_nowait()
                t0 = time.perf_counter()
                instance, channel = await fleet.start(number, origin)
                await channel.aclose()  # hutch's connections go before a dump (as a sleep does)
                image = await runtime.hibernate(instance.instance_id)
                per_session.append(time.perf_counter() - t0)
                hibernated.append(instance)
                images.append(image.size_bytes)
                done = len(hibernated)
                if done % 25 == 0 or done == sessions:
                    took = time.perf_counter() - started
                    print(
                        f"{done}/{sessions} hibernated in {took:.0f} s ({done / took:.2f}/s); "
                        f"MemAvailable {_mib(_mem_available() - mem1):+} MiB, "
                        f"free disk {_mib(_disk_free(data_dir) - disk1):+} MiB, "
                        f"image p50 {_mib(statistics.median(images))} MiB, rss {_mib(_rss())} MiB",
                        flush=True,
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        total = time.perf_counter() - started
        await asyncio.sleep(5)  # the last instances' memory gone back (cgroups removed)
        mem2, disk2, rss2 = _mem_available(), _disk_free(data_dir), _rss()
        n = max(1, len(hibernated))
        result.update(
            hibernated=len(hibernated),
            create_and_hibernate_s_total=round(total, 1),
            create_and_hibernate_per_session_s=summary(per_session),
            sessions_per_second=round(len(hibernated) / total, 2),
            ram_per_hibernated_session_mib=round((mem1 - mem2) / n / 2**20, 3),
            disk_per_hibernated_session_mib=_mib((disk1 - disk2) / n),
            image_per_session_mib=summary([size / 2**20 for size in images]),
            hutch_rss_mib={"start": _mib(rss0), "with_live": _mib(rss1), "with_all": _mib(rss2)},
            host_ram_used_mib=_mib(mem0 - mem2),
            host_disk_used_mib=_mib(disk0 - disk2),
        )
        after = await _latencies(fleet, live)
        result["live_print_x_ms_after"] = _latency(after)
        result["live_p50_ratio_after_before"] = round(statistics.median(after) / statistics.median(before), 2)
        print(f"live sessions' print(x) after: {result['live_print_x_ms_after']}", flush=True)

        restores, wrong = [], 0
        for instance in random.sample(hibernated, min(wake, len(hibernated))):
            t0 = time.perf_counter()
            await runtime.restore(instance.instance_id)
            channel = AgentChannel(instance.socket_path)
            try:
                answer = await _print_x(channel)
            finally:
                await channel.aclose()
            restores.append((time.perf_counter() - t0) * 1000)
            wrong += answer != str(fleet.numbers[instance.instance_id])
        result["woken"] = len(restores)
        result["woken_wrong"] = wrong
        result["wake_to_first_answer_ms"] = summary(restores) if restores else None
        return result
    finally:
        await _teardown(runtime, live, data_dir, concurrency)


async def _teardown(runtime: Runtime, live: list[tuple[Instance, AgentChannel]], data_dir: Path, width: int) -> None:
    print("cleaning up…", flush=True)
    for _, channel in live:
        await channel.aclose()
    pending = [instance.instance_id for instance in runtime.instances()]

    async def stopper() -> None:
        while pending:
            await runtime.stop(pending.pop())

    await asyncio.gather(*(stopper() for _ in range(max(1, width))))
    await runtime.close(unstage=True)  # type: ignore[attr-defined]
    shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="sessions to create and hibernate")
    parser.add_argument("--live", type=int, default=100, help="sessions kept live, their latency measured")
    parser.add_argument("--concurrency", type=int, default=4, help="sessions created and hibernated at once")
    parser.add_argument("--wake", type=int, default=20, help="hibernated sessions woken at the end and checked")
    parser.add_argument(
        "--max-minutes", type=float, default=float("inf"), help="stop creating sessions after this long, measure on"
    )
    parser.add_argument(
        "--forks", action="store_true", help="start the hibernated sessions from a checkpoint of one (faster)"
    )
    parser.add_argument("--templates", type=Path, help="a template store holding `mini` (else one is built)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # A session's instance holds a few fds of hutch's while it is live (its agent connection).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleaned up as on Ctrl-C
    own = args.templates is None
    root = Path(tempfile.mkdtemp(prefix="hutch-bench-tpl-", dir="/var/tmp")) if own else args.templates
    try:
        result = asyncio.run(
            bench(
                template_store(root),
                args.sessions,
                args.live,
                args.concurrency,
                args.wake,
                args.max_minutes * 60,
                args.forks,
            )
        )
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, value in result.items():
        print(f"{name:40} {value}")


if __name__ == "__main__":
    main()
