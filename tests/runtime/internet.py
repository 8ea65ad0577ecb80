"""A network namespace that plays "the internet" for network tests: web servers on
10.250.0.2:8080 and :8081 and a DNS server on :53 that answers every name with 10.250.0.2,
behind a veth of its own. Only addresses on this machine are used."""

from __future__ import annotations

import subprocess
import time

INTERNET = "10.250.0.2"
NETNS = "hutch-test-inet"
DNS_SERVER = r"""
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 53))
while True:
    q, a = s.recvfrom(512)
    header = struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0)
    record = bytes.fromhex("c00c000100010000003c0004") + socket.inet_aton("10.250.0.2")
    s.sendto(q[:2] + header + q[12:] + record, a)
"""


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


class Internet:
    def __init__(self) -> None:
        self.servers: list[subprocess.Popen] = []

    def start(self) -> None:
        self.stop()
        _sh("ip", "netns", "add", NETNS)
        _sh("ip", "link", "add", "hvtestinet", "type", "veth", "peer", "name", "eth0", "netns", NETNS)
        _sh("ip", "addr", "add", "10.250.0.1/30", "dev", "hvtestinet")
        _sh("ip", "link", "set", "hvtestinet", "up")
        for cmd in (
            ["addr", "add", f"{INTERNET}/30", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "lo", "up"],
        ):
            _sh("ip", "-n", NETNS, *cmd)
        for port in (8080, 8081):
            self.servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", NETNS, "python3", "-m", "http.server", str(port), "--bind", INTERNET],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self.servers.append(subprocess.Popen(["ip", "netns", "exec", NETNS, "python3", "-c", DNS_SERVER]))
        self._wait_listening()

    @staticmethod
    def _wait_listening(timeout: float = 30.0) -> None:
        """Until the web servers and the DNS server listen (a loaded machine starts Pythons slowly)."""
        deadline = time.monotonic() + timeout
        while True:
            out = _sh("ip", "netns", "exec", NETNS, "ss", "-Hltun", check=False).stdout
            ports = {line.split()[4].rsplit(":", 1)[-1] for line in out.splitlines() if len(line.split()) > 4}
            if {"53", "8080", "8081"} <= ports:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test internet's servers did not start: {out!r}")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()
        self.servers = []
        _sh("ip", "link", "delete", "hvtestinet", check=False)
        _sh("ip", "netns", "delete", NETNS, check=False)
