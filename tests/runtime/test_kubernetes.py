"""The kubernetes backend without a cluster: the pod and NetworkPolicy it asks for (pure data), how
it reads pods, the pods' cgroups, the relay from a Unix socket to a real agent on TCP, and how it
is selected or refused. Nothing here talks to an API server; `test_kubernetes_cluster.py` does,
against a real cluster (KUBECONFIG)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from hutch.agent.config import AgentConfig
from hutch.agent.main import _parse_args, decode_config
from hutch.config import KubernetesConfig
from hutch.errors import BackendUnavailable, CapacityError, IsolationError, Unimplemented
from hutch.functions import FunctionSpec
from hutch.runtime import BACKENDS, make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState, Resources
from hutch.runtime.channel import AgentChannel
from hutch.runtime.kubernetes.pods import (
    LABEL_INSTANCE,
    LABEL_OWNER,
    NODE_LABELS,
    PodSettings,
    build_network_policy,
    build_pod,
    find_pod_cgroup,
    label_value,
    pod_address,
    pod_dead,
    pod_name,
)
from hutch.runtime.kubernetes.relay import Relay
from hutch.runtime.kubernetes.runtime import KubernetesRuntime
from hutch.runtime.local import LocalRuntime
from hutch.storage.local import DirectoryStore

ROOT = Path(__file__).resolve().parents[2]
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def spec(instance_id: str = "i-0123456789abcdef", **resources) -> InstanceSpec:
    return InstanceSpec(
        instance_id=instance_id, backend="kubernetes", resources=Resources(**resources), env={"MODE": "dev"}
    )


def container(pod: dict) -> dict:
    (only,) = pod["spec"]["containers"]
    return only


def volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["spec"]["volumes"] if v["name"] == name)


def boot_config(pod: dict) -> AgentConfig:
    """What the pod's agent will boot with: its HUTCH_AGENT and arguments, through the agent's
    own parsing."""
    env = {e["name"]: e["value"] for e in container(pod)["env"]}
    return AgentConfig(_parse_args(container(pod)["args"], decode_config(env["HUTCH_AGENT"])))


# -- the pod ---------------------------------------------------------------------------------------


def test_the_pod_runs_as_the_sandbox_user_with_nothing_to_escalate_to():
    pod = build_pod(spec(), PodSettings(), "node-1")
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == pod_security["runAsGroup"] == pod_security["fsGroup"] == 1000
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container(pod)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert "add" not in security["capabilities"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_pod_has_no_token_no_service_links_and_nothing_of_the_host():
    pod = build_pod(spec(), PodSettings(), "node-1")
    pod_spec = pod["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod_spec  # the namespace's default, and no token of it
    assert pod_spec["enableServiceLinks"] is False  # no *_SERVICE_HOST variables naming the cluster
    assert pod_spec["hostNetwork"] is False and pod_spec["hostPID"] is False and pod_spec["hostIPC"] is False
    assert pod_spec["shareProcessNamespace"] is False
    assert pod_spec["restartPolicy"] == "Never"
    assert pod_spec["dnsPolicy"] == "None" and pod_spec["dnsConfig"] == {"nameservers": ["127.0.0.1"]}
    assert all("hostPath" not in v for v in pod_spec["volumes"])
    assert all("hostPort" not in p for p in container(pod)["ports"])
    names = {e["name"] for e in container(pod)["env"]}
    assert names == {"HUTCH_AGENT"}  # no credential of any kind


def test_the_pod_meets_the_restricted_pod_security_standard():
    """The checks of Kubernetes' `restricted` profile (what namespace.yaml enforces on the
    sandbox namespace), for every option that changes the pod."""
    settings = [
        PodSettings(),
        PodSettings(runtime_class="gvisor", node_name="n1", user_namespace=True),
        PodSettings(workspace_claim="hutch-workspaces"),
    ]
    for setting in settings:
        subpath = "workspaces/t/abc" if setting.workspace_claim else None
        pod = build_pod(spec(max_lifetime_s=30), setting, "node-1", subpath)
        assert_restricted(pod)


def assert_restricted(pod: dict) -> None:
    pod_spec = pod["spec"]
    allowed_volumes = {
        *("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret")
    }
    for v in pod_spec["volumes"]:
        assert set(v) - {"name"} <= allowed_volumes, v
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert set(security["capabilities"]["drop"]) == {"ALL"}
        assert set(security["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert security.get("runAsUser", pod_spec["securityContext"].get("runAsUser")) != 0
        assert security.get("privileged", False) is False
        assert all("hostPort" not in p for p in c.get("ports", []))
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert pod_spec.get(key, False) is False


def test_resources_become_equal_requests_and_limits():
    pod = build_pod(spec(cpu=0.5, memory_mb=384, disk_mb=2048, tmp_mb=32), PodSettings(), "node-1")
    resources = container(pod)["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: never evicted first
    assert resources["limits"] == {"cpu": "500m", "memory": "384Mi", "ephemeral-storage": "2048Mi"}
    assert volume(pod, "home") == {"name": "home", "emptyDir": {"sizeLimit": "2048Mi"}}
    # /tmp is a tmpfs counted in the memory limit, as under bwrap.
    assert volume(pod, "tmp") == {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}}
    mounts = {m["mountPath"]: m["name"] for m in container(pod)["volumeMounts"]}
    assert mounts == {"/home/user": "home", "/tmp": "tmp"}
    assert build_pod(spec(cpu=2), PodSettings(), "n")["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "2000m"
    assert container(build_pod(spec(cpu=0.0001), PodSettings(), "n"))["resources"]["limits"]["cpu"] == "1m"


def test_an_unlimited_workspace_is_an_emptydir_without_a_size():
    pod = build_pod(spec(disk_mb=0), PodSettings(), "node-1")
    assert volume(pod, "home") == {"name": "home", "emptyDir": {}}
    assert "ephemeral-storage" not in container(pod)["resources"]["limits"]


def test_a_shared_workspace_is_the_claim_at_the_workspace_path():
    settings = PodSettings(workspace_claim="hutch-workspaces")
    pod = build_pod(spec(disk_mb=2048), settings, "node-1", "workspaces/t-1/abc")
    assert volume(pod, "home") == {"name": "home", "persistentVolumeClaim": {"claimName": "hutch-workspaces"}}
    home = next(m for m in container(pod)["volumeMounts"] if m["name"] == "home")
    assert home == {"name": "home", "mountPath": "/home/user", "subPath": "workspaces/t-1/abc"}
    assert "ephemeral-storage" not in container(pod)["resources"]["limits"]  # not on the node's disk
    with pytest.raises(IsolationError, match="workspace_claim"):
        build_pod(spec(), PodSettings(), "node-1", "workspaces/t-1/abc")


def test_labels_name_the_instance_and_its_node():
    pod = build_pod(spec("i-00ff"), PodSettings(), "node-1")
    labels = pod["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "hutch",
        "app.kubernetes.io/component": "sandbox",
        "app.kubernetes.io/managed-by": "hutch",
        LABEL_INSTANCE: "i-00ff",
        LABEL_OWNER: "node-1",
    }
    assert pod["metadata"]["name"] == "hutch-i-00ff"
    assert pod["metadata"]["namespace"] == "hutch-sandboxes"


@pytest.mark.parametrize("instance_id", ["i-0123456789abcdef", "I_Upper.Case", "x" * 200, "--weird--"])
def test_pod_names_and_label_values_are_always_valid(instance_id):
    name = pod_name(instance_id)
    assert DNS_1123.match(name) and len(name) <= 63, name
    value = label_value(instance_id)
    assert re.match(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$", value), value
    assert pod_name(instance_id) == name and label_value(instance_id) == value  # stable: adoption finds it
    assert pod_name(instance_id + "y") != name


def test_long_node_names_make_distinct_label_values():
    a = "ip-10-0-1-23.eu-west-1.compute.internal.very-long-suffix-of-a-cloud-provider.example"
    b = a.replace("23", "24")
    assert len(label_value(a)) <= 63 and label_value(a) != label_value(b)


def test_runtime_class_node_and_user_namespace_are_set_only_when_asked():
    plain = build_pod(spec(), PodSettings(), "node-1")["spec"]
    for key in ("runtimeClassName", "nodeName", "hostUsers", "activeDeadlineSeconds"):
        assert key not in plain
    settings = PodSettings(runtime_class="kata", node_name="worker-3", user_namespace=True)
    asked = build_pod(spec(max_lifetime_s=90.2), settings, "worker-3")["spec"]
    assert asked["runtimeClassName"] == "kata"
    assert asked["nodeName"] == "worker-3"
    assert asked["hostUsers"] is False
    assert asked["activeDeadlineSeconds"] == 91  # the wall-clock cap, never shorter


def test_the_agent_boots_on_tcp_with_the_instance_environment_and_limits():
    pod = build_pod(spec(pids=100, nofile=2048), PodSettings(agent_port=40000), "node-1")
    c = container(pod)
    assert c["command"] == ["/opt/hutch/bin/python", "-I", "-m", "hutch.agent"]
    assert c["image"] == "hutch:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["workingDir"] == "/home/user"
    config = boot_config(pod)
    assert config.listen == "0.0.0.0:40000"
    assert config.home == "/home/user" and config.user == "user"
    assert config.env["MODE"] == "dev"
    assert config.env["PATH"].split(":")[0] == "/opt/hutch/bin"  # hutch's Python first, as under bwrap
    assert config.rlimits == {"nofile": [2048, 2048], "core": [0, 0]}
    # No kernel or uid range of its own: RLIMIT_NPROC would count every pod's uid 1000 on the node.
    assert "nproc" not in config.rlimits
    for settings in (PodSettings(runtime_class="gvisor"), PodSettings(user_namespace=True)):
        assert boot_config(build_pod(spec(pids=100), settings, "n")).rlimits["nproc"] == [100, 100]


def test_the_probe_and_port_name_the_agent():
    pod = build_pod(spec(), PodSettings(agent_port=41000), "node-1")
    c = container(pod)
    assert c["ports"] == [{"name": "agent", "containerPort": 41000, "protocol": "TCP"}]
    probe = c["readinessProbe"]
    assert probe["httpGet"] == {"path": "/health", "port": "agent"}
    assert "livenessProbe" not in c  # a restarted agent would be a different sandbox
    assert pod["spec"]["terminationGracePeriodSeconds"] == 0


def test_the_pod_survives_the_clients_model_unchanged():
    """lightkube drops fields its Kubernetes model does not know: a misspelt key would vanish
    silently on the way to the API server."""
    from lightkube import codecs

    settings = PodSettings(runtime_class="gvisor", node_name="n", user_namespace=True, workspace_claim="c")
    for pod in (
        build_pod(spec(max_lifetime_s=5), PodSettings(), "n"),
        build_pod(spec(disk_mb=0), settings, "n", "workspaces/a"),
    ):
        assert codecs.from_dict(pod).to_dict() == pod
    policy = build_network_policy(PodSettings(ingress_cidrs=("10.0.0.0/8",)))
    assert codecs.from_dict(policy).to_dict() == policy


# -- the NetworkPolicy -----------------------------------------------------------------------------


def test_the_network_policy_denies_all_egress_and_admits_only_hutch_nodes():
    settings = PodSettings(agent_port=49983, control_namespace="hutch-system")
    policy = build_network_policy(settings)
    spec_ = policy["spec"]
    assert policy["metadata"]["namespace"] == "hutch-sandboxes"
    assert set(spec_["policyTypes"]) == {"Ingress", "Egress"}
    assert spec_["egress"] == []  # Egress listed with no rule: nothing may leave, DNS included
    (rule,) = spec_["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 49983}]
    (source,) = rule["from"]
    assert source["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "hutch-system"}}
    assert source["podSelector"] == {"matchLabels": NODE_LABELS}
    # It selects every sandbox pod.
    pod_labels = build_pod(spec(), settings, "node-1")["metadata"]["labels"]
    assert spec_["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_extra_ingress_sources_are_ip_blocks():
    policy = build_network_policy(PodSettings(ingress_cidrs=("192.168.5.0/24",)))
    sources = policy["spec"]["ingress"][0]["from"]
    assert sources[1:] == [{"ipBlock": {"cidr": "192.168.5.0/24"}}]


# -- reading pods ----------------------------------------------------------------------------------


def pod_status(phase: str, agent_state: dict | None = None, **status) -> dict:
    statuses = [{"name": "agent", "state": agent_state or {}, "restartCount": status.pop("restarts", 0)}]
    return {"metadata": {"name": "p"}, "status": {"phase": phase, "containerStatuses": statuses, **status}}


def test_a_pod_is_ready_for_the_relay_once_its_agent_runs_and_it_has_an_address():
    assert pod_address({"metadata": {}, "status": {"phase": "Pending"}}) is None
    assert pod_address(pod_status("Pending", {"waiting": {"reason": "ContainerCreating"}})) is None
    assert pod_address(pod_status("Running", {"running": {}})) is None  # no IP yet
    assert pod_address(pod_status("Running", {"running": {}}, podIP="10.1.2.3")) == "10.1.2.3"
    assert pod_dead(pod_status("Running", {"running": {}}, podIP="10.1.2.3")) is None


def test_a_pod_that_cannot_start_fails_fast_with_its_reason():
    with pytest.raises(IsolationError, match="ImagePullBackOff"):
        pod_address(pod_status("Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}))
    with pytest.raises(IsolationError, match="CreateContainerConfigError"):
        pod_address(pod_status("Pending", {"waiting": {"reason": "CreateContainerConfigError"}}))
    refused = {"phase": "Failed", "reason": "OutOfmemory", "message": "Node didn't have enough memory"}
    with pytest.raises(CapacityError, match="OutOfmemory"):
        pod_address({"metadata": {}, "status": refused})
    with pytest.raises(IsolationError, match="failed"):
        pod_address(pod_status("Failed", {"terminated": {"exitCode": 1}}))


def test_a_dead_pod_says_why():
    assert "DeadlineExceeded" in pod_dead({"status": {"phase": "Failed", "reason": "DeadlineExceeded"}})
    assert pod_dead(pod_status("Succeeded")).startswith("pod succeeded")
    assert "OOMKilled" in pod_dead(pod_status("Running", {"terminated": {"reason": "OOMKilled", "exitCode": 137}}))
    assert pod_dead(pod_status("Running", {"running": {}}, restarts=1)) == "agent restarted"
    deleting = pod_status("Running", {"running": {}}, podIP="10.0.0.9")
    deleting["metadata"]["deletionTimestamp"] = "2026-11-25T10:00:00Z"
    assert pod_dead(deleting) == "pod is being deleted"


# -- the pods' cgroups ----------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


UID = "3f2a8c1e-1111-4a2b-9c3d-0123456789ab"


def test_the_pod_cgroup_is_found_under_the_systemd_driver_and_read(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    (tmp_path / "system.slice" / "pod-lookalike").mkdir(parents=True)  # never entered
    pod = tmp_path / "kubelet.slice" / "kubelet-kubepods.slice" / "kubelet-kubepods-burstable.slice"
    pod = pod / f"kubelet-kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    write(pod / "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\n")
    write(pod / "memory.current", "1048576\n")
    write(pod / "memory.peak", "4194304\n")
    write(pod / "pids.current", "7\n")
    cgroup = find_pod_cgroup(tmp_path, UID)
    assert cgroup is not None and cgroup.version == 2 and cgroup.dirs["unified"] == pod
    assert cgroup.stats() == (2.5, 1048576, 4194304, 7)


def test_the_pod_cgroup_is_found_under_the_cgroupfs_driver_on_v1(tmp_path):
    for controller in ("memory", "cpu,cpuacct", "pids"):
        (tmp_path / controller / "kubepods" / "besteffort" / f"pod{UID}").mkdir(parents=True)
    cgroup = find_pod_cgroup(tmp_path, UID)
    assert cgroup is not None and cgroup.version == 1
    assert cgroup.dirs["cpuacct"] == tmp_path / "cpu,cpuacct" / "kubepods" / "besteffort" / f"pod{UID}"
    assert cgroup.dirs["pids"] == tmp_path / "pids" / "kubepods" / "besteffort" / f"pod{UID}"


def test_a_pod_of_another_node_has_no_cgroup_here(tmp_path):
    write(tmp_path / "cgroup.controllers", "cpu memory pids\n")
    (tmp_path / "kubepods.slice" / "kubepods-pod_other.slice").mkdir(parents=True)
    assert find_pod_cgroup(tmp_path, UID) is None
    assert find_pod_cgroup(tmp_path / "missing", UID) is None


# -- the relay -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def tcp_agent(tmp_path):
    """A real hutch agent listening on TCP, as in a pod (outside any sandbox)."""
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hutch.agent", "--listen", f"127.0.0.1:{port}", "--home", str(home)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("agent did not listen") from None
            time.sleep(0.01)
    yield port, home
    proc.kill()
    proc.wait(5)


def test_the_relay_carries_the_agent_protocols_both_ways(tmp_path, tcp_agent):
    port, home = tcp_agent

    async def scenario() -> None:
        relay = Relay(tmp_path / "run" / "agent.sock", "127.0.0.1", port)
        relay.path.parent.mkdir(mode=0o700)
        await relay.start()
        assert relay.path.is_socket() and (relay.path.stat().st_mode & 0o777) == 0o600
        async with AgentChannel(relay.path) as agent:
            await agent.wait_healthy(10)
            result = await agent.run("echo hi from $(whoami); echo oops >&2; exit 3")
            assert result.exit_code == 3 and result.stdout.strip().startswith(b"hi from")
            assert result.stderr == b"oops\n"
            data = os.urandom(2 * 1024 * 1024)  # larger than any buffer on the way
            target = {"path": f"{home}/big"}
            put = await agent.http.post(
                "/files", params=target, content=data, headers={"content-type": "application/octet-stream"}
            )
            assert put.status_code == 200
            got = await agent.http.get("/files", params=target, headers={"accept-encoding": "identity"})
            assert got.content == data
            # Keep-alive: many requests on one pooled connection.
            for _ in range(50):
                assert await agent.health()
        await relay.close()
        assert not relay.path.exists()

    asyncio.run(scenario())


def test_the_relay_passes_half_closes_on(tmp_path):
    """A client that shuts its side after the request still gets the whole answer."""

    async def scenario() -> None:
        async def count_until_eof(reader, writer):
            total = 0
            while chunk := await reader.read(65536):
                total += len(chunk)
            writer.write(f"{total}\n".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(count_until_eof, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        relay = Relay(tmp_path / "relay.sock", "127.0.0.1", port)
        await relay.start()
        reader, writer = await asyncio.open_unix_connection(str(relay.path))
        writer.write(b"x" * 1_000_000)
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"1000000\n"
        writer.close()
        await relay.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_a_relay_to_an_unreachable_agent_closes_connections_at_once(tmp_path):
    async def scenario() -> None:
        relay = Relay(tmp_path / "relay.sock", "127.0.0.1", free_port())  # nobody listens there
        await relay.start()
        async with AgentChannel(relay.path) as agent:
            started = time.monotonic()
            assert await agent.health() is False
            assert time.monotonic() - started < 2
        await relay.close()

    asyncio.run(scenario())


def test_a_shut_relay_takes_no_more_connections(tmp_path):
    """What a crash does to the relay: the dead pod's IP may soon be another pod's."""

    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        relay = Relay(tmp_path / "relay.sock", "127.0.0.1", server.sockets[0].getsockname()[1])
        await relay.start()
        relay.shut()
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(str(relay.path))
        await relay.close()  # later, at stop: harmless
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_closing_the_relay_drops_open_connections(tmp_path):
    async def scenario() -> None:
        hold = asyncio.Event()

        async def silent(reader, writer):
            await hold.wait()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        relay = Relay(tmp_path / "relay.sock", "127.0.0.1", server.sockets[0].getsockname()[1])
        await relay.start()
        reader, writer = await asyncio.open_unix_connection(str(relay.path))
        writer.write(b"GET /health HTTP/1.1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        await relay.close()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, not hanging
        writer.close()
        hold.set()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


# -- selection, configuration, records -------------------------------------------------------------


def kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig naming a cluster nobody serves: the runtime is made, nothing is called."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "unit",
                "clusters": [{"name": "unit", "cluster": {"server": "https://127.0.0.1:9"}}],
                "contexts": [{"name": "unit", "context": {"cluster": "unit", "user": "unit"}}],
                "users": [{"name": "unit", "user": {"token": "unused"}}],
            }
        )
    )
    return path


def test_functions_can_name_the_kubernetes_backend_but_not_with_a_network():
    assert "kubernetes" in BACKENDS
    assert FunctionSpec(name="pods", runtime="kubernetes").runtime == "kubernetes"
    with pytest.raises(ValidationError, match="needs the bwrap runtime"):
        FunctionSpec(name="pods", runtime="kubernetes", network={"allowInternetAccess": True})


def test_without_a_cluster_the_backend_is_unavailable_and_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    if Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        pytest.skip("this test runs in a pod with a service account")
    store = DirectoryStore(tmp_path / "workspaces")
    with pytest.raises(BackendUnavailable, match=r"no Kubernetes cluster configured.*KUBECONFIG"):
        make_runtime("kubernetes", tmp_path, store)
    with pytest.raises(BackendUnavailable, match="Context 'nope' not found"):
        make_runtime("kubernetes", tmp_path, store, kubeconfig=str(kubeconfig(tmp_path)), context="nope")


def test_without_the_client_library_the_backend_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightkube", None)  # as if not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'hutch\[kubernetes\]'"):
        make_runtime("kubernetes", tmp_path, DirectoryStore(tmp_path / "workspaces"))


def test_the_config_table_and_the_runtime_take_the_same_options():
    """`[kubernetes]` in the config is handed to the runtime as keyword arguments."""
    parameters = inspect.signature(KubernetesRuntime.__init__).parameters
    keyword_only = {
        name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY and name != "networking"
    }
    config = KubernetesConfig().model_dump()
    assert set(config) == set(keyword_only)
    for name, default in keyword_only.items():
        assert config[name] == (list(default) if isinstance(default, tuple) else default), name
    pod_defaults = {f.name: f.default for f in dataclasses.fields(PodSettings)}
    for name, default in pod_defaults.items():
        assert config[name] == (list(default) if isinstance(default, tuple) else default), name


def test_a_started_instance_is_recorded_where_every_backend_can_read_it(tmp_path):
    """Records are written before the pod exists, in `hutch.runtime.local`'s format: the local
    backends' adoption skips them (instead of deleting an unreadable one), and `MultiRuntime`
    learns from them that the kubernetes backend has instances to adopt."""
    root = tmp_path / "shared"
    store = DirectoryStore(root)
    runtime = KubernetesRuntime(
        tmp_path / "data", store, kubeconfig=str(kubeconfig(tmp_path)), node_name="worker-1",
        workspace_claim="hutch-workspaces", workspace_root=str(root),
    )  # fmt: skip
    assert runtime.owner == "worker-1"
    instance = runtime._prepare(spec("i-rec", disk_mb=0))
    record = tmp_path / "data" / "instances" / "i-rec" / "instance.json"
    loaded = LocalRuntime._load(record)
    assert loaded.backend == "kubernetes" and loaded.state == InstanceState.STARTING
    assert loaded.workspace == "_instances/i-rec" and loaded.spec == instance.spec
    assert loaded.socket_path == tmp_path / "data" / "instances" / "i-rec" / "run" / "agent.sock"
    assert (loaded.socket_path.parent.stat().st_mode & 0o777) == 0o700
    assert loaded.detail["subpath"] == "_instances/i-rec"  # the claim's subPath of the workspace
    assert loaded.workspace_path == root / "_instances" / "i-rec"
    if os.geteuid() == 0:
        assert loaded.workspace_path.stat().st_uid == 1000  # the pod's user
    runtime._cleanup(instance, keep_workspace=False)
    assert not record.parent.exists() and not store.exists("_instances/i-rec")


def test_a_workspace_outside_the_claim_is_refused(tmp_path):
    runtime = KubernetesRuntime(
        tmp_path / "data", DirectoryStore(tmp_path / "elsewhere"), kubeconfig=str(kubeconfig(tmp_path)),
        workspace_claim="hutch-workspaces", workspace_root=str(tmp_path / "shared"),
    )  # fmt: skip
    with pytest.raises(IsolationError, match="outside workspace_root"):
        runtime._prepare(spec("i-out"))
    assert not (tmp_path / "data" / "instances" / "i-out").exists()
    assert not DirectoryStore(tmp_path / "elsewhere").exists("_instances/i-out")


def test_kubernetes_instances_take_no_network_policy(tmp_path):
    runtime = KubernetesRuntime(tmp_path, DirectoryStore(tmp_path / "w"), kubeconfig=str(kubeconfig(tmp_path)))
    networked = dataclasses.replace(spec(), network={"internet": True, "allow": [], "deny": []})
    with pytest.raises(Unimplemented):
        asyncio.run(runtime.start(networked))
    with pytest.raises(Unimplemented):
        asyncio.run(runtime.set_network("i-any", {"internet": False, "allow": [], "deny": []}))
    assert runtime.disk_room() is True and runtime.broken("i-unknown") is None
    with pytest.raises(IsolationError, match="cannot start a bwrap instance"):
        asyncio.run(runtime.start(dataclasses.replace(spec(), backend="bwrap")))


def test_the_backend_implements_the_whole_runtime_contract():
    from hutch.runtime.base import Runtime

    for name, member in vars(Runtime).items():
        if name.startswith("_") or not callable(member):
            continue
        implemented = getattr(KubernetesRuntime, name, None)
        assert implemented is not None, f"KubernetesRuntime.{name} is missing"
        expected = [p for p in inspect.signature(member).parameters]
        got = [p for p in inspect.signature(implemented).parameters][: len(expected)]
        assert got == expected, name
        assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(member), name
