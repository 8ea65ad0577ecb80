"""Escape attempts: what untrusted code inside a session tries, and the exact failure each must meet.

Every attack is an `Escape` (see `hutch.selftest.probes`): a program run as the sandbox user in a
real session, and for each of its probes the outcomes that mean "contained". Expectations are
the specific errors the kernel (or gVisor's) gives, not just "it failed": `ENOENT` where a host
path must not exist at all, `EROFS` where the system is read-only, `EPERM` where seccomp or
missing capabilities refuse a call, `ESRCH` where another pid namespace hides a process.

`CTX` (filled in by the battery) holds what an attacker could know or guess: the host paths of
a canary file, of the data directory and MetaDB, of another session's workspace and agent
socket; the host pids of hutch and of another session's processes; hutch's port and the host's
addresses; a secret of the server's environment; an abstract Unix socket bound on the host.
"""

from __future__ import annotations

from hutch.selftest.probes import Escape, allowed

DENIED = allowed("EPERM")
MISSING = allowed("ENOENT")
READ_ONLY = allowed("EROFS", "EACCES", "EPERM")
CLEAN = allowed("clean")
DROPPED = allowed("TimeoutError")

HOST_FILES = Escape(
    "host-files",
    "files",
    "read and write host files outside the binds",
    r"""
probe("read-canary", lambda: read(CTX["canary_path"]))
probe("list-canary-dir", lambda: os.listdir(CTX["canary_dir"]))
probe("read-shadow", lambda: read("/etc/shadow"))
# hutch's Python may live under /root (pyenv): then /root holds that read-only bind, nothing else.
probe("root-home-holds-only-python", lambda: "clean" if not os.path.exists("/root") or
      set(os.listdir("/root")) <= {".pyenv"} else "LEAK: " + ",".join(os.listdir("/root")))
probe("read-metadb", lambda: read(CTX["metadb_path"]))
probe("list-data-dir", lambda: os.listdir(CTX["data_dir"]))
probe("write-passwd", lambda: write("/etc/passwd"))
probe("write-usr", lambda: write("/usr/bin/hutch-selftest"))
probe("write-agent-code", lambda: write("/opt/hutch/lib/hutch/__init__.py"))
probe("write-root", lambda: os.mkdir("/hutch-selftest"))
probe("write-canary-path", lambda: write(CTX["canary_path"]))
HOST_DIRS = {"boot", "srv", "var", "mnt", "media", "snap", "lost+found"}
probe("root-listing", lambda: "clean" if not HOST_DIRS & set(os.listdir("/")) else
      "LEAK: " + ",".join(sorted(HOST_DIRS & set(os.listdir("/")))))
""",
    {
        "read-canary": MISSING,
        "list-canary-dir": MISSING,
        "read-shadow": MISSING,
        "root-home-holds-only-python": CLEAN,
        "read-metadb": MISSING,
        "list-data-dir": MISSING,
        "write-passwd": READ_ONLY,
        "write-usr": READ_ONLY,
        "write-agent-code": READ_ONLY,
        "write-root": READ_ONLY,
        "write-canary-path": allowed("ENOENT", "EROFS"),
        "root-listing": CLEAN,
    },
)

OTHER_WORKSPACE = Escape(
    "other-workspace",
    "files",
    "read another session's workspace by path guessing, symlinks, hardlinks and /proc/<pid>/root",
    r"""
victim = CTX["victim"]
secret = victim["workspace_path"] + "/victim-secret.txt"
probe("read-by-host-path", lambda: read(secret))
probe("list-by-host-path", lambda: os.listdir(victim["workspace_path"]))
probe("list-homes", lambda: "clean" if os.listdir("/home") == ["user"] else "LEAK: " + ",".join(os.listdir("/home")))
probe("read-workspace-store", lambda: os.listdir(CTX["data_dir"] + "/workspaces"))
def via_symlink():
    link = os.path.expanduser("~/.selftest-link")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(secret, link)
    return read(link)
probe("read-via-symlink", via_symlink)
def hardlink(source):
    def attempt():
        target = os.path.expanduser("~/.selftest-hardlink")
        if os.path.lexists(target):
            os.unlink(target)
        os.link(source, target)
    return attempt
probe("hardlink-victim-secret", hardlink(secret))
probe("hardlink-canary", hardlink(CTX["canary_path"]))
probe("hardlink-system-file", hardlink("/etc/passwd"))
probe("proc-root-of-victim", lambda: os.listdir(f"/proc/{victim['pid']}/root"))
def proc_roots():
    leaks = []
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.path.exists(f"/proc/{pid}/root/home/user/victim-secret.txt"):
                leaks.append(pid)
        except OSError:
            pass
    return "LEAK: " + ",".join(leaks) if leaks else "clean"
probe("proc-roots-hold-only-own-files", proc_roots)
probe("open-by-handle", lambda: call(304, -100, 0, 0))  # open_by_handle_at ("shocker")
""",
    {
        "read-by-host-path": MISSING,
        "list-by-host-path": MISSING,
        "list-homes": CLEAN,
        "read-workspace-store": MISSING,
        "read-via-symlink": MISSING,
        "hardlink-victim-secret": MISSING,
        "hardlink-canary": MISSING,
        # Another file system (the workspace is an image of its own), or protected_hardlinks.
        "hardlink-system-file": allowed("EXDEV", "EPERM"),
        "proc-root-of-victim": MISSING,
        "proc-roots-hold-only-own-files": CLEAN,
        "open-by-handle": DENIED,
    },
)

AGENT_SOCKETS = Escape(
    "agent-sockets",
    "network",
    "reach other sessions' agents, or redirect hutch's connections to them",
    r"""
victim = CTX["victim"]
probe("connect-victim-socket", lambda: connect(victim["socket_path"], socket.AF_UNIX))
probe("connect-own-agent-socket", lambda: connect("/run/hutch/agent.sock", socket.AF_UNIX))
def swap_socket():
    # Put a symlink to the victim's agent in place of our own: hutch would follow it.
    os.rename("/run/hutch/agent.sock", "/run/hutch/.moved")
probe("move-own-socket", swap_socket)
probe("unlink-own-socket", lambda: os.unlink("/run/hutch/agent.sock"))
probe("symlink-in-run-dir", lambda: os.symlink(victim["socket_path"], "/run/hutch/other.sock"))
probe("bind-in-run-dir", lambda: socket.socket(socket.AF_UNIX).bind("/run/hutch/other.sock"))
probe("connect-host-abstract-socket", lambda: connect("\0" + CTX["abstract_socket"], socket.AF_UNIX))
""",
    {
        "connect-victim-socket": MISSING,
        # The socket is host root's: the sandbox user may not connect to it, only the agent
        # holds it (bwrap: an unmapped owner; gVisor: opening host sockets is refused).
        "connect-own-agent-socket": allowed("EACCES", "EPERM", "ECONNREFUSED"),
        "move-own-socket": READ_ONLY,
        "unlink-own-socket": READ_ONLY,
        "symlink-in-run-dir": READ_ONLY,
        "bind-in-run-dir": READ_ONLY,
        "connect-host-abstract-socket": allowed("ECONNREFUSED"),
    },
    # gVisor: the agent's socket inside is gVisor's own, bound by the agent; connecting to it
    # reaches this sandbox's agent, which runs as the same user (nothing gained).
    overrides={"gvisor": {"connect-own-agent-socket": allowed("ok")}},
)

PROCESSES = Escape(
    "processes",
    "processes",
    "see or signal the host's and other sessions' processes",
    r"""
victim = CTX["victim"]
def visible():
    mine = []
    me = {str(os.getpid()), str(os.getppid())}  # this program's own command line names them
    for pid in [p for p in os.listdir("/proc") if p.isdigit() and p not in me]:
        try:
            cmdline = read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")
        except OSError:
            continue
        if b"hutch serve" in cmdline or victim["marker"].encode() in cmdline:
            mine.append(pid)
    return "LEAK: " + ",".join(mine) if mine else "clean"
probe("foreign-processes-visible", visible)
probe("signal-hutch", lambda: os.kill(CTX["hutch_pid"], 0))
probe("kill-hutch", lambda: os.kill(CTX["hutch_pid"], signal.SIGKILL))
own = set(int(p) for p in os.listdir("/proc") if p.isdigit())
foreign = [pid for pid in victim["host_pids"] if pid not in own]
probe_each("kill-victim-host-processes", lambda pid: os.kill(pid, signal.SIGKILL), foreign)
probe("pidfd-open-hutch", lambda: call(434, CTX["hutch_pid"], 0))
probe("kill-own-pid-1", lambda: os.kill(1, signal.SIGKILL))
probe("pid-1-is-own-agent", lambda: "own" if b"hutch.agent" in read("/proc/1/cmdline") else
      "LEAK: " + read("/proc/1/cmdline").decode(errors="replace"))
""",
    {
        "foreign-processes-visible": CLEAN,
        "signal-hutch": allowed("ESRCH"),
        "kill-hutch": allowed("ESRCH"),
        "kill-victim-host-processes": allowed("ESRCH"),
        "pidfd-open-hutch": allowed("ESRCH", "ENOSYS"),
        # bwrap: pid 1 of a namespace ignores signals it has no handler for (the call "works");
        # gVisor: pid 1 is `nobody`'s, and the sandbox user may not signal it.
        "kill-own-pid-1": allowed("ok", "EPERM"),
        "pid-1-is-own-agent": allowed("own"),
    },
)

SECRETS = Escape(
    "host-secrets",
    "processes",
    "read the host's environment, kernel keyrings and /proc/1",
    r"""
tokens = (CTX["env_canary"], CTX["admin_key"])
def environments():
    data = b"".join(f"{k}={v}".encode() for k, v in os.environ.items())
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            data += read(f"/proc/{pid}/environ", 1 << 20)
        except OSError:
            pass
    return leak_check(data, *tokens)
probe("environments", environments)
probe("pid-1-environ", lambda: leak_check(read("/proc/1/environ", 1 << 20), *tokens))
probe("keyctl-session-keyring", lambda: call(250, 0, -3, 0))  # KEYCTL_GET_KEYRING_ID, session
probe("add-key", lambda: call(248, b"user", b"selftest", b"x", 1, -4))
probe("request-key", lambda: call(249, b"user", b"selftest", 0, -4))
def proc_keys():
    try:
        data = read("/proc/keys")
    except OSError as exc:
        return outcome_of(exc)
    return "clean" if not data.strip() else "LEAK: " + str(len(data.splitlines())) + " keys"
probe("proc-keys", proc_keys)
probe("host-kernel-log", lambda: read("/dev/kmsg", 100))
probe("syslog", lambda: call(103, 3, 0, 0))
""",
    {
        "environments": CLEAN,
        "pid-1-environ": allowed("clean", "EACCES"),
        "keyctl-session-keyring": DENIED,
        "add-key": DENIED,
        "request-key": DENIED,
        "proc-keys": allowed("clean", "ENOENT", "EACCES"),
        "host-kernel-log": allowed("ENOENT", "EACCES", "EPERM"),
        "syslog": DENIED,
    },
)

NO_NETWORK = Escape(
    "no-network",
    "network",
    "reach hutch's control plane, the host's loopback services, other sessions' servers or any "
    "network, from a function without a network",
    r"""
port = CTX["hutch_port"]
probe("hutch-on-loopback", lambda: connect(("127.0.0.1", port)))
probe_each("hutch-on-host-addresses", lambda ip: connect((ip, port)), CTX["host_ips"])
probe("host-loopback-service", lambda: connect(("127.0.0.1", CTX["host_service_port"])))
probe("victim-user-server", lambda: connect(("127.0.0.1", CTX["victim"]["server_port"])))
probe("internet-tcp", lambda: connect(("8.8.8.8", 53)))
probe("internet-udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53)))
probe("metadata-service", lambda: connect(("169.254.169.254", 80)))
probe("ipv6-loopback-hutch", lambda: connect(("::1", port), socket.AF_INET6))
def interfaces():
    names = sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:])
    return "clean" if names == ["lo"] else "LEAK: " + ",".join(names)
probe("interfaces", interfaces)
probe("raw-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
probe("packet-socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
probe("resolve-a-name", lambda: socket.getaddrinfo("pypi.org", 443))
""",
    {
        "hutch-on-loopback": allowed("ECONNREFUSED"),
        "hutch-on-host-addresses": allowed("ENETUNREACH"),
        "host-loopback-service": allowed("ECONNREFUSED"),
        "victim-user-server": allowed("ECONNREFUSED"),
        "internet-tcp": allowed("ENETUNREACH"),
        "internet-udp": allowed("ENETUNREACH"),
        "metadata-service": allowed("ENETUNREACH"),
        "ipv6-loopback-hutch": allowed("ECONNREFUSED", "EADDRNOTAVAIL", "EAFNOSUPPORT"),
        "interfaces": CLEAN,
        "raw-socket": allowed("EPERM"),
        "packet-socket": allowed("EPERM", "EAFNOSUPPORT"),
        "resolve-a-name": allowed("gaierror"),
    },
    overrides={
        "gvisor": {
            name: allowed("EHOSTUNREACH")
            for name in ("hutch-on-host-addresses", "internet-tcp", "internet-udp", "metadata-service")
        }
    },
)

# A session whose function has a network (internet allowed): every connection goes through the
# egress proxy, which never makes one to the host, hutch, link-local addresses or other sandboxes.
NETWORKED = Escape(
    "networked-host-services",
    "network",
    "reach the host, hutch and other sessions from a session allowed onto the internet",
    r"""
port = CTX["hutch_port"]
net = CTX["network"]
DROP = 1.0  # seconds: packets to the host are dropped, so a connection attempt can only time out
probe("hutch-on-loopback", lambda: connect(("127.0.0.1", port)))
probe("hutch-via-gateway-address", lambda: connect((net["gateway_ip"], port), timeout=DROP))
probe_each("hutch-on-host-addresses", lambda ip: connect((ip, port), timeout=DROP), CTX["host_ips"])
probe_each("host-service-on-host-addresses", lambda ip: connect((ip, CTX["host_service_port"]), timeout=DROP),
           CTX["host_ips"])
probe("egress-proxy-itself", lambda: connect((net["gateway_ip"], net["proxy_port"]), timeout=DROP))
probe("metadata-service", lambda: connect(("169.254.169.254", 80), timeout=DROP))
probe("victim-user-server", lambda: connect((net["victim_ip"], CTX["victim"]["server_port"])))
probe("udp-out", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("10.0.0.1", 9)) and
      "sent (nothing answers)")
probe("raw-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
probe("change-own-route", lambda: os.system("ip route replace default dev eth0 2>/dev/null") == 0 or
      "refused")
""",
    {
        "hutch-on-loopback": allowed("ECONNREFUSED"),
        # Packets for the host's own addresses and link-local ones are dropped before routing.
        "hutch-via-gateway-address": DROPPED,
        "hutch-on-host-addresses": DROPPED,
        "host-service-on-host-addresses": DROPPED,
        "egress-proxy-itself": DROPPED,
        "metadata-service": DROPPED,
        # Any other address goes to the egress proxy, which never connects to another sandbox.
        "victim-user-server": allowed("connected, then closed"),
        "raw-socket": allowed("EPERM"),
        "change-own-route": allowed("refused"),
    },
    needs=("network",),
)

PRIVILEGE = Escape(
    "privilege",
    "privilege",
    "escalate: setuid binaries, capabilities, user namespaces, mount, ptrace, bpf, io_uring",
    r"""
import subprocess
def setuid_binary():
    # A setuid-root binary must not run as root: NoNewPrivs, and root is not even mapped.
    proc = subprocess.Popen(["/usr/bin/su", "root", "-c", "id"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        uids = [l for l in open(f"/proc/{proc.pid}/status") if l.startswith("Uid:")]
        euid = uids[0].split()[2] if uids else "gone"
    except OSError:
        euid = "gone"
    proc.kill(); proc.wait()
    return "not root (euid " + euid + ")" if euid != "0" else "LEAK: euid 0"
probe("setuid-binary", setuid_binary)
probe("setuid-0", lambda: os.setuid(0))
probe("setresuid-0", lambda: os.setresuid(0, 0, 0))
probe("capset-all", lambda: call(126, struct.pack("II", 0x20080522, 0), struct.pack("6I", *([0xFFFFFFFF] * 6))))
probe("ambient-raise", lambda: call(157, 47, 2, 21, 0, 0))  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
probe("unset-no-new-privs", lambda: call(157, 38, 0, 0, 0, 0))
probe("unshare-user", lambda: call(272, 0x10000000))
probe("unshare-mount", lambda: call(272, 0x00020000))
probe("clone-newuser", lambda: call(56, 0x10000000 | 17, 0, 0, 0, 0))
probe("clone3", lambda: call(435, 0, 0))
probe("setns", lambda: call(308, os.open("/proc/self/ns/net", os.O_RDONLY), 0))
probe("mount-tmpfs", lambda: call(165, b"none", b"/tmp", b"tmpfs", 0, 0))
probe("mount-bind", lambda: call(165, b"/", b"/tmp", 0, 4096, 0))
probe("umount-proc", lambda: call(166, b"/proc", 2))
probe("fsopen", lambda: call(430, b"tmpfs", 0))
probe("open-tree", lambda: call(428, -100, b"/", 1))
probe("pivot-root", lambda: call(155, b"/tmp", b"/tmp"))
probe("chroot", lambda: call(161, b"/tmp"))
probe("ptrace-attach-1", lambda: call(101, 16, 1, 0, 0))
probe("ptrace-traceme", lambda: call(101, 0, 0, 0, 0))
probe("process-vm-readv", lambda: call(310, 1, 0, 0, 0, 0, 0))
probe("pidfd-getfd", lambda: call(438, 0, 0, 0))
probe("bpf", lambda: call(321, 0, 0, 0))
probe("perf-event-open", lambda: call(298, 0, 0, -1, -1, 0))
probe("io-uring-setup", lambda: call(425, 1, 0))
probe("userfaultfd", lambda: call(323, 0))
probe("init-module", lambda: call(175, 0, 0, b""))
probe("kexec-load", lambda: call(246, 0, 0, 0, 0))
probe("reboot", lambda: call(169, 0xfee1dead, 672274793, 0x4321FEDC, 0))
probe("unshare-command", lambda: "refused" if subprocess.run(["unshare", "-U", "true"],
      capture_output=True).returncode != 0 else "LEAK: unshare -U ran")
""",
    {
        "setuid-binary": allowed("not root (euid 1000)", "not root (euid gone)"),
        "setuid-0": DENIED,
        "setresuid-0": DENIED,
        "capset-all": DENIED,
        "ambient-raise": DENIED,
        "unset-no-new-privs": allowed("EINVAL"),
        "unshare-user": DENIED,
        "unshare-mount": DENIED,
        "clone-newuser": DENIED,
        "clone3": allowed("ENOSYS"),
        "setns": DENIED,
        "mount-tmpfs": DENIED,
        "mount-bind": DENIED,
        "umount-proc": DENIED,
        "fsopen": DENIED,
        "open-tree": DENIED,
        "pivot-root": DENIED,
        "chroot": DENIED,
        "ptrace-attach-1": DENIED,
        "ptrace-traceme": DENIED,
        "process-vm-readv": DENIED,
        "pidfd-getfd": DENIED,
        "bpf": DENIED,
        "perf-event-open": DENIED,
        "io-uring-setup": DENIED,
        "userfaultfd": DENIED,
        "init-module": DENIED,
        "kexec-load": DENIED,
        "reboot": DENIED,
        "unshare-command": allowed("refused"),
    },
    # gVisor's kernel refuses some calls before the seccomp policy sees them.
    overrides={"gvisor": {"ambient-raise": allowed("EINVAL"), "pidfd-getfd": allowed("ENOSYS")}},
)

DEVICES = Escape(
    "devices-and-sys",
    "privilege",
    "make or open device nodes, write /sys and /proc/sys, raise limits",
    r"""
probe("mknod-char-mem", lambda: os.mknod("/tmp/mem", 0o600 | 0o020000, os.makedev(1, 1)))
probe("mknod-block", lambda: os.mknod("/tmp/disk", 0o600 | 0o060000, os.makedev(8, 0)))
probe("open-made-char-mem", lambda: os.open("/tmp/mem", os.O_RDWR))
probe("open-made-block", lambda: os.open("/tmp/disk", os.O_RDWR))
probe("mknod-in-workspace", lambda: os.mknod(os.path.expanduser("~/kmsg"), 0o600 | 0o020000, os.makedev(1, 11)))
for name in ("mem", "kmem", "port", "sda", "vda", "kvm", "loop-control", "fuse", "net/tun", "kmsg"):
    probe(f"open-dev-{name}", lambda name=name: os.close(os.open(f"/dev/{name}", os.O_RDWR)))
SAFE = {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout",
        "stderr", "core", "mqueue", "console"}
probe("dev-listing", lambda: "clean" if set(os.listdir("/dev")) <= SAFE else
      "extra: " + ",".join(sorted(set(os.listdir("/dev")) - SAFE)))
def tun_interface():
    import fcntl
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"selftest0", 0x0001 | 0x1000))  # TUNSETIFF
probe("create-tun-interface", tun_interface)
probe("write-proc-sys", lambda: write("/proc/sys/kernel/hostname", b"owned"))
probe("write-sysrq", lambda: write("/proc/sysrq-trigger", b"h"))
probe("write-sys-uevent-helper", lambda: write("/sys/kernel/uevent_helper", b"/tmp/x"))
probe("write-cgroup", lambda: write("/sys/fs/cgroup/memory/memory.limit_in_bytes", b"-1"))
probe("sethostname", lambda: call(170, b"owned", 5))
probe("lower-oom-score", lambda: write("/proc/self/oom_score_adj", b"-1000"))
import resource
def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
probe("raise-nofile", raise_nofile)
probe("settimeofday", lambda: call(164, struct.pack("qq", 0, 0), 0))
import fcntl, termios
probe("tiocsti", lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x"))
""",
    {
        "mknod-char-mem": DENIED,
        "mknod-block": DENIED,
        "open-made-char-mem": MISSING,
        "open-made-block": MISSING,
        "mknod-in-workspace": DENIED,
        **{
            f"open-dev-{name}": MISSING
            for name in ("mem", "kmem", "port", "sda", "vda", "kvm", "loop-control", "fuse", "net/tun", "kmsg")
        },
        "dev-listing": CLEAN,
        "write-proc-sys": READ_ONLY,
        "write-sysrq": MISSING,
        "write-sys-uevent-helper": MISSING,  # no /sys at all under bwrap
        "write-cgroup": MISSING,
        "sethostname": DENIED,
        "lower-oom-score": allowed("EACCES", "EPERM"),
        "raise-nofile": allowed("ValueError", "EPERM"),
        "settimeofday": DENIED,
        "tiocsti": allowed("EPERM", "ENOTTY", "EBADF"),
        "create-tun-interface": MISSING,
    },
    overrides={
        # gVisor's kernel has devices of its own, none of them the host's: a node made on its
        # tmpfs opens nothing (ENXIO), its /dev/fuse and /dev/net/tun are its own user-space
        # ones (making an interface needs CAP_NET_ADMIN, mounting FUSE `mount`: both refused),
        # and the OOM score is its own (the host's OOM killer sees the sentry).
        "gvisor": {
            "mknod-char-mem": allowed("ok"),
            "mknod-block": allowed("ok"),
            "open-made-char-mem": allowed("ENXIO"),
            "open-made-block": allowed("ENXIO"),
            "open-dev-fuse": allowed("ok"),
            "open-dev-net/tun": allowed("ok"),
            "dev-listing": allowed("extra: fuse,net"),
            "create-tun-interface": allowed("EPERM"),
            "lower-oom-score": allowed("ok"),
            "write-sysrq": allowed("EACCES"),
            "write-sys-uevent-helper": allowed("EACCES"),
        }
    },
)

ESCAPES: tuple[Escape, ...] = (
    HOST_FILES,
    OTHER_WORKSPACE,
    AGENT_SOCKETS,
    PROCESSES,
    SECRETS,
    NO_NETWORK,
    NETWORKED,
    PRIVILEGE,
    DEVICES,
)
