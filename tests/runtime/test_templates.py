"""Instances booted from a template: a root file system of their own, root inside, installs that
work, and nothing of it shared between sessions or with the host. Every test runs once per local
backend (`test_x[bwrap]`, `test_x[gvisor]`); gVisor's instances have no network, so the tests of
installs from the internet are bwrap's only."""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from hutch.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unauthenticated
from hutch.runtime import make_runtime
from hutch.runtime.base import InstanceSpec, InstanceState, Resources
from hutch.runtime.userns import RANGE, UidSlots
from hutch.storage.local import DirectoryStore, ImageStore
from tests.conftest import TEST_TEMPLATE
from tests.runtime.conftest import BACKENDS, Sandbox

pytestmark = pytest.mark.sandbox


@pytest.fixture(scope="module", params=BACKENDS)
def rootfs_runtime(request, loop):
    name = request.param
    if name == "gvisor" and shutil.which("runsc") is None:
        pytest.skip("gVisor (runsc) is not installed")
    root = Path(tempfile.mkdtemp(prefix="hutch-test-tpl-", dir="/var/tmp"))
    root.chmod(0o755)
    store = ImageStore(root / "workspaces") if ImageStore.available() else DirectoryStore(root / "workspaces")
    slots = UidSlots(first_uid=2_000_000_000 + random.randrange(256) * 64 * RANGE, count=64)

    async def make():
        return make_runtime(name, root, store, slots)

    runtime = loop.run(make())
    yield runtime
    for instance in runtime.instances():
        loop.run(runtime.stop(instance.instance_id))
    loop.run(runtime.close(unstage=True))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def boot(loop, rootfs_runtime, template_store):
    started: list[Sandbox] = []

    def make(
        workspace: str | None = None, network: dict | None = None, template: str = TEST_TEMPLATE, **resources
    ) -> Sandbox:
        spec = InstanceSpec(
            instance_id=f"t-{uuid.uuid4().hex[:10]}",
            resources=Resources(**resources),
            backend=rootfs_runtime.name,
            workspace=workspace,
            network=network,
            rootfs=template_store.rootfs(template),
        )
        sandbox = Sandbox(loop, rootfs_runtime, loop.run(rootfs_runtime.start(spec)))
        started.append(sandbox)
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


def test_commands_run_as_user_by_default_and_as_root_when_asked(boot):
    sandbox = boot()
    as_user = sandbox.run("id -u; id -gn; echo $HOME; pwd")
    assert as_user.stdout.decode().split() == ["1000", "user", "/home/user", "/home/user"]
    as_root = sandbox.loop.run(sandbox.channel.run("id -u; echo $HOME; pwd", user="root"))
    assert as_root.stdout.decode().split() == ["0", "/root", "/root"]


def test_files_written_through_the_file_api_are_the_users_and_checked_as_the_users(boot):
    # The agent is root and acts as the request's user (setfsuid; gVisor has none: the thread's ids).
    sandbox = boot()
    sandbox.loop.run(sandbox.channel.write_file("/home/user/up.txt", b"hi\n"))
    seen = sandbox.run(
        "stat -c '%U' /home/user/up.txt; cat /home/user/up.txt; echo more >> /home/user/up.txt && echo ok"
    )
    assert seen.stdout.decode().split() == ["user", "hi", "ok"], seen.stderr
    with pytest.raises(PermissionDenied):
        sandbox.loop.run(sandbox.channel.write_file("/etc/owned", b"x"))
    # And commands after it still start as the user, and as root when asked.
    assert sandbox.run("id -u").stdout == b"1000\n"
    assert sandbox.loop.run(sandbox.channel.run("id -u", user="root")).stdout == b"0\n"


def test_an_unknown_user_is_a_clear_error(boot):
    sandbox = boot()
    with pytest.raises(Unauthenticated, match="no such user"):
        sandbox.loop.run(sandbox.channel.run("id", user="mallory"))


def test_sudo_runs_the_command_as_root_without_a_password_and_keeps_its_exit_code(boot):
    sandbox = boot()
    result = sandbox.run("sudo id -u; sudo -u user id -un; sudo sh -c 'echo made > /etc/made'; cat /etc/made; "
                         "sudo sh -c 'exit 7'; echo code=$?; echo in | sudo cat")  # fmt: skip
    assert result.stdout.decode().split() == ["0", "user", "made", "code=7", "in"], result.stderr


def test_root_inside_is_an_unprivileged_host_uid_of_this_instance_only(boot, rootfs_runtime):
    first, second = boot(), boot()
    if rootfs_runtime.name == "gvisor":
        # No sandbox process is a host process: the host sees the sentry (as nobody) and the
        # gofer, which acts on files as root inside, as the slot's base uid.
        from hutch.runtime.cgroups import Cgroup

        found = [
            {_uid(str(pid)) for pid in Cgroup.from_dict(s.instance.detail["cgroup"]).procs()} for s in (first, second)
        ]
        gofers = [uids - {65534} for uids in found]
        assert all(len(uids) == 1 and min(uids) >= 65536 for uids in gofers), found
        assert gofers[0] != gofers[1]
        return
    uids = []
    for sandbox in (first, second):
        pid = int(sandbox.loop.run(sandbox.channel.run("sleep 30 & echo $!", user="root")).stdout.decode().split()[-1])
        # Find the sleep on the host: a child of the instance's process tree, by its pid namespace.
        host_pids = [p for p in os.listdir("/proc") if p.isdigit() and _ns_pid(p) == pid and _in_tree(p, sandbox)]
        assert host_pids, "the sleep is not visible from the host"
        uids.append(_uid(host_pids[0]))
    assert all(uid >= 65536 for uid in uids), uids  # never host root
    assert uids[0] != uids[1]


def _ns_pid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        return None
    return None


def _in_tree(pid: str, sandbox: Sandbox) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{sandbox.instance.pid}/ns/pid")
    except OSError:
        return False


def _uid(pid: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


def test_writes_land_in_the_sessions_upper_layer_never_in_the_template_or_another_session(boot, template_store):
    first, second = boot(), boot()
    layer = Path(template_store.rootfs(TEST_TEMPLATE).layer_paths[0])
    before = sorted(os.listdir(layer / "usr/local/bin"))
    result = first.loop.run(
        first.channel.run("echo one > /usr/local/bin/tool && rm /usr/bin/yes && echo ok", user="root")
    )
    assert result.stdout == b"ok\n", result.stderr
    assert sorted(os.listdir(layer / "usr/local/bin")) == before
    assert (layer / "usr/bin/yes").exists()
    seen = second.run("ls /usr/local/bin; test -e /usr/bin/yes && echo yes-is-there")
    assert b"tool" not in seen.stdout and b"yes-is-there" in seen.stdout


def test_what_a_session_installed_survives_a_new_instance_on_its_workspace(boot, rootfs_runtime):
    workspace = f"t/{uuid.uuid4().hex}"
    first = boot(workspace=workspace)
    first.loop.run(first.channel.run("echo tool > /usr/local/bin/tool && chmod 755 /usr/local/bin/tool", user="root"))
    first.run("echo mine > ~/notes.txt")
    first.stop(keep_workspace=True)
    second = boot(workspace=workspace)
    result = second.run("cat /usr/local/bin/tool ~/notes.txt; stat -c '%U %a' /usr/local/bin/tool ~/notes.txt")
    assert result.stdout.decode().split() == ["tool", "mine", "root", "755", "user", "644"], result.stderr
    second.stop()
    rootfs_runtime.store.delete(workspace)


def test_a_setuid_root_file_made_inside_is_unreachable_and_inert_on_the_host(boot):
    sandbox = boot()
    made = sandbox.loop.run(
        sandbox.channel.run(
            "cp /bin/sh /usr/local/bin/rootsh && chmod 4755 /usr/local/bin/rootsh && echo ok", user="root"
        )
    )
    assert made.stdout == b"ok\n", made.stderr
    # Inside, the sandbox user gains nothing from it (no_new_privs).
    assert sandbox.run("/usr/local/bin/rootsh -c 'id -u'").stdout == b"1000\n"
    # On the host the file is setuid host root: only root may reach the upper layer holding it.
    workspace = sandbox.instance.workspace_path
    assert os.stat(workspace).st_mode & 0o777 == 0o700 and os.stat(workspace).st_uid == 0
    assert os.stat(workspace / "upper/usr/local/bin/rootsh").st_mode & 0o4000


def test_user_code_runs_the_templates_python_and_never_sees_hutchs(boot):
    sandbox = boot()
    result = sandbox.python("import sys, shutil; print(sys.prefix, shutil.which('python3'), shutil.which('pip'))")
    assert result.stdout.decode().split() == ["/usr", "/usr/bin/python3", "/usr/bin/pip"], result.stderr
    found = sandbox.run("python3 -c 'import hutch' 2>&1; echo $PATH")
    assert b"No module named 'hutch'" in found.stdout and b"/opt/hutch" not in found.stdout


def test_root_inside_cannot_reach_the_kernel_or_the_host(boot):
    sandbox = boot()
    attacks = {
        "mount": "mount -t tmpfs none /mnt",
        "unshare": "unshare -U true",
        # gVisor lets root make the node on its own /dev, whose nodes open none of the host's (ENXIO).
        "mknod": "mknod /dev/sda-copy b 8 0 && head -c1 /dev/sda-copy",
        "proc_sys": "echo 1 > /proc/sys/kernel/sysrq",
        "keyring": "python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); "
        'exit(0 if l.syscall(248, b"user", b"k", b"v", 1, -2) >= 0 else 1)\'',
        "raw_socket": "python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)'",
        "host_usr_write": "touch /opt/hutch/host/usr/evil",
        "agent_write": "touch /opt/hutch/lib/hutch/evil.py",
    }
    for name, command in attacks.items():
        result = sandbox.loop.run(sandbox.channel.run(command, user="root"))
        assert result.exit_code != 0, f"{name} succeeded as root inside: {result.stdout!r} {result.stderr!r}"


def test_filling_the_disk_through_the_overlay_stops_at_the_sessions_limit(boot):
    if not ImageStore.available():
        pytest.skip("workspace size limits need loop devices")
    sandbox = boot(disk_mb=64)
    result = sandbox.loop.run(
        sandbox.channel.run("dd if=/dev/zero of=/usr/local/fill bs=1M count=200 2>&1; echo done", user="root")
    )
    assert b"No space left on device" in result.stdout
    usage = sandbox.loop.run(sandbox.runtime.stats(sandbox.id)).workspace_bytes
    assert usage <= 64 * 1024 * 1024


def _needs_network(runtime) -> None:
    if runtime.name == "gvisor":
        pytest.skip("gVisor instances have loopback only (hutch.runtime.gvisor: this runsc's network)")


def test_pip_install_then_import_in_a_session_allowed_egress(boot, rootfs_runtime):
    _needs_network(rootfs_runtime)
    sandbox = boot(network={"internet": True})
    result = sandbox.run("pip install --no-cache-dir --quiet six 2>&1 && python3 -c 'import six; print(six.__name__)'",
                         timeout=300)  # fmt: skip
    assert result.stdout.decode().strip().endswith("six"), result.stdout.decode()[-2000:]


def test_pip_install_of_a_local_wheel_goes_into_the_templates_python_and_the_upper_layer(boot):
    # No network needed (gVisor's instances have none): a wheel made inside, installed by the
    # template's pip as root, imported by the user, and written to the session's upper layer.
    sandbox = boot()
    info = "hutchdemo-1.0.dist-info"
    files = {
        "hutchdemo.py": "VALUE = 42\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: hutchdemo\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": "",
    }
    make_wheel = (
        "import zipfile\n"
        "with zipfile.ZipFile('/tmp/hutchdemo-1.0-py3-none-any.whl', 'w') as w:\n"
        f"    for name, text in {files!r}.items(): w.writestr(name, text)\n"
    )
    assert sandbox.python(make_wheel).exit_code == 0
    installed = sandbox.run("sudo pip install --no-index --quiet /tmp/hutchdemo-1.0-py3-none-any.whl 2>&1; "
                            "python3 -c 'import hutchdemo; print(hutchdemo.VALUE, hutchdemo.__file__)'")  # fmt: skip
    assert installed.stdout.decode().split()[-2] == "42", installed.stdout.decode()[-2000:]
    path = installed.stdout.decode().split()[-1]
    assert path.startswith("/usr/local/lib/python3"), path
    assert (sandbox.instance.workspace_path / "upper" / path.lstrip("/")).is_file()


def test_sudo_apt_get_install_works_in_a_session_allowed_egress(boot, rootfs_runtime):
    _needs_network(rootfs_runtime)
    sandbox = boot(network={"internet": True}, disk_mb=1024)
    result = sandbox.run(
        "sudo apt-get update -qq 2>&1 | tail -5; "
        "sudo apt-get install -y -qq --no-install-recommends jq 2>&1 | tail -5; echo '{\"a\": 41}' | jq '.a + 1'",
        timeout=600,
    )
    output = result.stdout.decode()
    assert output.strip().endswith("42"), output[-2000:] + result.stderr.decode()[-2000:]


def test_a_template_in_use_cannot_be_deleted(boot, template_store):
    sandbox = boot()
    with pytest.raises(FailedPrecondition, match="in use"):
        template_store.delete(TEST_TEMPLATE, in_use={sandbox.instance.spec.rootfs.template})
    assert template_store.exists(TEST_TEMPLATE)


def test_asking_for_root_in_a_host_template_sandbox_is_refused(sandbox):
    if sandbox.runtime.name != "bwrap":
        pytest.skip("the same agent code on both backends")
    with pytest.raises(PermissionDenied, match="no root"):
        sandbox.loop.run(sandbox.channel.run("id", user="root"))


def test_the_code_interpreter_runs_in_the_templates_python_as_the_user(boot):
    sandbox = boot()
    lines = sandbox.loop.run(
        sandbox.channel.execute("import os, sys; x = 41\nprint(sys.executable, os.getuid())\nx + 1")
    )
    stdout = "".join(line.get("text", "") for line in lines if line.get("type") == "stdout")
    results = [line for line in lines if line.get("type") == "result" and line.get("is_main_result")]
    assert stdout.split() == ["/usr/bin/python3", "1000"], lines
    assert results and results[0]["text"] == "42"


def _layer_with_links(template_store, links: dict[str, str]) -> str:
    """A template: the test template under a layer holding `links` (path inside -> target)."""
    import hashlib

    from hutch.templates.model import Template

    layer = hashlib.sha256(repr(sorted(links.items())).encode()).hexdigest()
    path = template_store.layer_path(layer)
    if not path.exists():
        scratch = template_store.scratch()
        for inside, target in links.items():
            (scratch / inside.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, scratch / inside.lstrip("/"))
        template_store.commit(scratch, layer)
    name = f"links-{layer[:8]}"
    template_store.put(Template(name=name, layers=(*template_store.get(TEST_TEMPLATE).layers, layer), source="test"))
    return name


def test_a_template_of_many_layers_shows_the_topmost_copy_of_a_file(loop, boot, template_store):
    # Layers are listed bottom first; an overlay's lower layers are given the topmost first. Ten
    # layers: their paths together pass fsconfig's 256 bytes per value (gVisor's overlay).
    import hashlib

    from hutch.templates.model import Template

    def tiny_layer(files: dict[str, bytes]) -> str:
        layer = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()
        if not template_store.layer_path(layer).exists():
            scratch = template_store.scratch()
            (scratch / "etc").mkdir(mode=0o755)
            for path, content in files.items():
                (scratch / path).write_bytes(content)
            template_store.commit(scratch, layer)
        return layer

    layers = [tiny_layer({f"etc/layer-{i}": b"%d\n" % i, "etc/debian_version": b"layer %d\n" % i}) for i in range(10)]
    name = f"layers-{layers[-1][:8]}"
    template_store.put(Template(name=name, layers=(*template_store.get(TEST_TEMPLATE).layers, *layers), source="test"))
    try:
        sandbox = boot(template=name)
        seen = sandbox.run("cat /etc/debian_version /etc/layer-0 /etc/layer-9; test -x /usr/bin/python3 && echo base")
        assert seen.stdout == b"layer 9\n0\n9\nbase\n", seen.stderr
        sandbox.stop()
    finally:
        template_store.delete(name)


@pytest.mark.parametrize(
    ("mount_point", "target"), [("/run", ""), ("/usr/bin/sudo", "/sudo"), ("/opt/hutch", ""), ("/tmp", "")]
)
def test_a_template_with_a_link_where_hutch_mounts_is_refused_and_the_host_is_untouched(
    loop, rootfs_runtime, template_store, mount_point, target
):
    # bwrap sets up with the host's root at /oldroot and follows links in mount destinations: a
    # template linking /run to /oldroot/<a world-writable host directory> had it create files there.
    host_dir = Path(tempfile.mkdtemp(prefix="hutch-test-links-", dir="/var/tmp"))
    host_dir.chmod(0o1777)
    try:
        name = _layer_with_links(template_store, {mount_point: f"/oldroot{host_dir}{target}"})
        spec = InstanceSpec(
            instance_id=f"t-{uuid.uuid4().hex[:10]}", resources=Resources(), backend=rootfs_runtime.name,
            rootfs=template_store.rootfs(name),
        )  # fmt: skip
        refused = f"symbolic link where the sandbox mounts.*{re.escape(mount_point)} -> "
        with pytest.raises(FailedPrecondition, match=refused):
            loop.run(rootfs_runtime.start(spec))
        assert os.listdir(host_dir) == []
        assert spec.instance_id not in {i.instance_id for i in rootfs_runtime.instances()}
        template_store.delete(name)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def test_a_link_planted_by_root_for_a_later_instance_with_a_network_is_refused(boot, rootfs_runtime):
    # /etc/resolv.conf is a mount point only where the session has a network: root inside an
    # instance without one may replace it; the session's next instance must not follow it.
    workspace = f"t/{uuid.uuid4().hex}"
    first = boot(workspace=workspace)
    planted = first.loop.run(
        first.channel.run("rm -f /etc/resolv.conf && ln -s /oldroot/var/tmp/x /etc/resolv.conf && echo ok", user="root")
    )
    assert planted.stdout == b"ok\n", planted.stderr
    first.stop(keep_workspace=True)
    network = {"internet": True} if rootfs_runtime.name == "bwrap" else None  # gVisor: none, checked all the same
    with pytest.raises(FailedPrecondition, match=re.escape("the session's own changes: /etc/resolv.conf -> /oldroot/")):
        boot(workspace=workspace, network=network)
    rootfs_runtime.store.delete(workspace)


def test_halt_ends_every_process_and_leaves_the_upper_layer_still_for_its_reader(boot, rootfs_runtime):
    # A template build copies each step's upper layer as host root: a process the step left
    # behind could swap a directory for a link into the host during the copy (cp follows it: seen
    # copying a root-only host file into a layer). The builder halts the instance first.
    from hutch.runtime.cgroups import Cgroup

    sandbox = boot()
    started = sandbox.loop.run(
        sandbox.channel.run(
            "setsid nohup sh -c 'while :; do date +%s%N > /usr/local/ticks; sleep 0.02; done' "
            ">/dev/null 2>&1 </dev/null & "
            "for i in $(seq 100); do test -s /usr/local/ticks && break; sleep 0.05; done; echo started",
            user="root",
        )
    )
    assert started.stdout == b"started\n"
    cgroup = Cgroup.from_dict(sandbox.instance.detail["cgroup"])
    assert len(cgroup.procs()) >= 2  # the agent and the loop
    sandbox.loop.run(rootfs_runtime.halt(sandbox.id))
    assert cgroup.procs() == []
    ticks = sandbox.instance.workspace_path / "upper/usr/local/ticks"
    first = ticks.read_text()
    time.sleep(0.2)
    assert ticks.read_text() == first  # nothing writes any more; the layer is still there to read
    assert rootfs_runtime.get(sandbox.id).state != InstanceState.CRASHED  # ended on purpose, not a crash
    sandbox.stop()
    assert sandbox.id not in {i.instance_id for i in rootfs_runtime.instances()}


def test_a_kernel_the_recipe_s_setup_installed_runs_other_languages_as_the_user(boot):
    sandbox = boot()
    lines = sandbox.loop.run(sandbox.channel.execute("X=41; echo $((X + 1)) $(id -u) $HOME; pwd", language="bash"))
    stdout = "".join(line.get("text", "") for line in lines if line.get("type") == "stdout")
    assert stdout == "42 1000 /home/user\n/home/user\n", lines
    # The setup ran with the host's DNS; the tree keeps the sandbox's own resolver.
    resolv = sandbox.loop.run(sandbox.channel.run("cat /etc/resolv.conf"))
    assert resolv.stdout == b"nameserver 127.0.0.1\n"
    # A language whose kernel the template lacks: a 400 that says what is missing.
    with pytest.raises(InvalidArgument, match="Deno's Jupyter kernel"):
        sandbox.loop.run(sandbox.channel.execute("1", language="javascript"))


def test_functions_name_templates_on_both_local_backends_and_not_on_kubernetes():
    from pydantic import ValidationError

    from hutch.functions import FunctionSpec

    assert FunctionSpec(name="g", runtime="gvisor", template="base").template == "base"
    with pytest.raises(ValidationError, match="templates run on the bwrap and gvisor runtimes"):
        FunctionSpec(name="k", runtime="kubernetes", template="base")
