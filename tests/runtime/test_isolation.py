"""Isolation, proved by trying: untrusted code inside a real sandbox attempts to get out."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from hutch.errors import HutchError
from hutch.runtime.base import InstanceState
from hutch.runtime.cgroups import Cgroup
from hutch.runtime.userns import RANGE
from tests.runtime.hostprocs import NOBODY, is_alive, uid_of

pytestmark = pytest.mark.sandbox

SYSCALL_PROBE = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def attempt(name, number, *args):
    res = libc.syscall(number, *args)
    err = ctypes.get_errno()
    print(f"{name}={'ok' if res >= 0 else errno.errorcode.get(err, err)}")
attempt("mount", 165, b"none", b"/tmp", b"tmpfs", 0, 0)
attempt("umount2", 166, b"/proc", 0)
attempt("ptrace", 101, 16, 1, 0, 0)            # PTRACE_ATTACH to pid 1
attempt("unshare_user", 272, 0x10000000)
attempt("unshare_mount", 272, 0x00020000)
attempt("setns", 308, 0, 0)
attempt("init_module", 175, 0, 0, b"")
attempt("finit_module", 313, 0, b"", 0)
attempt("delete_module", 176, b"ext4", 0)
attempt("kexec_load", 246, 0, 0, 0, 0)
attempt("bpf", 321, 0, 0, 0)
attempt("perf_event_open", 298, 0, 0, -1, -1, 0)
attempt("keyctl", 250, 0, 0, 0, 0, 0)
attempt("add_key", 248, b"user", b"k", b"v", 1, -4)
attempt("reboot", 169, 0xfee1dead, 672274793, 0x4321FEDC, 0)
attempt("swapon", 167, b"/tmp/x", 0)
attempt("pivot_root", 155, b"/tmp", b"/tmp")
attempt("open_by_handle_at", 304, 0, 0, 0)
attempt("userfaultfd", 323, 0)
attempt("io_uring_setup", 425, 1, 0)
attempt("chroot", 161, b"/tmp")
attempt("clone_newuser", 56, 0x10000000 | 17, 0, 0, 0, 0)
"""


def test_the_sandbox_user_is_unprivileged_inside_and_on_the_host(sandbox, runtime):
    result = sandbox.run(
        "id -u; grep -E '^(CapEff|CapBnd|Seccomp):' /proc/self/status;"
        # /proc/self/status of gVisor has no NoNewPrivs line: ask the kernel (PR_GET_NO_NEW_PRIVS).
        " python3 -c 'import ctypes; print(\"NoNewPrivs:\", ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))';"
        " touch written-inside"
    )
    lines = result.text.split()
    assert lines[0] == "1000"
    assert "CapEff:" in lines and lines[lines.index("CapEff:") + 1] == "0000000000000000"
    assert lines[lines.index("CapBnd:") + 1] == "0000000000000000"
    assert lines[lines.index("NoNewPrivs:") + 1] == "1"
    assert lines[lines.index("Seccomp:") + 1] == "2"
    instance = sandbox.instance
    assert instance.host_uid >= 100_000
    # What the sandbox user writes belongs to its own unprivileged host uid, under both backends.
    assert (instance.workspace_path / "written-inside").stat().st_uid == instance.host_uid
    # Every host process of the instance runs unprivileged: under bwrap as the sandbox user's
    # host uid; under gVisor the gofer as the root of the slot's uid range (no capability on the
    # host) and the sentry and its stubs as `nobody` in a user namespace of their own.
    base = runtime.uid_slots.base(instance.detail["slot"])
    host_uids = {uid_of(pid) for pid in Cgroup.from_dict(instance.detail["cgroup"]).procs()} - {None}
    assert host_uids and 0 not in host_uids
    if runtime.name == "bwrap":
        assert host_uids == {instance.host_uid}
        status = Path(f"/proc/{instance.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert all(int(uid) == instance.host_uid for uid in uids)
    else:
        assert all(base <= uid < base + RANGE or uid == NOBODY for uid in host_uids), host_uids
        assert base in host_uids  # the gofer


def test_every_instance_runs_under_its_own_host_uid(make_sandbox):
    first, second = make_sandbox(), make_sandbox()
    assert first.instance.host_uid != second.instance.host_uid


def test_dangerous_syscalls_are_denied(sandbox):
    result = sandbox.python(SYSCALL_PROBE)
    outcomes = dict(line.split("=") for line in result.text.split())
    assert len(outcomes) == 22, result.text + result.stderr.decode()
    allowed = {name: outcome for name, outcome in outcomes.items() if outcome == "ok"}
    assert allowed == {}
    assert outcomes["io_uring_setup"] == "EPERM"
    assert outcomes["unshare_user"] == "EPERM"
    assert outcomes["mount"] == "EPERM"


def test_the_unshare_command_cannot_make_a_user_namespace(sandbox):
    result = sandbox.run("unshare -U true")
    assert result.exit_code != 0
    assert "Operation not permitted" in result.stderr.decode()


def test_host_files_outside_the_binds_are_invisible(sandbox):
    canary = Path("/root") / f"hutch-canary-{uuid.uuid4().hex}"
    canary.write_text("host secret")
    try:
        result = sandbox.run(f"cat {canary}; cat /etc/shadow; ls /root; ls /var/tmp; cat /proc/1/cmdline")
        assert "host secret" not in result.text
        assert f"cat: {canary}: No such file or directory" in result.stderr.decode()
        assert "cat: /etc/shadow: No such file or directory" in result.stderr.decode()
        assert "hutch-test" not in result.text  # the data directory is not there either
        assert "hutch.agent" in result.text  # pid 1 is the sandbox's own agent
    finally:
        canary.unlink()


def test_the_system_is_read_only(sandbox):
    result = sandbox.run("touch /usr/x; echo root::0:0::/:/bin/sh >> /etc/passwd; touch /x; mkdir /opt/y")
    errors = result.stderr.decode()
    assert errors.count("Read-only file system") + errors.count("Permission denied") >= 4, errors
    assert "root::0:0" not in sandbox.run("cat /etc/passwd").text


def test_host_processes_are_invisible_and_unreachable(sandbox):
    result = sandbox.run("ps -e -o pid= | wc -l; kill -9 1 2>&1; ls /proc | grep -c '^[0-9]'")
    visible = int(result.text.split()[0])
    assert visible < 10  # the agent, its reaper, this shell and ps
    # pid 1 (the reaper) survived: under bwrap the kernel ignores the signal, under gVisor the
    # reaper is another user's process and the kill is refused.
    assert sandbox.run("echo alive").text.strip() == "alive"
    host_pid = os.getpid()
    result = sandbox.run(f"kill -0 {host_pid} 2>&1 || echo gone")
    assert "gone" in result.text or "No such process" in result.text
    assert os.path.exists(f"/proc/{host_pid}")


def test_there_is_no_network_but_loopback(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    try:
        code = f"""
import socket
for target in [("127.0.0.1", {port}), ("10.0.2.2", 80), ("8.8.8.8", 53)]:
    try:
        socket.create_connection(target, timeout=2)
        print(target[0], "connected")
    except OSError as exc:
        print(target[0], type(exc).__name__, exc.errno)
print(open("/proc/net/dev").read())
"""
        result = sandbox.python(code)
        assert "connected" not in result.text, result.text
        assert "127.0.0.1 ConnectionRefusedError" in result.text  # its own, empty loopback
        # No route out: ENETUNREACH (101) from Linux, EHOSTUNREACH (113) from gVisor's netstack.
        assert "10.0.2.2 OSError 101" in result.text or "10.0.2.2 OSError 113" in result.text, result.text
        interfaces = [line.split(":")[0].strip() for line in result.text.splitlines() if ":" in line]
        assert [name for name in interfaces if name and not name.startswith(("127", "10.", "8."))] == ["lo"]
        assert accepted == []
    finally:
        listener.close()


def test_two_sandboxes_cannot_see_each_others_files_or_processes(make_sandbox):
    first, second = make_sandbox(), make_sandbox()
    first.run("echo first-secret > secret.txt; sleep 30 & echo started")
    result = second.run(
        f"cat /home/user/secret.txt; ls /run/hutch; ps -e -o args=; "
        f"ls {first.instance.workspace_path} 2>&1; ls /proc/{first.instance.pid}/root 2>&1"
    )
    assert "first-secret" not in result.text
    assert "sleep 30" not in result.text
    assert result.text.split().count("agent.sock") == 1  # only its own socket
    assert second.run("cat secret.txt").exit_code != 0


def test_a_fork_bomb_stops_at_the_pids_limit(make_sandbox):
    sandbox = make_sandbox(pids=64)
    result = sandbox.python(
        "import os, time\n"
        "ok = failed = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        failed += 1\n"
        "        continue\n"
        "    if pid == 0:\n"
        "        time.sleep(2)\n"
        "        os._exit(0)\n"
        "    ok += 1\n"
        "print(ok, failed)\n"
    )
    ok, failed = map(int, result.text.split())
    assert failed > 100 and ok < 64
    # While the children live the sandbox is (nearly) full: a command either runs or fails with a
    # clear error, within its timeout.
    try:
        assert sandbox.run("echo squeezed", timeout=10).text.strip() == "squeezed"
    except HutchError as refused:
        assert refused.code in ("resource_exhausted", "unavailable"), refused
    time.sleep(2.5)
    assert sandbox.run("echo alive").text.strip() == "alive"


def test_a_real_fork_bomb_is_contained_and_torn_down(make_sandbox, loop, runtime):
    bomb = make_sandbox(pids=128)
    bomb.run("bash -c ':(){ :|:& };:' >/dev/null 2>&1 &", timeout=10)
    neighbour = make_sandbox()
    assert neighbour.run("echo fine").text.strip() == "fine"
    cgroup = Cgroup.from_dict(bomb.instance.detail["cgroup"])
    host_pids = cgroup.procs()
    bomb.stop()
    assert [pid for pid in host_pids if is_alive(pid)] == []
    assert not any(d.exists() for d in cgroup.dirs.values())


HOG = "a = []\nwhile True:\n    a.append(bytearray(8 << 20))\n"


def test_a_memory_hog_is_killed_and_the_sandbox_lives_on(make_sandbox, runtime, loop):
    if runtime.name == "gvisor":
        pytest.skip("under gVisor a memory hog ends its whole instance: see the next test")
    sandbox = make_sandbox(memory_mb=128)
    result = sandbox.python(HOG)
    assert result.exit_code == -1 and "killed" in result.status
    assert sandbox.run("echo still-here").text.strip() == "still-here"


def test_a_memory_hog_under_gvisor_ends_only_its_own_instance(make_sandbox, runtime, loop):
    """The sentry holds all of a gVisor sandbox's memory, so the host's OOM killer can only end the
    instance as a whole: the limit holds, the instance is reported crashed, the rest lives on."""
    if runtime.name != "gvisor":
        pytest.skip("bwrap kills only the hog: see the previous test")
    neighbour = make_sandbox()
    sandbox = make_sandbox(memory_mb=128)
    exits = []
    runtime.on_exit = exits.append
    try:
        with pytest.raises(HutchError):
            sandbox.python(HOG)
        deadline = time.monotonic() + 10
        while loop.run(runtime.status(sandbox.id)) != InstanceState.CRASHED:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        runtime.on_exit = None
    assert [i.instance_id for i in exits] == [sandbox.id]
    assert Cgroup.from_dict(sandbox.instance.detail["cgroup"]).oom_kills() >= 1
    assert neighbour.run("echo still-here").text.strip() == "still-here"


def test_a_cpu_spin_gets_only_its_cpu_quota(make_sandbox):
    sandbox = make_sandbox(cpu=0.5)
    before = sandbox.stats().cpu_seconds
    sandbox.run("timeout 2 python3 -c 'while True: pass'")
    used = sandbox.stats().cpu_seconds - before
    assert 0.6 < used < 1.4, used  # half of the 2 s it spun, give or take the scheduler


def test_tmp_is_a_small_private_tmpfs(make_sandbox):
    sandbox = make_sandbox(tmp_mb=16)
    result = sandbox.run("dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>&1; df -k /tmp | tail -1")
    assert "No space left on device" in result.text
    size_kb = int(result.text.splitlines()[-1].split()[1])
    assert size_kb <= 16 * 1024


def test_filling_the_workspace_fills_only_its_own_disk(make_sandbox, runtime):
    if runtime.store.name != "image":
        pytest.skip("the directory store has no size limit")
    sandbox = make_sandbox(disk_mb=64)
    host_free_before = os.statvfs("/var/tmp").f_bavail
    result = sandbox.run("dd if=/dev/zero of=big bs=1M count=200 2>&1; ls -l big")
    assert "No space left on device" in result.text
    assert int(result.text.split()[-5]) < 64 * 1024 * 1024
    host_free_after = os.statvfs("/var/tmp").f_bavail
    block = os.statvfs("/var/tmp").f_frsize
    assert (host_free_before - host_free_after) * block < 80 * 1024 * 1024
    inodes = sandbox.python(
        "import os\nos.makedirs('many', exist_ok=True)\nn = 0\n"
        "try:\n    while True:\n        open(f'many/{n}', 'w').close(); n += 1\n"
        "except OSError as exc:\n    print(n, exc.strerror)\n",
        timeout=120,
    )
    count, reason = inodes.text.split(" ", 1)
    assert "No space left on device" in reason and int(count) < 100_000


def test_open_files_are_limited(make_sandbox):
    sandbox = make_sandbox(nofile=256)
    result = sandbox.python(
        "import resource\nfiles = []\n"
        "try:\n    while True:\n        files.append(open('/dev/null'))\n"
        "except OSError as exc:\n    print(len(files), exc.strerror, resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "try:\n    resource.setrlimit(resource.RLIMIT_NOFILE, (100000, 100000))\nexcept (ValueError, OSError) as e:\n"
        "    print('raise refused')\n"
    )
    assert "Too many open files" in result.text
    assert "(256, 256)" in result.text
    assert "raise refused" in result.text


def test_the_wall_clock_cap_ends_the_instance(make_sandbox, loop, runtime):
    sandbox = make_sandbox(max_lifetime_s=1.0)
    deadline = time.monotonic() + 10
    while loop.run(runtime.status(sandbox.id)).value != "crashed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not is_alive(sandbox.instance.pid)


def test_a_sandbox_cannot_point_hutch_at_another_instances_socket(make_sandbox, loop):
    """hutch reaches an instance by the path of its agent's socket: if the sandbox could put a
    symlink there, hutch would carry one session's requests to another's instance."""
    victim, attacker = make_sandbox(), make_sandbox()
    loop.run(victim.channel.write_file("/home/user/secret.txt", b"victim-secret"))
    result = attacker.run(
        f"rm -f /run/hutch/agent.sock; ln -s {victim.instance.socket_path} /run/hutch/agent.sock;"
        "mv /run/hutch/agent.sock /run/hutch/moved"
    )
    errors = result.stderr.decode()
    assert "rm: cannot remove '/run/hutch/agent.sock'" in errors, errors
    assert "ln: failed to create symbolic link '/run/hutch/agent.sock" in errors, errors
    # bwrap: a read-only bind; gVisor: a directory of host root's, after the agent bound its socket
    assert errors.count("Read-only file system") + errors.count("Permission denied") == 2, errors
    socket_path = attacker.instance.socket_path
    assert socket_path.is_socket() and not socket_path.is_symlink()
    assert sorted(p.name for p in socket_path.parent.iterdir()) == ["agent.sock"]
    fresh = attacker.runtime.channel(attacker.id)  # a new connection, by path, as the gateway makes
    try:
        with pytest.raises(HutchError, match="does not exist"):
            loop.run(fresh.read_file("/home/user/secret.txt"))
    finally:
        loop.run(fresh.aclose())
