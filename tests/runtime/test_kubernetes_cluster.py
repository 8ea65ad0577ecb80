"""The kubernetes backend against a real cluster: pods made, locked down, reached through the
relay, watched, adopted and deleted.

Skipped unless KUBECONFIG names a cluster (kind, k3s, ...): no Kubernetes control plane can run
where hutch's CI runs. What the cluster needs (docs/kubernetes.md, "Testing on a laptop"):
- the hutch image (deploy/Dockerfile) loaded: HUTCH_TEST_K8S_IMAGE, default hutch:0.1.0;
- pod IPs reachable from this host (k3s: as is; kind: a route to the node's pod CIDR);
- a CNI that enforces NetworkPolicies for the egress test (k3s, Calico, Cilium, kindnet >= 0.24),
  else HUTCH_TEST_K8S_NO_NETPOL=1 skips that test;
- optionally HUTCH_TEST_K8S_RUNTIME_CLASS (e.g. gvisor) to run the pods under it.
Each test module run makes a throwaway namespace (Pod Security `restricted` enforced, so the API
server's admission checks every pod) and deletes it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from hutch.runtime.base import Instance, InstanceSpec, InstanceState, Resources
from hutch.runtime.channel import AgentChannel
from hutch.storage.local import DirectoryStore

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"),
    reason="needs a real Kubernetes cluster: set KUBECONFIG (kind or k3s; see docs/kubernetes.md)",
)

IMAGE = os.environ.get("HUTCH_TEST_K8S_IMAGE", "hutch:0.1.0")
RUNTIME_CLASS = os.environ.get("HUTCH_TEST_K8S_RUNTIME_CLASS", "")
# The test host is not a hutch node pod: let it reach the agents (in a throwaway namespace only).
INGRESS_CIDR = os.environ.get("HUTCH_TEST_K8S_INGRESS_CIDR", "0.0.0.0/0")


@pytest.fixture(scope="module")
def namespace():
    from lightkube import Client
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    client = Client()
    name = f"hutch-test-{uuid.uuid4().hex[:8]}"
    labels = {"pod-security.kubernetes.io/enforce": "restricted", "app.kubernetes.io/name": "hutch-test"}
    client.create(Namespace(metadata=ObjectMeta(name=name, labels=labels)))
    yield name
    client.delete(Namespace, name)


@pytest.fixture
def data_dir():
    path = Path(tempfile.mkdtemp(prefix="hk-", dir="/tmp"))  # short: relay sockets live below
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_runtime(data_dir: Path, namespace: str):
    from hutch.runtime.kubernetes.runtime import KubernetesRuntime

    return KubernetesRuntime(
        data_dir,
        DirectoryStore(data_dir / "workspaces"),
        namespace=namespace,
        image=IMAGE,
        image_pull_policy="IfNotPresent",
        runtime_class=RUNTIME_CLASS,
        control_namespace=namespace,
        start_timeout=180,
        manage_network_policy=True,
        ingress_cidrs=[INGRESS_CIDR],
    )


def spec(**resources) -> InstanceSpec:
    return InstanceSpec(
        instance_id=f"i-{uuid.uuid4().hex[:16]}",
        backend="kubernetes",
        resources=Resources(**{"memory_mb": 256, "cpu": 0.5, **resources}),
        env={"MODE": "cluster-test"},
    )


async def sh(instance: Instance, command: str) -> tuple[int, str]:
    async with AgentChannel(instance.socket_path) as agent:
        result = await agent.run(command, timeout=60)
    return result.exit_code, (result.stdout + result.stderr).decode(errors="replace").strip()


async def get_pod(runtime, instance: Instance) -> dict | None:
    from lightkube.core.exceptions import ApiError
    from lightkube.resources.core_v1 import Pod

    try:
        pod = await runtime._client.get(Pod, instance.detail["pod"], namespace=runtime.settings.namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            return None
        raise
    return pod.to_dict()


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.5)


def test_an_instance_is_a_locked_down_pod_reached_through_the_relay(data_dir, namespace):
    async def scenario() -> None:
        runtime = make_runtime(data_dir, namespace)
        instance = await runtime.start(spec(max_lifetime_s=600))
        try:
            assert instance.state == InstanceState.RUNNING and runtime.is_running(instance.instance_id)
            assert await sh(instance, "id -u; id -g") == (0, "1000\n1000")
            assert await sh(instance, "echo $MODE; pwd") == (0, "cluster-test\n/home/user")
            code, caps = await sh(instance, "grep CapEff /proc/self/status")
            assert code == 0 and caps.split()[-1] == "0000000000000000"
            assert (await sh(instance, "touch /usr/hutch-test"))[0] != 0  # read-only root
            assert (await sh(instance, "echo x > ~/w && echo y > /tmp/t && cat ~/w /tmp/t"))[1] == "x\ny"
            assert (await sh(instance, "ls /var/run/secrets/kubernetes.io"))[0] != 0  # no token
            assert (await sh(instance, "env | grep -c KUBERNETES_ || true"))[1] == "0"
            pod = await get_pod(runtime, instance)
            assert pod is not None
            assert pod["status"]["qosClass"] == "Guaranteed"
            assert pod["spec"]["automountServiceAccountToken"] is False
            if RUNTIME_CLASS:
                assert pod["spec"]["runtimeClassName"] == RUNTIME_CLASS
            stats = await runtime.stats(instance.instance_id)
            if "cgroup" in instance.detail:  # the pod runs on this host (k3s): its cgroup is read
                assert stats.memory_bytes > 0 and stats.pids >= 1
        finally:
            await runtime.stop(instance.instance_id)
        assert not instance.socket_path.exists()

        async def gone() -> bool:
            pod = await get_pod(runtime, instance)
            return pod is None or bool(pod["metadata"].get("deletionTimestamp"))

        await wait_for(gone, 30, "the pod is deleted at stop")
        await runtime.close()

    asyncio.run(scenario())


@pytest.mark.skipif(
    bool(os.environ.get("HUTCH_TEST_K8S_NO_NETPOL")), reason="the cluster's CNI ignores NetworkPolicies"
)
def test_an_instance_cannot_open_any_connection(data_dir, namespace):
    async def scenario() -> None:
        runtime = make_runtime(data_dir, namespace)
        instance = await runtime.start(spec())
        try:
            probe = (
                "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 443), timeout=3)\" "
                "&& echo CONNECTED || echo refused"
            )
            assert (await sh(instance, probe))[1].endswith("refused")
            code, _ = await sh(instance, "getent hosts kubernetes.default.svc.cluster.local")
            assert code != 0  # no DNS either
        finally:
            await runtime.stop(instance.instance_id)
            await runtime.close()

    asyncio.run(scenario())


def test_a_pod_deleted_from_outside_is_reported_as_a_crash(data_dir, namespace):
    async def scenario() -> None:
        from lightkube.resources.core_v1 import Pod

        runtime = make_runtime(data_dir, namespace)
        died: list[str] = []
        runtime.on_exit = lambda instance: died.append(instance.instance_id)
        instance = await runtime.start(spec())
        try:
            await runtime._client.delete(Pod, instance.detail["pod"], namespace=namespace, grace_period=0)

            async def reported() -> bool:
                return died == [instance.instance_id]

            await wait_for(reported, 30, "on_exit for a deleted pod")
            assert instance.state == InstanceState.CRASHED and not runtime.is_running(instance.instance_id)
        finally:
            await runtime.stop(instance.instance_id)
            await runtime.close()

    asyncio.run(scenario())


def test_the_wall_clock_cap_ends_the_instance(data_dir, namespace):
    async def scenario() -> None:
        runtime = make_runtime(data_dir, namespace)
        died: list[str] = []
        runtime.on_exit = lambda instance: died.append(instance.instance_id)
        instance = await runtime.start(spec(max_lifetime_s=5))
        try:

            async def reported() -> bool:
                return bool(died)

            await wait_for(reported, 60, "on_exit once activeDeadlineSeconds passed")
        finally:
            await runtime.stop(instance.instance_id)
            await runtime.close()

    asyncio.run(scenario())


def test_kill_deletes_the_pod_and_reports_the_crash(data_dir, namespace):
    async def scenario() -> None:
        runtime = make_runtime(data_dir, namespace)
        died: list[str] = []
        runtime.on_exit = lambda instance: died.append(instance.instance_id)
        instance = await runtime.start(spec())
        try:
            await runtime.kill(instance.instance_id)
            assert died == [instance.instance_id] and instance.state == InstanceState.CRASHED
            assert runtime.has(instance.instance_id)  # its records stay until stop
        finally:
            await runtime.stop(instance.instance_id)
            await runtime.close()
        assert died == [instance.instance_id]  # once, not again when the watch sees the deletion

    asyncio.run(scenario())


def test_a_restarted_hutch_adopts_its_running_pods_and_deletes_unrecorded_ones(data_dir, namespace):
    async def scenario() -> None:
        first = make_runtime(data_dir, namespace)
        kept = await first.start(spec())
        orphan = await first.start(spec())
        await sh(kept, "echo remembered > ~/note")
        await first.close()  # hutch stops: pods keep running, relays go
        assert not kept.socket_path.exists()
        shutil.rmtree(data_dir / "instances" / orphan.instance_id)  # as if it crashed before recording

        second = make_runtime(data_dir, namespace)
        try:
            adopted = await second.adopt_running()
            assert [i.instance_id for i in adopted] == [kept.instance_id]
            again = second.get(kept.instance_id)
            assert again.state == InstanceState.RUNNING
            assert await sh(again, "cat ~/note") == (0, "remembered")

            async def orphan_gone() -> bool:
                pod = await get_pod(second, orphan)
                return pod is None or bool(pod["metadata"].get("deletionTimestamp"))

            await wait_for(orphan_gone, 30, "the unrecorded pod is deleted")
        finally:
            with contextlib.suppress(Exception):
                await second.stop(kept.instance_id)
            await second.close()

    asyncio.run(scenario())
