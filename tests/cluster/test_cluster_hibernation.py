"""Hibernation across a cluster's nodes: a session hibernated on a node that dies resumes on
another, with its memory, from the image it left beside its files on the shared store.

Template instances mount their files idmapped, which JuiceFS's FUSE mount does not allow, so
this cluster's nodes share an operator's mount instead (as an NFS or CephFS export would be): a
directory of this host's disk that every node is configured with. Otherwise the cluster is
tests/cluster/harness.py's: nodes in network namespaces of their own, PostgreSQL as MetaDB,
two gateways.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.cluster.harness import Cluster
from tests.cluster.test_cluster import _session, _until
from tests.e2e.test_templates import sleepy_counter

pytestmark = [pytest.mark.slow, pytest.mark.sandbox]


@pytest.fixture(scope="module")
def cluster(template_store):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    share = Path(tempfile.mkdtemp(prefix="hutch-share-", dir="/var/tmp"))
    share.chmod(0o755)
    mount = SimpleNamespace(mount_point=share)
    made = Cluster(SimpleNamespace(a=mount, b=mount), nodes=2, templates=template_store.root)
    try:
        made.start()
        yield made
    finally:
        made.stop()
        shutil.rmtree(share, ignore_errors=True)


@pytest.fixture
def gateways(cluster):
    made = cluster.gateways[0].client().post("/v1/tenants", json={"name": f"sleepers-{uuid.uuid4().hex[:6]}"})
    assert made.status_code == 201, made.text
    return [gateway.client(made.json()["apiKey"]) for gateway in cluster.gateways]


def test_a_session_hibernated_on_a_killed_node_wakes_on_another_with_its_memory(cluster, gateways):
    """A template function's idle session hibernates, its image on the shared volume beside its
    files; its node is killed; the next request, through the other gateway, finds it restored on
    the other node with its user server's memory: the count goes
    on and the epoch is unchanged. The killed node comes back harmless."""
    name = f"napper-{uuid.uuid4().hex[:6]}"
    made = gateways[0].post("/v1/functions", json=sleepy_counter(name))
    assert made.status_code == 201, made.text
    key, invoke = "napper", f"/functions/{name}/invoke/"
    headers = {"x-fc-session-id": key}
    first = int(gateways[0].get(invoke, headers=headers).text)
    before = _session(gateways[0], key, name)
    node = cluster.node(before["nodeId"])
    record = node.data_dir / "instances" / before["containerId"] / "instance.json"
    if not json.loads(record.read_text())["detail"].get("hibernatable"):
        gateways[0].delete(f"/v1/functions/{name}/sessions/{key}")
        pytest.skip("this host cannot hibernate sandboxes (no usable CRIU: scripts/install-criu.sh)")
    _until(lambda: _session(gateways[0], key, name)["state"] == "hibernated")
    node.kill(signal.SIGKILL)
    time.sleep(cluster.lease_seconds)

    assert gateways[1].get(invoke, headers=headers).text == str(first + 1), node.log.read_text()[-4000:]
    after = _session(gateways[1], key, name)
    assert after["nodeId"] != before["nodeId"] and after["epoch"] == before["epoch"]  # nothing was lost
    assert after["state"] == "running"
    workspaces = cluster.volume.a.mount_point / cluster.shared_dir
    assert not any(path.name == before["containerId"] for path in workspaces.rglob("hibernation/*")), "taken"

    node.start()  # it stops the instance it had hibernated; the session lives on elsewhere
    _until(lambda: not record.exists())
    assert gateways[0].get(invoke, headers=headers).text == str(first + 2)
    assert gateways[0].delete(f"/v1/functions/{name}/sessions/{key}").status_code in (200, 204)
