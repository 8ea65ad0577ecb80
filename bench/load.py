"""Load: many concurrent sessions through a real `hutch serve`, every answer checked for its session.

    sudo .venv/bin/python bench/load.py [--sessions 200] [--requests 25] [--concurrency 32] [--json PATH]

Starts its own `hutch serve` (temporary data dir under /var/tmp, its own uid range), then runs
`tests/faults/load.py`: `--sessions` sessions, a quarter of each kind (HEADER_FIELD sessions made
through the API, GENERATED_COOKIE sessions started by their first request, E2B sandboxes reached
with the E2B headers, and sessions of a function whose user server echoes the session's
identity), each with a token only its own instance knows; then `--requests` requests per session
(file reads, commands, user-server GETs) from `--concurrency` clients at once, interleaved at
random. Every answer is checked: a token of another session is a misroute, anything else but
the session's own token an error. It prints a table (misroutes, errors, error rate, latency
percentiles per kind of request, session creates, memory of the instances) and with `--json`
writes it all; `bench/reliability.py` puts it in docs/reliability-faults.md.

Sized for a 2-core machine: instances get 0.25 vCPU, 128 MB, a 64 MB workspace; 200 of them
take about as much memory as the table's "instances memory" row says. The load generator shares
the cores with hutch and the instances.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.conftest import ADMIN_KEY, Server, _cleanup
from tests.faults.load import Load

UID_BASE = 2_100_000_000


def instances_memory(data_dir: Path) -> dict[str, float]:
    """Memory of every instance of the server (its cgroups' sum), in MiB."""
    import hashlib

    group = "hutch-" + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:8]
    for parent in Path("/sys/fs/cgroup/memory").glob(f"**/{group}"):
        stat = dict(line.split() for line in (parent / "memory.stat").read_text().splitlines())
        count = sum(1 for child in parent.iterdir() if child.is_dir())
        rss = int(stat.get("total_rss", 0)) / 2**20
        usage = int((parent / "memory.usage_in_bytes").read_text()) / 2**20
        return {
            "instances": count,
            "rss_mib": round(rss, 1),
            "usage_mib": round(usage, 1),
            "rss_per_instance_mib": round(rss / count, 1) if count else 0.0,
        }
    return {}


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU time used so far by this process (the load generator), `hutch serve`, and its instances."""
    import hashlib

    assert server.proc is not None
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    group = "hutch-" + hashlib.sha256(str(server.data_dir.resolve()).encode()).hexdigest()[:8]
    instances = sum(int((p / "cpuacct.usage").read_text()) for p in Path("/sys/fs/cgroup/cpuacct").glob(f"**/{group}"))
    return {
        "load_generator": time.process_time(),
        "hutch_serve": (int(fields[11]) + int(fields[12])) / ticks,
        "instances": instances / 1e9,
    }


def server_rss_mib(server: Server) -> float:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def measure(server: Server, sessions: int, requests: int, concurrency: int, seed: int) -> dict:
    load = Load(server.url, ADMIN_KEY, concurrency, seed)
    try:
        started = time.perf_counter()
        await load.prepare(sessions)
        prepared = time.perf_counter() - started
        memory = instances_memory(server.data_dir)
        cpu_before = cpu_seconds(server)
        result = await load.run(requests)
        cpu_after = cpu_seconds(server)
        result.memory = {**memory, "hutch_serve_rss_mib": server_rss_mib(server)}
    finally:
        await load.close()
    summary = result.summary()
    summary["prepare_seconds"] = round(prepared, 1)
    summary["concurrency"] = concurrency
    summary["requests_per_session"] = requests
    summary["cpu_seconds"] = {k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_after}
    summary["seconds"] = round(result.seconds, 1)
    summary["misroute_examples"] = result.misroutes[:10]
    summary["error_examples"] = result.errors[:10]
    return summary


def run(sessions: int, requests: int, concurrency: int, seed: int = 0) -> dict:
    """Start a server, load it, stop it (and every instance it left); the summary."""
    root = Path(tempfile.mkdtemp(prefix="hutch-bench-load-", dir="/var/tmp"))
    root.chmod(0o755)
    config = (
        f"uid_base = {UID_BASE}\nmax_instances = {max(256, sessions + 16)}\n"
        '[warm_pools]\nbase = 0\n"code-interpreter-v1" = 0\n'
    )
    server = Server(root / "data", config)
    try:
        server.start()
        summary = asyncio.run(measure(server, sessions, requests, concurrency, seed))
    finally:
        _cleanup(server)
        shutil.rmtree(root, ignore_errors=True)
    summary["host"] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    return summary


def spread(values: dict[str, float]) -> str:
    return f"p50 {values['p50']}, p90 {values['p90']}, p99 {values['p99']}, max {values['max']}"


def table(summary: dict) -> list[tuple[str, str]]:
    rows = [
        ("sessions (header / cookie / E2B / user server)", f"{summary['sessions']}"),
        ("requests", f"{summary['requests']} ({summary['requests_per_session']} per session, "
                     f"{summary['concurrency']} clients)"),
        ("misrouted answers", str(summary["misroutes"])),
        ("errors", f"{summary['errors']} ({summary['error_rate'] * 100:.2f} %)"),
        ("sessions lost / moved to another instance", f"{summary['lost_sessions']} / {summary['rebound_sessions']}"),
        ("throughput", f"{summary['requests_per_second']:.0f} requests/s"),
    ]  # fmt: skip
    for kind, values in summary["latency_ms"].items():
        if values:
            rows.append((f"latency, {kind} (ms)", spread(values)))
    if summary["create_ms"]:
        rows.append(("session start + first request (ms)", spread(summary["create_ms"])))
    cpu = summary.get("cpu_seconds")
    if cpu:
        rows.append(
            (
                "CPU used during the requests",
                f"{summary['seconds']} s of wall time on {os.cpu_count()} CPUs: load generator "
                f"{cpu['load_generator']} s, hutch serve {cpu['hutch_serve']} s, instances {cpu['instances']} s",
            )
        )
    memory = summary.get("memory") or {}
    if memory.get("instances"):
        rows.append(
            (
                "instances memory (cgroups, RSS)",
                f"{memory['rss_mib']:.0f} MiB for {memory['instances']} instances "
                f"({memory['rss_per_instance_mib']} MiB each); hutch serve {memory['hutch_serve_rss_mib']} MiB",
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--requests", type=int, default=25, help="requests per session")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/load.py starts sandboxes: run it as root")
    summary = run(args.sessions, args.requests, args.concurrency, args.seed)
    width = max(len(name) for name, _ in table(summary))
    for name, value in table(summary):
        print(f"{name:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if summary["misroutes"] or summary["lost_sessions"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
