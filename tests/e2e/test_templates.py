"""Templates through `hutch serve`: the official `e2b` SDK builds one (E2B's Template API) and
starts sandboxes from it; the native API lists, builds and deletes them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox, SandboxException, SandboxState, Template
from e2b.exceptions import BuildException, FileUploadException

from tests.conftest import TEST_TEMPLATE


@pytest.fixture(scope="module")
def template_server(template_store):
    """A `hutch serve` whose template store holds the test template."""
    from tests.e2e.conftest import Server, _cleanup

    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-tpl-", dir="/var/tmp"))
    root.chmod(0o755)
    server = Server(root / "data", f'[templates]\ndir = "{template_store.root}"\n')
    server.start()
    yield server
    _cleanup(server)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def e2b_tenant(template_server, monkeypatch):
    client = template_server.new_tenant(f"tpl-{uuid.uuid4().hex[:6]}")
    monkeypatch.setenv("E2B_API_URL", template_server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", template_server.url)
    monkeypatch.setenv("E2B_API_KEY", client.headers["X-API-Key"])
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    yield client
    for sandbox in client.get("/v2/sandboxes").json():
        client.delete(f"/sandboxes/{sandbox['sandboxID']}")


def test_the_sdk_builds_a_template_and_sandboxes_of_it_show_every_step(e2b_tenant, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the build context\n")
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template(TEST_TEMPLATE)
        .run_cmd("echo built-by-$(id -un) > /etc/built", user="root")
        .copy("hello.txt", "/home/user/app/", user="user")
        .set_envs({"GREETING": "hi from the template"})
        .set_workdir("/home/user/app")
        .set_start_cmd("touch /tmp/started && sleep infinity", "test -f /tmp/started")
    )
    logs: list[str] = []
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    info = Template.build(template, name, on_build_logs=lambda entry: logs.append(entry.message))
    assert info.template_id == name
    assert any("RUN" in line for line in logs) and any("is ready" in line for line in logs)
    assert Template.exists(name)

    box = Sandbox.create(name, timeout=120)
    result = box.commands.run(
        "cat /etc/built; pwd; cat hello.txt; echo $GREETING; id -un; test -f /tmp/started && echo up"
    )
    assert result.stdout.splitlines() == [
        "built-by-root", "/home/user/app", "hello from the build context", "hi from the template", "user", "up",
    ]  # fmt: skip
    assert box.commands.run("stat -c %U /home/user/app/hello.txt").stdout.strip() == "user"
    assert box.commands.run("id -u", user="root").stdout.strip() == "0"
    box.files.write("/etc/written-as-root", "root's", user="root")
    assert box.commands.run("stat -c %U /etc/written-as-root").stdout.strip() == "root"
    box.kill()

    # The same steps again: every layer is cached.
    again: list[str] = []
    Template.build(template, name, on_build_logs=lambda entry: again.append(entry.message))
    assert any(line.startswith("CACHED") for line in again)
    assert not any(line.startswith("[") and "RUN" in line for line in again)


def test_tags_name_builds_that_sandboxes_boot_after_newer_builds(e2b_tenant, template_server):
    name = f"tagged-{uuid.uuid4().hex[:8]}"

    def build(version: str, tags: list[str] | None = None, ref: str = name) -> str:
        template = Template().from_template(TEST_TEMPLATE).run_cmd(f"echo {version} > /etc/version", user="root")
        return Template.build(template, ref, tags=tags).build_id

    first = build("one", tags=["v1", "stable"])  # the bare name: the default tag too
    second = build("two")  # the default tag moves; v1 and stable stay
    build("three", ref=f"{name}:canary")  # a tag only: the default stays

    def version(ref: str) -> str:
        box = Sandbox.create(ref, timeout=60)
        try:
            return box.commands.run("cat /etc/version").stdout.strip()
        finally:
            box.kill()

    assert [version(ref) for ref in (name, f"{name}:v1", f"{name}:stable", f"{name}:canary")] == [
        "two", "one", "one", "three",
    ]  # fmt: skip
    tags = {tag.tag: tag.build_id for tag in Template.get_tags(name)}
    assert tags == {"default": second, "v1": first, "stable": first, "canary": tags["canary"]}

    assigned = Template.assign_tags(f"{name}:v1", ["production"])
    assert assigned.build_id == first and assigned.tags == ["production"]
    Template.remove_tags(name, ["stable", "canary"])
    assert sorted(tag.tag for tag in Template.get_tags(name)) == ["default", "production", "v1"]
    assert version(f"{name}:production") == "one"
    with pytest.raises(SandboxException, match="no tag 'stable'"):
        Sandbox.create(f"{name}:stable", timeout=30)
    # Another tenant cannot move this tenant's tags.
    other = template_server.new_tenant(f"other-{uuid.uuid4().hex[:6]}")
    assert other.post("/templates/tags", json={"target": name, "tags": ["x"]}).status_code == 403
    assert other.request("DELETE", "/templates/tags", json={"name": name, "tags": ["v1"]}).status_code == 403
    assert sorted(tag.tag for tag in Template.get_tags(name)) == ["default", "production", "v1"]


def test_a_failing_step_fails_the_build_with_its_exit_code_and_registers_nothing(e2b_tenant):
    name = f"broken-{uuid.uuid4().hex[:8]}"
    template = Template().from_template(TEST_TEMPLATE).run_cmd("echo about to fail; exit 3")
    with pytest.raises(BuildException, match="exit code 3"):
        Template.build(template, name)
    assert not Template.exists(name)


def test_building_from_an_unknown_template_or_a_bad_image_reference_fails_clearly(e2b_tenant):
    with pytest.raises(Exception, match="not found"):
        Template.build(Template().from_template("no-such-template").run_cmd("true"), f"x-{uuid.uuid4().hex[:6]}")
    with pytest.raises(BuildException, match="invalid image reference"):
        Template.build(Template().from_image("UPPER/case:!").run_cmd("true"), f"y-{uuid.uuid4().hex[:6]}")


def test_the_native_api_lists_templates_and_refuses_to_delete_one_in_use(template_server):
    admin = template_server.admin
    names = [t["name"] for t in admin.get("/v1/templates").json()["templates"]]
    assert names[0] == "host" and TEST_TEMPLATE in names
    made = admin.post(
        "/v1/functions",
        json={"name": f"fn-{uuid.uuid4().hex[:6]}", "template": TEST_TEMPLATE},
    )
    assert made.status_code == 201, made.text
    function = made.json()["name"]
    session = admin.post(f"/v1/functions/{function}/sessions", json={})
    assert session.status_code == 201, session.text
    refused = admin.delete(f"/v1/templates/{TEST_TEMPLATE}")
    assert refused.status_code == 400 and "in use" in refused.json()["message"]
    invoked = admin.post(
        f"/functions/{function}/invoke/process.Process/Start",
        headers={"x-fc-session-id": session.json()["sessionId"]},
    )
    assert invoked.status_code != 500
    assert admin.delete(f"/v1/functions/{function}/sessions/{session.json()['sessionId']}").status_code == 204
    bad = admin.post("/v1/templates", json={"name": "bad", "debian": {"packages": ["not a package!"]}})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
    assert admin.get("/v1/templates/none-such").status_code == 404
    assert httpx.get(f"{template_server.url}/v1/templates").status_code == 401


@pytest.fixture(scope="module")
def registry(template_store):
    """A local OCI registry (Debian's docker-registry) holding `test/mini:1`, an image made here
    from the test template's layer with umoci and pushed with skopeo: no public registry."""
    if not all(shutil.which(tool) for tool in ("docker-registry", "skopeo", "umoci")):
        pytest.skip("docker-registry, skopeo and umoci are needed (.ci/run installs them)")
    from tests.e2e.conftest import free_port

    root = Path(tempfile.mkdtemp(prefix="hutch-registry-", dir="/var/tmp"))
    port = free_port()
    (root / "config.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/storage\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    process = subprocess.Popen(
        ["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the local registry did not start"
            time.sleep(0.1)
        layer = template_store.rootfs(TEST_TEMPLATE).layer_paths[0]
        image = f"{root}/oci:mini"
        for argv in (
            ["umoci", "init", "--layout", f"{root}/oci"],
            ["umoci", "new", "--image", image],
            ["umoci", "insert", "--image", image, layer, "/"],
            ["umoci", "config", "--image", image, "--config.env", "FROM_IMAGE=yes", "--config.workingdir", "/srv"],
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image}",
             f"docker://127.0.0.1:{port}/test/mini:1"],
        ):  # fmt: skip
            subprocess.run(argv, check=True, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def test_the_sdk_builds_from_an_image_in_a_registry_and_a_missing_image_fails_clearly(
    registry, fresh_server, template_store, monkeypatch
):
    server = fresh_server(f'[templates]\ndir = "{template_store.root}"\ninsecure_registries = ["{registry}"]\n')
    tenant = server.new_tenant("oci")
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", tenant.headers["X-API-Key"])
    name = f"img-{uuid.uuid4().hex[:8]}"
    template = Template().from_image(f"{registry}/test/mini:1").run_cmd("echo from-image > /etc/x", user="root")
    Template.build(template, name)
    box = Sandbox.create(name, timeout=60)
    result = box.commands.run("cat /etc/x; echo $FROM_IMAGE; id -un; pwd")
    assert result.stdout.split() == ["from-image", "yes", "user", "/srv"]
    box.kill()
    with pytest.raises(BuildException, match="pulling image"):
        Template.build(Template().from_image(f"{registry}/test/none:1").run_cmd("true"), f"no-{uuid.uuid4().hex[:6]}")

    # A Dockerfile: the SDK turns it into the image and steps.
    dockerfile = f"FROM {registry}/test/mini:1\nRUN echo from-dockerfile > /etc/df\nENV DF=yes\nWORKDIR /opt\n"
    name = f"df-{uuid.uuid4().hex[:8]}"
    Template.build(Template().from_dockerfile(dockerfile), name)
    box = Sandbox.create(name, timeout=60)
    assert box.commands.run("cat /etc/df; echo $DF; pwd").stdout.split() == ["from-dockerfile", "yes", "/opt"]
    box.kill()


def test_an_image_with_a_link_where_sandboxes_mount_fails_its_build_and_registers_nothing(
    registry, fresh_server, template_store, monkeypatch, tmp_path
):
    # No sandbox could boot from such a tree (bwrap would follow the link out of the sandbox's
    # root): the build says so when it pulls the image, not the first sandbox at its boot.
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("ID=linked\n")
    os.symlink("/oldroot/var/tmp", tree / "tmp")
    image = f"{tmp_path}/oci:linked"
    for argv in (
        ["umoci", "init", "--layout", f"{tmp_path}/oci"],
        ["umoci", "new", "--image", image],
        ["umoci", "insert", "--image", image, str(tree), "/"],
        ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image}", f"docker://{registry}/test/linked:1"],
    ):
        subprocess.run(argv, check=True, capture_output=True)
    server = fresh_server(f'[templates]\ndir = "{template_store.root}"\ninsecure_registries = ["{registry}"]\n')
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", server.new_tenant("linked").headers["X-API-Key"])
    name = f"linked-{uuid.uuid4().hex[:8]}"
    with pytest.raises(BuildException, match=r"symbolic link where sandboxes mount.*/tmp -> /oldroot/var/tmp"):
        Template.build(Template().from_image(f"{registry}/test/linked:1"), name)  # no step: nothing would boot it
    assert not Template.exists(name)


def test_an_oversized_copy_upload_is_a_413_and_registers_nothing(fresh_server, template_store, tmp_path, monkeypatch):
    server = fresh_server(f'[templates]\ndir = "{template_store.root}"\nmax_upload_mb = 1\n')
    tenant = server.new_tenant("big")
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", tenant.headers["X-API-Key"])
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # incompressible: 3 MiB in the archive
    name = f"big-{uuid.uuid4().hex[:8]}"
    template = Template(file_context_path=str(tmp_path)).from_template(TEST_TEMPLATE).copy("big.bin", "/srv/")
    with pytest.raises(FileUploadException, match="Failed to upload file"):
        Template.build(template, name)
    assert not Template.exists(name)
    link = tenant.get(f"/templates/{name}/files/{'a' * 64}")
    assert link.status_code == 201, link.text
    refused = httpx.put(link.json()["url"], content=b"x" * (2 * 1024 * 1024))
    assert refused.status_code == 413 and "at most 1 MiB" in refused.json()["message"]


def test_a_filesystem_snapshot_boots_new_sandboxes_with_the_files(e2b_tenant):
    box = Sandbox.create(TEST_TEMPLATE, timeout=120)
    box.commands.run("echo snap > /etc/snapped && echo home > /home/user/h.txt", user="root")
    box.commands.run("sleep 600", background=True)
    info = box.create_snapshot(mode="filesystem")
    assert info.snapshot_id.endswith(":default")
    assert [s.snapshot_id for s in box.list_snapshots().next_items()] == [info.snapshot_id]
    box.commands.run("echo changed > /etc/snapped", user="root")  # the source runs on after the snapshot

    copy = Sandbox.create(info.snapshot_id, timeout=60)
    assert copy.commands.run("cat /etc/snapped /home/user/h.txt").stdout.split() == ["snap", "home"]
    assert "sleep 600" not in copy.commands.run("ps -eo args").stdout  # its files, not its memory
    copy.commands.run("echo mine > /etc/snapped", user="root")
    assert box.commands.run("cat /etc/snapped").stdout.strip() == "changed"  # copies are apart
    copy.kill()
    box.kill()
    assert Sandbox.delete_snapshot(info.snapshot_id) is True
    assert Sandbox.list_snapshots().next_items() == []


def _instance_record(tenant, server, sandbox_id: str) -> Path:
    """The runtime's record of a sandbox's instance (`instance.json`)."""
    sessions = tenant.get("/v1/sessions", params={"limit": 1000}).json()["sessions"]
    instance_id = next(s["containerId"] for s in sessions if s["sessionId"] == sandbox_id)
    return server.data_dir / "instances" / instance_id / "instance.json"


def _hibernatable_code_sandbox(tenant, server, timeout: int = 120, **create):
    """An e2b-code-interpreter sandbox of the test template and its instance's record; skips
    where this host cannot checkpoint sandboxes (no usable CRIU)."""
    from e2b_code_interpreter import Sandbox as CodeSandbox

    box = CodeSandbox.create(TEST_TEMPLATE, timeout=timeout, **create)  # E2B's default: internet, a network
    record = _instance_record(tenant, server, box.sandbox_id)
    assert json.loads(record.read_text())["spec"]["network"], "an E2B sandbox has a network"
    if not json.loads(record.read_text())["detail"].get("hibernatable"):
        box.kill()
        pytest.skip("this host cannot hibernate sandboxes (no usable CRIU: scripts/install-criu.sh)")
    return box, record


def test_a_paused_template_sandbox_hibernates_and_resumes_with_its_memory(e2b_tenant, template_server):
    """Where CRIU is installed, E2B's pause of a template sandbox (with its network, as E2B's
    sandboxes have) goes to disk (no process, no RAM) and `connect` restores it with its
    kernel's memory, files and processes."""
    box, record = _hibernatable_code_sandbox(e2b_tenant, template_server)
    box.run_code("x = 42\nheap = bytearray(b'\\x07') * (80 << 20)")
    box.files.write("/home/user/kept.txt", "still here")
    sleeper = box.commands.run("sleep 100000", background=True).pid
    for _ in range(3):
        assert box.pause() is True
        assert box.get_info().state == SandboxState.PAUSED
        assert json.loads(record.read_text())["state"] == "hibernated"  # on disk, not frozen
        metrics = template_server.admin.get("/metrics").text
        assert 'hutch_sessions_asleep{how="hibernated",why="paused"} 1.0' in metrics
        assert Sandbox.connect(box.sandbox_id, timeout=120).get_info().state == SandboxState.RUNNING
        assert box.run_code("x").text == "42"
        assert box.run_code("len(heap) >> 20, heap[-1]").text == "(80, 7)"
        assert box.files.read("/home/user/kept.txt") == "still here"
        assert box.commands.run(f"tr '\\0' ' ' < /proc/{sleeper}/cmdline").stdout.strip() == "sleep 100000"
    box.kill()


def _host_uids(record: Path) -> set[int]:
    """The host uids the processes of an instance run as (from its cgroup)."""
    detail = json.loads(record.read_text())["detail"]
    uids = set()
    for directory in detail["cgroup"]["dirs"].values():
        for pid in Path(directory, "cgroup.procs").read_text().split():
            with open(f"/proc/{pid}/status") as status:
                uids |= {int(line.split()[1]) for line in status if line.startswith("Uid:")}
    return uids


def test_forks_and_memory_snapshots_copy_a_sandbox_with_its_memory(e2b_tenant, template_server):
    """E2B's fork and (memory) snapshot with the official SDK: the copies start with the source's
    kernel memory, files and background process, each with its own id, token, host uids and
    files; they and the source go on apart. A fork's snapshot is not listed and goes with its
    last fork."""
    box, record = _hibernatable_code_sandbox(e2b_tenant, template_server)
    box.run_code("x = 42\nheap = bytearray(b'\\x07') * (80 << 20)")
    box.files.write("/home/user/kept.txt", "source")
    sleeper = box.commands.run("sleep 100000", background=True).pid

    forks = box.fork(count=2)
    assert len(forks) == 2 and all(isinstance(fork, Sandbox) for fork in forks), forks
    assert len({box.sandbox_id, *(fork.sandbox_id for fork in forks)}) == 3
    uids = {box.sandbox_id: _host_uids(record)}
    for n, fork in enumerate(forks):
        assert fork.run_code("x").text == "42"
        assert fork.run_code("len(heap) >> 20, heap[-1]").text == "(80, 7)"
        assert fork.files.read("/home/user/kept.txt") == "source"
        assert fork.commands.run(f"tr '\\0' ' ' < /proc/{sleeper}/cmdline").stdout.strip() == "sleep 100000"
        fork.run_code(f"x = {100 + n}")
        fork.files.write("/home/user/kept.txt", f"fork {n}")
        uids[fork.sandbox_id] = _host_uids(_instance_record(e2b_tenant, template_server, fork.sandbox_id))
    assert box.run_code("x").text == "42" and box.files.read("/home/user/kept.txt") == "source"
    assert [fork.run_code("x").text for fork in forks] == ["100", "101"]
    assert [fork.files.read("/home/user/kept.txt") for fork in forks] == ["fork 0", "fork 1"]
    assert all(uids.values()) and len(set().union(*uids.values())) == sum(map(len, uids.values())), uids
    other = e2b_tenant.post(f"/sandboxes/{box.sandbox_id}/fork", json={"count": 21})
    assert other.status_code == 400  # E2B's bound: 1 to 20

    snapshot = box.create_snapshot()  # E2B's default: memory and files
    box.run_code("x = 7")
    copy = type(box).create(snapshot.snapshot_id, timeout=60)
    assert copy.run_code("x").text == "42" and copy.files.read("/home/user/kept.txt") == "source"
    assert [s.snapshot_id for s in box.list_snapshots().next_items()] == [snapshot.snapshot_id]
    assert box.run_code("x").text == "7"

    for fork in forks:
        fork.kill()
    listed = lambda: [t["name"] for t in e2b_tenant.get("/v1/templates").json()["templates"]]  # noqa: E731
    deadline = time.monotonic() + 30
    while any(name.startswith("fork-") for name in listed()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(name.startswith("fork-") for name in listed()), listed()
    copy.kill()
    box.kill()
    assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True


COUNTER = """
import http.server, itertools
count = itertools.count(1)  # in memory only: a restart would count from 1 again
class Counter(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(next(count)).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Counter).serve_forever()
"""


def sleepy_counter(name: str) -> dict:
    """A function of the test template whose user server counts in memory (`COUNTER`), its
    sessions hibernated after 2 s idle."""
    return {
        "name": name,
        "template": TEST_TEMPLATE,
        "startCommand": ["python3", "-c", COUNTER],
        "port": 8080,
        "resources": {"memoryMB": 256, "diskMB": 256},
        "sessionAffinityConfig": {"sessionHibernateAfterIdleInSeconds": 2},
    }


def test_a_header_affinity_session_hibernates_when_idle_and_wakes_with_its_memory(template_server):
    """A function's session (header affinity, a user server of a template) hibernates after
    `sessionHibernateAfterIdleInSeconds` and its next request, by the same header, wakes it with
    its memory: the server's in-memory count goes on, the epoch is unchanged."""
    client = template_server.new_tenant(f"idle-{uuid.uuid4().hex[:6]}")
    name = f"counter-{uuid.uuid4().hex[:6]}"
    made = client.post("/v1/functions", json=sleepy_counter(name))
    assert made.status_code == 201, made.text
    headers = {"x-fc-session-id": "sleepy"}
    first = int(client.get(f"/functions/{name}/invoke/", headers=headers).text)
    assert client.get(f"/functions/{name}/invoke/", headers=headers).text == str(first + 1)
    record = _instance_record(client, template_server, "sleepy")
    if not json.loads(record.read_text())["detail"].get("hibernatable"):
        pytest.skip("this host cannot hibernate sandboxes (no usable CRIU: scripts/install-criu.sh)")
    path = f"/v1/functions/{name}/sessions/sleepy"
    deadline = time.monotonic() + 30
    while client.get(path).json()["state"] != "hibernated" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get(path).json()["state"] == "hibernated"
    assert json.loads(record.read_text())["state"] == "hibernated"  # on disk: no process, no RAM
    assert client.get(f"/functions/{name}/invoke/", headers=headers).text == str(first + 2)  # woken, memory kept
    session = client.get(path).json()
    assert session["state"] == "running" and session["epoch"] == 0
    # The native fork: a new session with the server's memory, counting on apart from the source.
    forked = client.post(f"{path}/fork", json={"count": 1})
    assert forked.status_code == 201, forked.text
    copy = forked.json()["sessions"][0]
    assert copy["sessionId"] != "sleepy" and copy["functionName"].startswith("fork-")  # like the source's
    copy_url, copy_headers = f"/functions/{copy['functionName']}/invoke/", {"x-fc-session-id": copy["sessionId"]}
    assert client.get(copy_url, headers=copy_headers).text == str(first + 3)
    assert client.get(copy_url, headers=copy_headers).text == str(first + 4)
    answer = client.get(f"/functions/{name}/invoke/", headers=headers).text
    assert answer == str(first + 3), template_server.log.read_text()[-6000:]
    client.delete(path)


def test_auto_pause_at_the_timeout_hibernates_and_the_next_run_code_resumes_it(e2b_tenant, template_server):
    """E2B's `lifecycle` on a template sandbox: its timeout pauses it to disk, and the next
    `run_code` (auto_resume) restores it with its memory."""
    box, record = _hibernatable_code_sandbox(
        e2b_tenant, template_server, timeout=4, lifecycle={"on_timeout": "pause", "auto_resume": True}
    )
    box.run_code("y = 'kept'\nheap = bytearray(b'\\x07') * (80 << 20)")
    deadline = time.monotonic() + 30
    while json.loads(record.read_text())["state"] != "hibernated" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(record.read_text())["state"] == "hibernated"
    assert box.get_info().state == SandboxState.PAUSED
    assert box.run_code("y, len(heap) >> 20").text == "('kept', 80)"  # traffic resumes it
    assert box.get_info().state == SandboxState.RUNNING
    box.kill()


def test_without_criu_a_pause_freezes_and_memory_snapshots_and_forks_are_refused(fresh_server, template_store):
    """A host without CRIU (`criu = "off"`): E2B's pause freezes the sandbox (memory kept in RAM)
    and resumes it with its memory; a memory snapshot and a fork are a 501 that says what works
    instead; a filesystem snapshot still works."""
    from e2b_code_interpreter import Sandbox as CodeSandbox

    server = fresh_server(f'criu = "off"\n[templates]\ndir = "{template_store.root}"\n')
    tenant = server.new_tenant("no-criu")
    config = {"api_url": server.url, "sandbox_url": server.url, "api_key": tenant.headers["X-API-Key"]}
    box = CodeSandbox.create(TEST_TEMPLATE, timeout=120, **config)
    record = _instance_record(tenant, server, box.sandbox_id)
    assert not json.loads(record.read_text())["detail"].get("hibernatable")
    box.run_code("x = 42")
    assert box.pause() is True
    session = next(s for s in tenant.get("/v1/sessions").json()["sessions"] if s["sessionId"] == box.sandbox_id)
    assert session["state"] == "frozen" and json.loads(record.read_text())["state"] == "running"
    assert CodeSandbox.connect(box.sandbox_id, **config).run_code("x").text == "42"
    with pytest.raises(SandboxException, match="cannot be snapshotted with its memory on this host"):
        box.create_snapshot()
    with pytest.raises(SandboxException, match="cannot be snapshotted with its memory on this host"):
        box.fork()
    assert box.create_snapshot(mode="filesystem").snapshot_id.endswith(":default")
    box.kill()
