"""Real sandboxes with a network policy, against a namespace playing the internet (10.250.0.2)."""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest

from hutch.errors import Unimplemented
from hutch.runtime.network import Networking

pytestmark = pytest.mark.sandbox

FETCH = """
import socket, sys
def fetch(ip, port, host=None):
    try:
        s = socket.create_connection((ip, port), timeout=3)
        s.sendall(f"GET / HTTP/1.0\\r\\nHost: {host or ip}\\r\\n\\r\\n".encode())
        s.settimeout(3)
        return "ok" if s.recv(200).startswith(b"HTTP/") else "closed"
    except OSError as exc:
        return type(exc).__name__
"""


@pytest.fixture
def networked(runtime, make_sandbox, internet):
    """make(policy) -> a sandbox with that network policy; gVisor refuses networks clearly."""
    if runtime.networking is None:
        # Pinned names let the DNS and domain rules be tested without any real DNS.
        runtime.networking = Networking(runtime.default_layout(), static_hosts={"allowed.test": internet})

    def make(policy: dict):
        if not runtime.supports_network:
            with pytest.raises(Unimplemented):
                make_sandbox(network=policy)
            pytest.skip(f"{runtime.name} refuses network policies (checked above)")
        return make_sandbox(network=policy)

    return make


def test_internet_access_reaches_outside_but_never_the_host_or_metadata(networked, internet):
    sandbox = networked({"internet": True})
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    reached = []
    threading.Thread(target=lambda: reached.append(listener.accept()), daemon=True).start()
    host_ip = (
        subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True)
        .stdout.split()[3]
        .split("/")[0]
    )
    try:
        result = sandbox.python(
            FETCH
            + f"""
for target in [("{internet}", 8080), ("127.0.0.1", {port}), ("{host_ip}", {port}), ("169.254.169.254", 80)]:
    print(fetch(*target))
""",
            timeout=60,
        )
        outcomes = result.text.split()
        assert outcomes[0] == "ok", result.text + result.stderr.decode()
        assert "ok" not in outcomes[1:], outcomes
        assert reached == []  # nothing ever arrived at the host's own service
    finally:
        listener.close()


def test_an_allow_list_opens_only_what_it_names(networked, internet):
    sandbox = networked({"internet": False, "allow": ["allowed.test", f"{internet}/32"], "deny": []})
    result = sandbox.python(FETCH + f"print(fetch('{internet}', 8081)); print(fetch('10.250.0.9', 80))")
    assert result.text.split()[0] == "ok"
    assert result.text.split()[1] != "ok"
    names = sandbox.python(
        "import socket\n"
        "for name in ('allowed.test', 'elsewhere.test'):\n"
        "    try:\n        print(socket.gethostbyname(name))\n"
        "    except OSError as exc:\n        print(type(exc).__name__)\n"
    )
    assert names.text.split()[0] == internet and names.text.split()[1] != internet


def test_a_policy_change_applies_at_once(networked, runtime, loop, internet):
    sandbox = networked({"internet": True})
    assert sandbox.python(FETCH + f"print(fetch('{internet}', 8080))").text.strip() == "ok"
    loop.run(runtime.set_network(sandbox.id, {"internet": True, "deny": [f"{internet}/32"]}))
    assert sandbox.python(FETCH + f"print(fetch('{internet}', 8080))").text.strip() != "ok"
    loop.run(runtime.set_network(sandbox.id, {"internet": False, "allow": [f"{internet}/32"]}))
    assert sandbox.python(FETCH + f"print(fetch('{internet}', 8080))").text.strip() == "ok"


def test_a_sandbox_without_a_network_cannot_be_given_one_later(runtime, make_sandbox, loop):
    from hutch.errors import FailedPrecondition

    sandbox = make_sandbox()
    with pytest.raises(FailedPrecondition):
        loop.run(runtime.set_network(sandbox.id, {"internet": True}))


def test_stopping_a_networked_sandbox_leaves_no_namespace_interface_or_policy(networked, runtime):
    sandbox = networked({"internet": True})
    slot = sandbox.instance.detail["slot"]
    addresses = runtime.networking.layout.addresses(slot)
    assert slot in runtime.networking.layout.leftover_slots()
    sandbox.stop()
    assert slot not in runtime.networking.layout.leftover_slots()
    assert addresses.host_if not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert runtime.networking.proxy.policy(addresses.sandbox_ip) is None
