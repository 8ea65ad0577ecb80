"""Benchmark of hutch beyond one process: PostgreSQL as MetaDB, gateways and nodes apart.

    sudo .venv/bin/python bench/cluster.py [--sessions 24] [--samples 1000] [--rehomes 3] [--json]

Three setups, one after the other in the same run, measured alike:
- `serve-sqlite`: `hutch serve` on its embedded SQLite (the baseline);
- `serve-postgres`: the same `hutch serve` with PostgreSQL as MetaDB (the MetaDB's own cost);
- `cluster`: one `hutch gateway` and two `hutch node`s, each node in a network namespace of its
  own behind a veth (tests/cluster/harness.py), PostgreSQL, workspaces on JuiceFS.

For each: (a) sessions created per second: `--sessions` creates through the API by 4 concurrent
clients (warm pools of 2 per node: most creates start an instance), and the p50 of one create
with a warm instance waiting; (b) routing latency: the median of `GET /health` of the agent of a
hot session through the gateway (`/functions/base/sessions/{id}/health`), one keep-alive
connection, `--samples` requests. Then, for the cluster only, (c) re-homing: a node is killed
(SIGKILL) and a client asks for its session every 50 ms until it is served again, on another node
with its files; the time is reported from the kill, and from the moment the node's lease (3 s
after its last heartbeat) ran out.

Everything runs on this machine (2 cores here): the clients share the cores with hutch, the
instances, PostgreSQL and JuiceFS. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway import RawClient, head, summary
from tests.cluster.harness import Cluster
from tests.e2e.conftest import Server
from tests.e2e.teardown import stop_leftover_instances
from tests.postgres import PostgresServer, create_database
from tests.sharedfs import SharedVolume

WARM = '[warm_pools]\nbase = 2\n"code-interpreter-v1" = 0\n'


def bench_creates(client: httpx.Client, count: int) -> dict:
    """Sessions per second with 4 concurrent clients, and one create's time with a warm instance."""
    warm = []
    for _ in range(5):
        time.sleep(1.0)  # the pools refill
        t0 = time.perf_counter()
        made = client.post("/v1/functions/base/sessions", json={})
        warm.append((time.perf_counter() - t0) * 1000)
        made.raise_for_status()
        client.delete(f"/v1/functions/base/sessions/{made.json()['sessionId']}").raise_for_status()
    time.sleep(1.0)

    def create(_: int) -> str:
        made = client.post("/v1/functions/base/sessions", json={})
        made.raise_for_status()
        return made.json()["sessionId"]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        made = list(pool.map(create, range(count)))
    elapsed = time.perf_counter() - t0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda key: client.delete(f"/v1/functions/base/sessions/{key}"), made))
    return {"sessions_per_second": round(count / elapsed, 1), "create_warm_ms": summary(warm)}


async def bench_routing(port: int, api_key: str, session_id: str, samples: int) -> dict:
    request = head(f"/functions/base/sessions/{session_id}/health", {"X-API-Key": api_key})
    client = await RawClient.tcp("127.0.0.1", port)
    try:
        for _ in range(50):
            assert await client.request(request) == 204
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            status = await client.request(request)
            times.append((time.perf_counter() - t0) * 1e6)
            assert status == 204, status
    finally:
        client.close()
    return {"routing_us": summary(times)}


def measure(url: str, port: int, admin: httpx.Client, args) -> dict:
    made = admin.post("/v1/tenants", json={"name": "bench", "maxSessions": 200})
    made.raise_for_status()
    api_key = made.json()["apiKey"]
    client = httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=120)
    results = bench_creates(client, args.sessions)
    hot = client.post("/v1/functions/base/sessions", json={"sessionId": "hot"})
    hot.raise_for_status()
    results.update(asyncio.run(bench_routing(port, api_key, "hot", args.samples)))
    results["api_key"] = api_key
    return results


def serve(root: Path, name: str, metadb_url: str | None, args) -> dict:
    config = f'metadb_url = "{metadb_url}"\n{WARM}' if metadb_url else WARM
    server = Server(root / name, config)
    try:
        server.start()
        result = measure(server.url, server.port, server.admin, args)
    finally:
        server.stop()
        stop_leftover_instances(server.data_dir)
    result.pop("api_key")
    return result


def rehome(cluster: Cluster, api_key: str, rounds: int) -> dict:
    gateway = cluster.gateways[0]
    client, admin = gateway.client(api_key), gateway.client()
    total, after_lease = [], []
    for index in range(rounds):
        key = f"rehome-{index}"
        body = {"sessionId": key}
        made = client.post("/v1/functions/base/sessions", json=body)
        made.raise_for_status()
        node = cluster.node(made.json()["nodeId"])
        killed = time.time()
        node.kill(signal.SIGKILL)
        # The lease runs from the node's last heartbeat (up to one interval before the kill).
        nodes = admin.get("/v1/nodes").json()["nodes"]
        beat = next(n["heartbeatTime"] for n in nodes if n["nodeId"] == node.node_id)
        expires = datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() + cluster.lease_seconds
        while client.get(f"/functions/base/sessions/{key}/health").status_code != 204:
            time.sleep(0.05)
        served = time.time()
        total.append((served - killed) * 1000)
        after_lease.append((served - expires) * 1000)
        moved = client.get(f"/v1/functions/base/sessions/{key}").json()
        assert moved["nodeId"] != node.node_id and moved["epoch"] == 1, moved
        node.start()
        cluster.wait_for_nodes(len(cluster.nodes))
    return {"rehome_ms": summary(total), "rehome_after_lease_ms": summary(after_lease)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The cluster's 2 nodes hold 16 instances each (tests/cluster/harness.py), warm ones included.
    parser.add_argument("--sessions", type=int, default=24, help="sessions created for the rate")
    parser.add_argument("--samples", type=int, default=1000, help="routing latency samples")
    parser.add_argument("--rehomes", type=int, default=3, help="node kills to measure re-homing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/cluster.py starts sandboxes and network namespaces: run it as root")

    root = Path(tempfile.mkdtemp(prefix="hutch-bench-cluster-", dir="/var/tmp"))
    root.chmod(0o755)
    postgres = PostgresServer()
    results: dict = {}
    try:
        postgres.init()
        postgres.start()
        results["serve-sqlite"] = serve(root, "sqlite", None, args)
        results["serve-postgres"] = serve(root, "postgres", asyncio.run(create_database(postgres.url)), args)
        volume = SharedVolume(postgres.url)
        volume.start()
        cluster = Cluster(volume, nodes=2, gateways=1)
        try:
            cluster.start()
            gateway = cluster.gateways[0]
            measured = measure(gateway.url, gateway.port, gateway.client(), args)
            measured.update(rehome(cluster, measured.pop("api_key"), args.rehomes))
            results["cluster"] = measured
        finally:
            cluster.stop()
            volume.stop()
    finally:
        postgres.remove()
        shutil.rmtree(root, ignore_errors=True)

    base = results["serve-sqlite"]
    for name in ("serve-postgres", "cluster"):
        if name in results:
            results[name]["vs_sqlite"] = {
                "sessions_per_second": round(results[name]["sessions_per_second"] / base["sessions_per_second"], 2),
                "routing_p50": round(results[name]["routing_us"]["p50"] / base["routing_us"]["p50"], 2),
            }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, result in results.items():
        print(f"{name}:")
        print(f"  sessions created per second (4 clients): {result['sessions_per_second']}")
        print(f"  one create, warm instance: p50 {result['create_warm_ms']['p50']} ms")
        print(f"  routing through the gateway: p50 {result['routing_us']['p50']} us")
        if "vs_sqlite" in result:
            ratio = result["vs_sqlite"]
            print(f"  vs serve-sqlite: creates x{ratio['sessions_per_second']}, routing p50 x{ratio['routing_p50']}")
        if "rehome_ms" in result:
            print(
                f"  re-homing after a node's kill: p50 {result['rehome_ms']['p50']} ms "
                f"({result['rehome_after_lease_ms']['p50']} ms after its lease ran out)"
            )
    _ = statistics  # medians come from bench.gateway.summary


if __name__ == "__main__":
    main()
