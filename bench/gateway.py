"""Benchmark of the gateway through a real `hutch serve`: session create, added latency, throughput.

    sudo .venv/bin/python bench/gateway.py [--runs 30] [--samples 2000] [--seconds 5] [--clients] [--json]

(a) session create through the API (`POST /v1/functions/{name}/sessions`) with a warm instance
    waiting in the pool (target <= 10 ms p50) and without one (a cold start, <= 100 ms p50);
(b) the gateway's added latency on a hot session (target <= 1 ms p50): `GET /health` of the agent
    through `/functions/base/invoke/health` with a session header, against the same request sent
    straight to the instance's socket, interleaved, medians of one run, one keep-alive
    connection each, same minimal client;
(c) proxied requests per second with a few concurrent clients (an asyncio load of keep-alive
    connections, one session each, and `wrk` when it is installed), next to the same load sent
    straight to the agents;
(d) with --clients: the upstream client candidates, in this process, straight against one
    agent socket: hutch's own (asyncio protocol + httptools), aiohttp (UnixConnector), httpx.

Everything runs on this machine: the load generator shares its cores with hutch and the
instances. It starts its own `hutch serve` on a temporary data dir under /var/tmp and stops it
and every instance it left when done. Needs root (sandboxes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.conftest import Server
from tests.e2e.teardown import stop_leftover_instances


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p90": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 3),
        "n": len(ordered),
    }


# -- a minimal keep-alive HTTP/1.1 client, the same for both legs of the latency comparison ----


class RawClient:
    """Enough HTTP/1.1 for `GET /health`-like requests (Content-Length or empty bodies)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def tcp(cls, host: str, port: int) -> RawClient:
        return cls(*await asyncio.open_connection(host, port))

    @classmethod
    async def unix(cls, path: Path) -> RawClient:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def request(self, head: bytes) -> int:
        self.writer.write(head)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        match = re.search(rb"\r\ncontent-length: *(\d+)", raw, re.IGNORECASE)
        if match and int(match.group(1)):
            await self.reader.readexactly(int(match.group(1)))
        elif b"transfer-encoding: chunked" in raw.lower():
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        return status

    def close(self) -> None:
        self.writer.close()


def head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: bench", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- (a) session create --------------------------------------------------------------------------


def wait_pool(server: Server, key: str, at_least: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/health").json()["warmPools"].get(key, 0) >= at_least:
            return
        time.sleep(0.02)
    raise RuntimeError(f"warm pool {key} did not fill")


def bench_create(server: Server, client: httpx.Client, runs: int) -> dict:
    warm, cold = [], []
    for _ in range(runs):
        wait_pool(server, "*/base", 1)
        t0 = time.perf_counter()
        created = client.post("/v1/functions/base/sessions", json={})
        warm.append((time.perf_counter() - t0) * 1000)
        created.raise_for_status()
        client.delete(f"/v1/functions/base/sessions/{created.json()['sessionId']}").raise_for_status()
    cold_network: list[float] = []
    for name, network, samples in (("bench-cold", None, cold), ("bench-cold-net", {}, cold_network)):
        body = {"name": name, "warmPoolSize": 0, "resources": {"memoryMB": 256}, "network": network}
        client.post("/v1/functions", json=body).raise_for_status()
        for _ in range(runs):
            t0 = time.perf_counter()
            created = client.post(f"/v1/functions/{name}/sessions", json={})
            samples.append((time.perf_counter() - t0) * 1000)
            created.raise_for_status()
            client.delete(f"/v1/functions/{name}/sessions/{created.json()['sessionId']}").raise_for_status()
    return {
        "create_warm_ms": summary(warm),
        "create_cold_ms": summary(cold),
        "create_cold_network_ms": summary(cold_network),
    }


# -- (b) added latency ---------------------------------------------------------------------------


def socket_of(server: Server, container_id: str) -> Path:
    return server.data_dir / "instances" / container_id / "run" / "agent.sock"


async def bench_latency(server: Server, api_key: str, session_id: str, sock: Path, samples: int) -> dict:
    via = await RawClient.tcp("127.0.0.1", server.port)
    direct = await RawClient.unix(sock)
    via_head = head("/functions/base/invoke/health", {"X-API-Key": api_key, "x-fc-session-id": session_id})
    direct_head = head("/health", {})
    for _ in range(300):  # warm up both paths (connections, caches, the agent's thread)
        assert await via.request(via_head) == 204
        assert await direct.request(direct_head) == 204
    gateway, agent = [], []
    clock = time.perf_counter
    for _ in range(samples):
        t0 = clock()
        await via.request(via_head)
        t1 = clock()
        await direct.request(direct_head)
        t2 = clock()
        gateway.append((t1 - t0) * 1000)
        agent.append((t2 - t1) * 1000)
    via.close()
    direct.close()
    result = {"via_gateway_ms": summary(gateway), "direct_ms": summary(agent)}
    result["added_ms_p50"] = round(result["via_gateway_ms"]["p50"] - result["direct_ms"]["p50"], 3)
    return result


# -- (c) throughput ------------------------------------------------------------------------------


async def load(connect: Callable[[int], Awaitable[RawClient]], heads: list[bytes], seconds: float) -> float:
    """Requests per second of len(heads) keep-alive clients, each sending its head in a loop."""
    clients = [await connect(i) for i in range(len(heads))]
    stop = time.perf_counter() + seconds
    counts = [0] * len(heads)

    async def run(i: int) -> None:
        client, request = clients[i], heads[i]
        while time.perf_counter() < stop:
            await client.request(request)
            counts[i] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(len(heads))))
    elapsed = time.perf_counter() - t0
    for client in clients:
        client.close()
    return sum(counts) / elapsed


def wrk(url: str, headers: dict[str, str], seconds: float, connections: int) -> float | None:
    if shutil.which("wrk") is None:
        return None
    args = ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s"]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s*([\d.]+)", out)
    return float(match.group(1)) if match else None


async def bench_throughput(server: Server, api_key: str, sessions: list[tuple[str, Path]], seconds: float) -> dict:
    heads = [
        head("/functions/base/invoke/health", {"X-API-Key": api_key, "x-fc-session-id": sid}) for sid, _ in sessions
    ]
    via = await load(lambda i: RawClient.tcp("127.0.0.1", server.port), heads, seconds)
    direct = await load(lambda i: RawClient.unix(sessions[i][1]), [head("/health", {})] * len(sessions), seconds)
    result = {"clients": len(sessions), "via_gateway_rps": round(via), "direct_rps": round(direct)}
    rps = wrk(
        f"{server.url}/functions/base/invoke/health",
        {"X-API-Key": api_key, "x-fc-session-id": sessions[0][0]},
        seconds,
        connections=len(sessions),
    )
    if rps is not None:
        result["via_gateway_wrk_rps"] = round(rps)
    return result


# -- (d) upstream client candidates --------------------------------------------------------------


async def compare_clients(sock: Path, samples: int, seconds: float, concurrency: int = 8) -> dict:
    from hutch.gateway.upstream import UpstreamPool

    pool = UpstreamPool()
    request_head = b"GET /health HTTP/1.1\r\nhost: sandbox\r\n\r\n"

    async def own() -> None:
        conn, _ = await pool.acquire(("bench", None), sock)
        conn.begin(False)
        conn.write(request_head)
        await conn.read_head()
        while await conn.read_body() is not None:
            pass
        conn.finish(True)

    candidates: dict[str, Callable[[], Awaitable[None]]] = {"hutch (asyncio protocol + httptools)": own}
    closers = []
    try:
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(sock), limit=concurrency), auto_decompress=False
        )
        closers.append(session.close)

        async def with_aiohttp() -> None:
            async with session.get("http://sandbox/health") as response:
                await response.read()

        candidates["aiohttp (UnixConnector)"] = with_aiohttp
    except ImportError:
        pass
    client = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(sock)),
        base_url="http://sandbox",
        limits=httpx.Limits(max_keepalive_connections=concurrency),
    )
    closers.append(client.aclose)

    async def with_httpx() -> None:
        await client.get("/health")

    candidates["httpx (AsyncHTTPTransport uds)"] = with_httpx

    results = {}
    for name, call in candidates.items():
        for _ in range(300):
            await call()
        latencies = []
        for _ in range(samples):
            t0 = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - t0) * 1000)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(call: Callable[[], Awaitable[None]] = call, stop: float = stop) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await call()
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        results[name] = {"latency_ms": summary(latencies), "rps": round(done / (time.perf_counter() - t0))}
    for close in closers:
        await close()
    pool.close()
    return results


# -- the run -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="session creates of each kind")
    parser.add_argument("--samples", type=int, default=2000, help="latency samples")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients in the throughput run")
    parser.add_argument("--clients", action="store_true", help="also compare upstream HTTP clients")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/gateway.py starts sandboxes: run it as root")

    root = Path(tempfile.mkdtemp(prefix="hutch-bench-gw-", dir="/var/tmp"))
    root.chmod(0o755)
    server = Server(root / "data", '[warm_pools]\nbase = 2\n"code-interpreter-v1" = 0\n')
    results: dict = {}
    try:
        server.start()
        made = server.admin.post("/v1/tenants", json={"name": "bench", "maxSessions": 100}).json()
        api_key = made["apiKey"]
        client = httpx.Client(base_url=server.url, headers={"X-API-Key": api_key}, timeout=60)
        results.update(bench_create(server, client, args.runs))

        sessions = []
        for i in range(max(1, args.concurrency)):
            body = client.post("/v1/functions/base/sessions", json={"sessionId": f"bench-{i}"}).json()
            sessions.append((body["sessionId"], socket_of(server, body["containerId"])))
        results["latency"] = asyncio.run(bench_latency(server, api_key, *sessions[0], args.samples))
        results["throughput"] = asyncio.run(bench_throughput(server, api_key, sessions, args.seconds))
        if args.clients:
            results["upstream_clients"] = asyncio.run(
                compare_clients(sessions[0][1], args.samples, min(args.seconds, 3.0))
            )
    finally:
        server.stop()
        stop_leftover_instances(server.data_dir)
        shutil.rmtree(root, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
        return
    lat = results["latency"]
    tput = results["throughput"]
    rows = [
        ("session create, warm pool (API)", f"{results['create_warm_ms']['p50']} ms", "<= 10 ms"),
        ("session create, no warm instance (API)", f"{results['create_cold_ms']['p50']} ms", "<= 100 ms"),
        ("session create, no warm instance, network", f"{results['create_cold_network_ms']['p50']} ms", "<= 100 ms"),
        ("GET /health via the gateway", f"{lat['via_gateway_ms']['p50']} ms", ""),
        ("GET /health straight to the agent", f"{lat['direct_ms']['p50']} ms", ""),
        ("gateway added latency, hot session", f"{lat['added_ms_p50']} ms", "<= 1 ms"),
        (f"proxied req/s, {tput['clients']} clients (asyncio load)", str(tput["via_gateway_rps"]), ""),
        (f"direct req/s, {tput['clients']} clients (asyncio load)", str(tput["direct_rps"]), ""),
    ]
    if "via_gateway_wrk_rps" in tput:
        rows.append((f"proxied req/s, {tput['clients']} connections (wrk)", str(tput["via_gateway_wrk_rps"]), ""))
    for name, result in results.get("upstream_clients", {}).items():
        rows.append((f"upstream client {name}", f"{result['latency_ms']['p50']} ms p50, {result['rps']} req/s", ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'p50 / value':>28}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>28}  {target}")


if __name__ == "__main__":
    main()
