"""Instance networks and the egress proxy, with a test namespace playing the internet.

Only addresses on this machine are used: the sandbox's namespace, and an "internet" namespace
made by the test (10.250.0.2 behind a veth of its own).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import textwrap
import time

import pytest

from hutch.runtime.egress import EgressPolicy, EgressProxy, server_name
from hutch.runtime.network import HostNetwork, InstanceNetwork, NetworkLayout
from tests.loop_thread import LoopThread
from tests.runtime.internet import INTERNET

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def in_netns(netns: str, code: str, timeout: float = 15) -> str:
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "python3", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result.stdout + result.stderr


FETCH = """
import socket, sys
def fetch(ip, port, host=None):
    try:
        s = socket.create_connection((ip, port), timeout=3)
        s.sendall(f"GET / HTTP/1.0\\r\\nHost: {host or ip}\\r\\n\\r\\n".encode())
        s.settimeout(3)
        data = s.recv(200)
        return "ok" if data.startswith(b"HTTP/") else "closed"
    except OSError as exc:
        return type(exc).__name__
"""


@pytest.fixture(scope="module")
def egress(internet):
    loop = LoopThread()
    layout = NetworkLayout.make("e7", "10.202.0.0/22")
    proxy = EgressProxy(layout.subnet, upstream_dns=[INTERNET], static_hosts={"allowed.test": INTERNET})

    async def start():
        await proxy.start()

    loop.run(start())
    host = HostNetwork(layout, proxy.proxy_port, proxy.dns_port)
    host.install()
    networks = [InstanceNetwork(layout.addresses(slot)) for slot in (0, 1)]
    for network in networks:
        network.create()
    yield layout, proxy, networks, host
    for network in networks:
        network.destroy()
    host.remove()
    loop.run(proxy.close())
    loop.close()


def test_without_a_policy_nothing_gets_out(egress):
    _, proxy, (sandbox, _), _ = egress
    proxy.remove(sandbox.addresses.sandbox_ip)
    out = in_netns(sandbox.addresses.netns, FETCH + f"print(fetch('{INTERNET}', 8080))")
    assert out.strip() in ("closed", "ConnectionResetError")


def test_internet_access_reaches_outside_and_deny_rules_still_apply(egress):
    _, proxy, (sandbox, _), _ = egress
    ip = sandbox.addresses.sandbox_ip
    proxy.set_policy(ip, EgressPolicy.make(internet=True))
    assert in_netns(sandbox.addresses.netns, FETCH + f"print(fetch('{INTERNET}', 8080))").strip() == "ok"
    proxy.set_policy(ip, EgressPolicy.make(internet=True, deny=[f"{INTERNET}/32"]))
    assert in_netns(sandbox.addresses.netns, FETCH + f"print(fetch('{INTERNET}', 8080))").strip() != "ok"


def test_an_allow_list_opens_only_what_it_names(egress):
    _, proxy, (sandbox, _), _ = egress
    proxy.set_policy(sandbox.addresses.sandbox_ip, EgressPolicy.make(allow=["allowed.test", "*.wild.test"]))
    code = (
        FETCH
        + f"""
print(fetch('{INTERNET}', 8080, 'allowed.test'))
print(fetch('{INTERNET}', 8080, 'sub.wild.test'))
print(fetch('{INTERNET}', 8080, 'other.test'))
print(fetch('{INTERNET}', 8080))
"""
    )
    assert in_netns(sandbox.addresses.netns, code).split() == ["ok", "closed", "closed", "closed"]
    # sub.wild.test is allowed by name but resolves nowhere: a forged Host cannot pick the address
    proxy.set_policy(sandbox.addresses.sandbox_ip, EgressPolicy.make(allow=[f"{INTERNET}/32"], deny=["0.0.0.0/0"]))
    assert in_netns(sandbox.addresses.netns, FETCH + f"print(fetch('{INTERNET}', 8081))").strip() == "ok"


def test_the_host_its_loopback_and_other_sandboxes_stay_unreachable(egress):
    _, proxy, (sandbox, other), _ = egress
    proxy.set_policy(sandbox.addresses.sandbox_ip, EgressPolicy.make(internet=True))
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    other_server = subprocess.Popen(
        ["ip", "netns", "exec", other.addresses.netns, "python3", "-m", "http.server", "9000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        host_ip = sh("ip", "-4", "-o", "addr", "show", "scope", "global").stdout.split()[3].split("/")[0]
        code = (
            FETCH
            + f"""
for ip, port in [("127.0.0.1", {port}), ("{host_ip}", {port}), ("{sandbox.addresses.host_ip}", {port}),
                 ("{other.addresses.sandbox_ip}", 9000), ("169.254.169.254", 80)]:
    print(fetch(ip, port))
"""
        )
        outcomes = in_netns(sandbox.addresses.netns, code, timeout=40).split()
        assert len(outcomes) == 5 and "ok" not in outcomes, outcomes
        listener.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever arrived at the host service
    finally:
        other_server.kill()
        other_server.wait()
        listener.close()


def test_a_policy_change_closes_connections_it_no_longer_allows(egress):
    _, proxy, (sandbox, _), _ = egress
    ip = sandbox.addresses.sandbox_ip
    proxy.set_policy(ip, EgressPolicy.make(internet=True))
    client = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            sandbox.addresses.netns,
            "python3",
            "-c",
            textwrap.dedent(f"""
            import socket, sys
            s = socket.create_connection(("{INTERNET}", 8080), timeout=10)
            print("open", flush=True)
            sys.stdin.readline()
            try:
                s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); data = s.recv(100)
                print("answered" if data else "closed", flush=True)
            except OSError:
                print("closed", flush=True)
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout.readline().strip() == "open"
    time.sleep(0.2)
    proxy.set_policy(ip, EgressPolicy.make(internet=False))
    time.sleep(0.2)
    client.stdin.write("go\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "closed"
    client.wait(10)


def test_dns_answers_only_what_the_policy_allows(egress):
    layout, proxy, (sandbox, _), _ = egress
    ip = sandbox.addresses.sandbox_ip
    query = f"""
import socket, struct
def ask(name):
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + b"\\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, ("{layout.dns_address}", 53)); a = s.recv(512)
    return "refused" if a[3] & 0xF == 5 else socket.inet_ntoa(a[-4:])
print(ask("allowed.test")); print(ask("elsewhere.test"))
"""
    proxy.set_policy(ip, EgressPolicy.make(allow=["allowed.test"]))
    assert in_netns(sandbox.addresses.netns, query).split() == [INTERNET, "refused"]
    proxy.set_policy(ip, EgressPolicy.make(internet=True))
    assert in_netns(sandbox.addresses.netns, query).split() == [INTERNET, INTERNET]


def test_teardown_leaves_no_namespace_interface_or_rules():
    layout = NetworkLayout.make("e8", "10.203.0.0/24")
    host = HostNetwork(layout, 15999, 15998)
    host.install()
    network = InstanceNetwork(layout.addresses(3))
    network.create()
    assert layout.leftover_slots() == [3]
    network.destroy()
    host.remove()
    assert layout.leftover_slots() == []
    assert "hve8" not in sh("ip", "-o", "link").stdout
    assert "hutch_e8" not in sh("nft", "list", "tables").stdout


def test_policies_parse_like_e2bs():
    policy = EgressPolicy.make(allow=["1.2.3.4", "10.0.0.0/8", "Example.COM", "*.pypi.org"], deny=["0.0.0.0/0"])
    import ipaddress

    assert policy.allows(ipaddress.ip_address("1.2.3.4"))
    assert not policy.allows(ipaddress.ip_address("8.8.8.8"))
    assert policy.domain_allowed("files.pypi.org") and policy.domain_allowed("a.b.pypi.org")
    assert not policy.domain_allowed("pypi.org") and policy.domain_allowed("example.com")
    from hutch.errors import InvalidArgument

    for bad in ({"deny": ["example.com"]}, {"allow": ["bad domain"]}, {"allow": ["*."]}):
        with pytest.raises(InvalidArgument):
            EgressPolicy.make(**bad)


def test_the_requested_name_is_read_from_tls_and_http():
    assert server_name(b"GET / HTTP/1.1\r\nHost: example.com:8080\r\n\r\n") == "example.com"
    name = b"files.pythonhosted.org"
    ext = struct.pack(">HH", 0, len(name) + 5) + struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
    body = b"\x03\x03" + b"\0" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + struct.pack(">H", len(ext)) + ext
    record = b"\x16\x03\x01" + struct.pack(">H", len(body) + 4) + b"\x01" + struct.pack(">I", len(body))[1:] + body
    assert server_name(record) == "files.pythonhosted.org"
    assert server_name(record[:20]) is None  # a truncated hello names nothing, and raises nothing
