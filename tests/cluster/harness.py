"""A hutch cluster on one machine, whose traffic really crosses a network.

- a bridge `hclbr0` (10.251.0.1/24) in the host's namespace;
- each node (`hutch node`) in a network namespace of its own, `hutch-cl-<i>`, behind a veth on
  that bridge, at 10.251.0.1<i>:4000: a gateway reaches it over TCP/IP, and a node killed with
  SIGKILL answers nothing more (its namespace refuses connections);
- the gateways (`hutch gateway`) on the host's loopback, on free ports;
- PostgreSQL (MetaDB) of its own, listening on the bridge, so that it can be stopped and
  started again without disturbing other tests;
- workspaces on a shared JuiceFS volume (tests/sharedfs.py), mounted twice: odd nodes use one
  mount, even nodes the other, so a session that moves from one to the next changes mounts.

Used by tests/cluster/ and bench/cluster.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from hutch.selftest.target import wait_healthy
from hutch.storage.shared import SharedStore
from tests.e2e.teardown import stop_leftover_instances
from tests.postgres import PostgresServer, create_database

ADMIN_KEY = "e2b_00000000000000000000000000000000c1a55e12"
BRIDGE, BRIDGE_IP = "hclbr0", "10.251.0.1"
NODE_PORT = 4000
# Each node's sandboxes run as uids of their own (and below 2^31, which JuiceFS's PostgreSQL
# metadata needs): 16 slots of 65536 uids each.
UID_BASE, UID_STRIDE, MAX_INSTANCES = 1_950_000_000, 2_000_000, 16


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """One hutch process and its log."""

    def __init__(self, argv: list[str], log: Path, health: str, netns: str | None = None) -> None:
        # nsenter, not `ip netns exec`: that one also mounts a /sys of its own, without cgroups.
        self.argv = (["nsenter", f"--net=/run/netns/{netns}", "--"] if netns else []) + argv
        self.log = log
        self.health = health
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, env={**os.environ, "HUTCH_API_KEY": ADMIN_KEY}
            )
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 90.0) -> None:
        assert self.proc is not None
        wait_healthy(self.proc, self.health, self.log, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Node(Process):
    def __init__(self, index: int, root: Path, config: Path) -> None:
        self.index = index
        self.netns = f"hutch-cl-{index}"
        self.ip = f"10.251.0.{10 + index}"
        self.data_dir = root / f"node{index}"
        self.node_id = f"node{index}"
        super().__init__(
            [sys.executable, "-m", "hutch", "node", "--host", self.ip, "--port", str(NODE_PORT),
             "--data-dir", str(self.data_dir), "--config", str(config), "--log-level", "info"],
            root / f"node{index}.log",
            f"http://{self.ip}:{NODE_PORT}/health",
            netns=self.netns,
        )  # fmt: skip


class Gateway(Process):
    def __init__(self, index: int, root: Path, config: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            [sys.executable, "-m", "hutch", "gateway", "--port", str(self.port),
             "--data-dir", str(root / f"gateway{index}"), "--config", str(config), "--log-level", "info"],
            root / f"gateway{index}.log",
            f"{self.url}/health",
        )  # fmt: skip

    def client(self, api_key: str = ADMIN_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": api_key}, timeout=60)


class Cluster:
    def __init__(
        self, volume, nodes: int = 3, gateways: int = 2, lease_seconds: float = 3.0, templates: Path | None = None
    ) -> None:
        self.volume = volume  # tests/sharedfs.SharedVolume
        self.templates = templates  # a template store every node uses, if given
        self.root = Path(tempfile.mkdtemp(prefix="hutch-cluster-", dir="/var/tmp"))
        self.root.chmod(0o755)
        self.lease_seconds = lease_seconds
        self.postgres = PostgresServer(listen=f"127.0.0.1,{BRIDGE_IP}", trusted_networks=("10.251.0.0/24",))
        self.node_count, self.gateway_count = nodes, gateways
        self.nodes: list[Node] = []
        self.gateways: list[Gateway] = []
        self.metadb_url = ""
        self.shared_dir = f"cluster-{uuid.uuid4().hex[:8]}"

    # -- the network ----------------------------------------------------------------------------

    def _network_up(self) -> None:
        self._network_down()
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for index in range(1, self.node_count + 1):
            netns, veth = f"hutch-cl-{index}", f"hcl{index}"
            _sh("ip", "netns", "add", netns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _sh("ip", "link", "set", veth, "master", BRIDGE, "up")
            for command in (
                ["addr", "add", f"10.251.0.{10 + index}/24", "dev", "eth0"],
                ["link", "set", "eth0", "up"],
                ["link", "set", "lo", "up"],
                ["route", "add", "default", "via", BRIDGE_IP],
            ):
                _sh("ip", "-n", netns, *command)

    def _network_down(self) -> None:
        for index in range(1, self.node_count + 1):
            _sh("ip", "netns", "del", f"hutch-cl-{index}", check=False)
        _sh("ip", "link", "del", BRIDGE, check=False)

    # -- start and stop -------------------------------------------------------------------------

    def start(self) -> None:
        self._network_up()
        self.postgres.init()
        self.postgres.start()
        self.metadb_url = asyncio.run(create_database(self.postgres.url)).replace("127.0.0.1", BRIDGE_IP)
        shared = self.volume.a.mount_point / self.shared_dir  # seen by both mounts
        shared.mkdir()
        shared.chmod(0o755)
        warm = '[warm_pools]\nbase = 1\n"code-interpreter-v1" = 0\n'
        gateway_config = self.root / "gateway.toml"
        gateway_config.write_text(
            f'metadb_url = "{self.metadb_url}"\n{warm}'
            f"[cluster]\nlease_seconds = {self.lease_seconds}\ndirectory_refresh = 0.5\n"
        )
        for index in range(1, self.node_count + 1):
            config = self.root / f"node{index}.toml"
            mount = self.volume.a if index % 2 else self.volume.b
            config.write_text(
                f'metadb_url = "{self.metadb_url}"\nworkspace_store = "shared"\n'
                f"uid_base = {UID_BASE + (index - 1) * UID_STRIDE}\nmax_instances = {MAX_INSTANCES}\n{warm}"
                f'[shared_storage]\npath = "{mount.mount_point / self.shared_dir}"\nnode_id = "node{index}"\n'
                f'[cluster]\nnode_id = "node{index}"\nlease_seconds = {self.lease_seconds}\nheartbeat_interval = 0.5\n'
                + (f'[templates]\ndir = "{self.templates}"\n' if self.templates else "")
            )
            self.nodes.append(Node(index, self.root, config))
        for index in range(1, self.gateway_count + 1):
            self.gateways.append(Gateway(index, self.root, gateway_config))
        for process in [*self.nodes, *self.gateways]:
            process.start(wait=False)
        for process in [*self.nodes, *self.gateways]:
            process.wait_healthy()
        self.wait_for_nodes(len(self.nodes))

    def wait_for_nodes(self, count: int, timeout: float = 30.0) -> None:
        """Until the gateways can see `count` live nodes (heartbeats in MetaDB)."""
        client = self.gateways[0].client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = client.get("/v1/nodes").json().get("nodes", [])
            if sum(1 for n in nodes if n["live"]) >= count:
                return
            time.sleep(0.2)
        raise RuntimeError(f"fewer than {count} live nodes after {timeout} s")

    def stop(self) -> None:
        """Everything goes, whatever fails on the way (a failed test must not leave sandboxes)."""
        try:
            for process in [*self.gateways, *self.nodes]:
                process.kill(signal.SIGTERM)
            for node in self.nodes:
                mount = self.volume.a if node.index % 2 else self.volume.b
                store = SharedStore(mount.mount_point / self.shared_dir / "workspaces", node.node_id)
                stop_leftover_instances(node.data_dir, store)
        finally:
            self.postgres.remove()
            self._network_down()
            shutil.rmtree(self.root, ignore_errors=True)

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.node_id == node_id)
