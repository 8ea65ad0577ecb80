"""Escape attempts: what untrusted code inside a session tries, and the exact failure each must meet.

Every attack is an `Escape` (see `hutch.selftest.probes`): a program run as the sandbox user in a
real session (as root inside, for the root cast: a template's own root file system), and for
each of its probes the outcomes that mean "contained". Expectations are
the specific errors the kernel (or gVisor's) gives, not just "it failed": `ENOENT` where a host
path must not exist at all, `EROFS` where the system is read-only, `EPERM` where seccomp or
missing capabilities refuse a call, `ESRCH` where another pid namespace hides a process.

`CTX` (filled in by the battery) holds what an attacker could know or guess: the host paths of
a canary file, of the data directory and MetaDB, of another session's workspace and agent
socket; the host pids of hutch and of another session's processes; hutch's port and the host's
addresses; a secret of the server's environment; an abstract Unix socket bound on the host.

The root cast (`ROOT`): root inside owns its `/`, `/etc` and `/usr` (its own copies in the
session's overlay upper layer, never the template's or the host's), so writing them is no escape;
there each probe checks instead that what it reached is the template's, not the host's, and that
the host's and the other sessions' things stay out of reach, with the same exact errors.
`ROOT_KERNEL` holds the attacks root inside enables, `hutch.selftest.rootfs` the ones judged on
the host (the template's shared lower layer, root's host uid).
"""

from __future__ import annotations

from hutch.selftest.probes import NOT_PLAYED, Escape, allowed
from hutch.selftest.stage import ROOT, ROOT_GVISOR

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
probe("read-shadow", lambda: read("/etc/shadow") and None)
if not ROOT:
    # hutch's Python may live under /root (pyenv): then /root holds that read-only bind, nothing else.
    probe("root-home-holds-only-python", lambda: "clean" if not os.path.exists("/root") or
          set(os.listdir("/root")) <= {".pyenv"} else "LEAK: " + ",".join(os.listdir("/root")))
probe("read-metadb", lambda: read(CTX["metadb_path"]))
probe("list-data-dir", lambda: os.listdir(CTX["data_dir"]))
probe("write-passwd", lambda: touch("/etc/passwd"))
probe("write-usr", lambda: touch("/usr/bin/hutch-selftest"))
probe("write-agent-code", lambda: write("/opt/hutch/lib/hutch/__init__.py"))
probe("write-host-usr", lambda: touch("/opt/hutch/host/usr/bin/hutch-selftest"))
probe("write-root", lambda: os.makedirs("/hutch-selftest", exist_ok=True))
probe("write-canary-path", lambda: write(CTX["canary_path"]))
HOST_DIRS = {"boot", "srv", "var", "mnt", "media", "snap", "lost+found"}
if not ROOT:
    probe("root-listing", lambda: "clean" if not HOST_DIRS & set(os.listdir("/")) else
          "LEAK: " + ",".join(sorted(HOST_DIRS & set(os.listdir("/")))))
else:
    # Root reads /etc/shadow: it must be the template's copy, never the host's.
    def own_copy(path):
        import hashlib
        seen = hashlib.sha256(read(path, 1 << 24)).hexdigest()
        if seen == ROOT["template_digests"].get(path):
            return "template's own"
        return "LEAK: the host's " + path if seen == ROOT["host_digests"].get(path) else "changed"
    probe_each("system-files-are-the-templates", own_copy, sorted(ROOT["template_digests"]))
    # Nothing at the top of / but the template's names, and the directory `write-root` made.
    extra = set(os.listdir("/")) - set(ROOT["template_top"]) - {"hutch-selftest"}
    probe("root-listing-is-the-templates", lambda: "clean" if not extra else "LEAK: " + ",".join(sorted(extra)))
    home = set(os.listdir("/root")) - set(ROOT["template_root_home"])
    probe("root-home-is-the-templates", lambda: "clean" if not home else "LEAK: " + ",".join(sorted(home)))
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
        "write-host-usr": allowed("ENOENT", "EROFS"),
        "write-root": READ_ONLY,
        "write-canary-path": allowed("ENOENT", "EROFS"),
        "root-listing": CLEAN,
    },
    overrides={
        ROOT: {
            # The template's own files, in the session's overlay (`system-files-are-the-templates`,
            # `rootfs-lower-layer` check that they are theirs and that nothing else sees a write).
            "read-shadow": allowed("ok"),
            "write-passwd": allowed("ok"),
            "write-usr": allowed("ok"),
            "write-root": allowed("ok"),
            "root-home-holds-only-python": NOT_PLAYED,
            "root-listing": NOT_PLAYED,
            "system-files-are-the-templates": allowed("template's own"),
            "root-listing-is-the-templates": CLEAN,
            "root-home-is-the-templates": CLEAN,
            # hutch's own code and the host's /usr under /opt/hutch: read-only binds.
            "write-agent-code": allowed("EROFS"),
            "write-host-usr": allowed("EROFS"),
        }
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
    # Root's home and /etc are both in the session's own overlay: a link between its own files.
    overrides={ROOT: {"hardlink-system-file": allowed("ok")}},
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
    # reaches this sandbox's agent, which runs as the same user (nothing gained). Root inside a
    # template's instance that can hibernate (CRIU) finds its agent's own socket, root's 0600:
    # it reaches an agent running as root, as it is (nothing gained); the user cannot.
    overrides={
        "gvisor": {"connect-own-agent-socket": allowed("ok")},
        ROOT: {"connect-own-agent-socket": allowed("ok", "EACCES")},
    },
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
if not (CTX.get("runtime") == "gvisor" and os.geteuid() == 0):
    # gVisor's pid 1 takes the signals Linux's ignores: root inside (who may become any uid)
    # ends its own instance, as root halts its own VM; the session's next request starts another.
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
    overrides={ROOT_GVISOR: {"kill-own-pid-1": NOT_PLAYED}},
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
probe("packet-socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
probe("change-own-route", lambda: os.system("ip route replace default dev eth0 2>/dev/null") == 0 or
      "refused")
# The sandbox's network namespace belongs to the host's user namespace, not the sandbox's: even
# root inside holds no capability over it (taking another session's address, downing the link,
# marking packets past the rules).
import fcntl, struct
ifname = next(line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]
              if line.split(":")[0].strip() != "lo").encode()
as_victim = struct.pack("16sH2s4s8s", ifname, socket.AF_INET, b"", socket.inet_aton(net["victim_ip"]), b"")
probe("take-victim-address", lambda: fcntl.ioctl(socket.socket(), 0x8916, as_victim))  # SIOCSIFADDR
probe("down-own-link", lambda: fcntl.ioctl(socket.socket(), 0x8914, struct.pack("16sH22s", ifname, 0, b"")))
probe("mark-packets", lambda: socket.socket().setsockopt(socket.SOL_SOCKET, 36, 1))  # SO_MARK
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
        "packet-socket": allowed("EPERM"),
        "change-own-route": allowed("refused"),
        "take-victim-address": allowed("EPERM"),
        "down-own-link": allowed("EPERM"),
        "mark-packets": allowed("EPERM"),
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
if not ROOT:  # root inside runs a setuid-root binary as root: `root-kernel` makes one and runs it as user
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
    overrides={
        # gVisor's kernel refuses some calls before the seccomp policy sees them.
        "gvisor": {"ambient-raise": allowed("EINVAL"), "pidfd-getfd": allowed("ENOSYS")},
        # Root inside is uid 0 of its namespace already (who that is on the host:
        # `rootfs-host-identity`); setuid binaries as the user: `root-kernel`.
        ROOT: {"setuid-binary": NOT_PLAYED, "setuid-0": allowed("ok"), "setresuid-0": allowed("ok")},
    },
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
        },
        # The UTS namespace's sysctls belong to the host's root, not to root inside.
        ROOT: {"write-proc-sys": allowed("EACCES")},
        # gVisor's own /proc/sys and /sys refuse root inside as gVisor refuses them.
        ROOT_GVISOR: {
            "write-proc-sys": allowed("EIO"),
            "write-sysrq": allowed("EPERM"),
            "write-sys-uevent-helper": allowed("EPERM"),
        },
    },
)

# Capabilities root inside must never hold, effective or in its bounding set (by number).
FORBIDDEN_CAPS = {
    "CAP_DAC_READ_SEARCH": 2, "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13, "CAP_IPC_LOCK": 14, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23, "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25, "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_PERFMON": 38, "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}  # fmt: skip

# What root inside (namespaced root of a template's instance) tries that the sandbox user cannot
# even attempt: each is refused by the seccomp filter (EPERM), by a capability root inside does
# not hold (EPERM), by a read-only kernel file system (EROFS), or by a file that does not exist.
ROOT_KERNEL = Escape(
    "root-kernel",
    "privilege",
    "as root inside: mount, device nodes, /proc/sys, kernel keyrings, unshare and nested user "
    "namespaces, setuid and file-capability binaries run as user, raw sockets, the network stack",
    r"""
import subprocess, fcntl
# gVisor's kernel shows maps of its own (`0 0 4294967295`), and /sys of its own: the instance's
# host uids are judged from the host (`rootfs-host-identity`).
GVISOR = CTX.get("runtime") == "gvisor"
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return line.split()[1]
def uid_map():
    if GVISOR:
        return "gVisor's own (judged on the host)"
    inside, outside, count = open("/proc/self/uid_map").read().split()[:3]
    # Root inside is host uid `outside`: never 0, and a range of this instance's own.
    if inside == "0" and int(outside) >= 65536 and count == "65536":
        return "namespaced root"
    return "LEAK: " + open("/proc/self/uid_map").read().strip()
probe("is-root-inside", lambda: "root" if os.geteuid() == 0 else "not root: " + str(os.geteuid()))
probe("uid-map", uid_map)
probe("gid-map", lambda: "gVisor's own (judged on the host)" if GVISOR else
      "namespaced" if open("/proc/self/gid_map").read().split()[1] != "0" else "LEAK: gid 0")
def caps(key):
    mask = int(status(key), 16)
    held = [name for name, bit in __FORBIDDEN__.items() if mask >> bit & 1]
    return "none" if not held else "LEAK: " + ",".join(held)
probe("forbidden-effective-capabilities", lambda: caps("CapEff"))
probe("forbidden-bounding-capabilities", lambda: caps("CapBnd"))
# PR_GET_NO_NEW_PRIVS: gVisor's /proc/self/status has no NoNewPrivs line.
probe("no-new-privs", lambda: "set" if libc.prctl(39, 0, 0, 0, 0) == 1 else "LEAK: unset")
probe("seccomp", lambda: "filtered" if status("Seccomp") == "2" else "LEAK: " + str(status("Seccomp")))
# mount: every form (seccomp), and the mount command
probe("mount-tmpfs", lambda: call(165, b"none", b"/mnt", b"tmpfs", 0, 0))
probe("mount-proc", lambda: call(165, b"proc", b"/mnt", b"proc", 0, 0))
probe("remount-root-rw", lambda: call(165, b"none", b"/", 0, 0x20 | 0x1000, 0))  # MS_REMOUNT|MS_BIND
probe("remount-proc-sys-rw", lambda: call(165, b"none", b"/proc/sys", 0, 0x20 | 0x1000, 0))
probe("umount-agent-code", lambda: call(166, b"/opt/hutch/lib/hutch", 2))
probe("umount-run-dir", lambda: call(166, b"/run/hutch", 2))
probe("open-tree", lambda: call(428, -100, b"/", 1))
probe("fsopen-overlay", lambda: call(430, b"overlay", 0))
probe("mount-command", lambda: "refused" if subprocess.run(["mount", "-t", "tmpfs", "none", "/mnt"],
      capture_output=True).returncode != 0 else "LEAK: mount ran")
probe("chroot", lambda: call(161, b"/tmp"))
# device nodes
probe("mknod-char-mem", lambda: os.mknod("/root/mem", 0o600 | 0o020000, os.makedev(1, 1)))
probe("mknod-block-disk", lambda: os.mknod("/root/disk", 0o600 | 0o060000, os.makedev(8, 0)))
probe("mknod-kmsg-in-dev", lambda: os.mknod("/dev/kmsg", 0o600 | 0o020000, os.makedev(1, 11)))
probe("open-made-char-mem", lambda: os.open("/root/mem", os.O_RDWR))
def mknod_command():
    if subprocess.run(["mknod", "/tmp/sda", "b", "8", "0"], capture_output=True).returncode != 0:
        return "refused"
    try:  # gVisor's tmpfs takes the node, which opens none of the host's devices
        os.close(os.open("/tmp/sda", os.O_RDONLY))
    except OSError as exc:
        return "made, opens nothing: " + outcome_of(exc)
    return "LEAK: mknod ran and the node opens"
probe("mknod-command", mknod_command)
probe("open-made-kmsg", lambda: os.close(os.open("/dev/kmsg", os.O_RDONLY)))
# /proc/sys, /proc's kernel knobs and /sys
# The kernel's knobs belong to the host's root (EACCES); sysrq where the kernel has no magic SysRq: ENOENT.
probe("write-core-pattern", lambda: write("/proc/sys/kernel/core_pattern", b"|/tmp/x"))
probe("write-sysrq-sysctl", lambda: write("/proc/sys/kernel/sysrq", b"1"))
probe("write-drop-caches", lambda: write("/proc/sys/vm/drop_caches", b"3"))
probe("write-ip-forward", lambda: write("/proc/sys/net/ipv4/ip_forward", b"1"))
probe("write-sysrq-trigger", lambda: write("/proc/sysrq-trigger", b"h"))
probe("sys-is-empty", lambda: "clean" if not os.listdir("/sys") else
      "gVisor's own" if GVISOR else "LEAK: " + ",".join(os.listdir("/sys")))
probe("sethostname", lambda: call(170, b"owned", 5))
probe("lower-oom-score", lambda: write("/proc/self/oom_score_adj", b"-1000"))
import resource
def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
probe("raise-nofile", raise_nofile)
probe("ptrace-agent", lambda: call(101, 16, 1, 0, 0))
probe("agent-memory", lambda: os.close(os.open("/proc/1/mem", os.O_RDWR)))
# overlayfs's trusted.* metadata needs the host's CAP_SYS_ADMIN (its user.* form, which the
# kernel stores escaped: `rootfs-lower-layer`).
probe("overlay-xattr-trusted", lambda: os.setxattr("/usr", "trusted.overlay.redirect", b"/../../.."))
# kernel keyrings
probe("keyctl-join-session", lambda: call(250, 1, 0))  # KEYCTL_JOIN_SESSION_KEYRING
probe("keyctl-user-keyring", lambda: call(250, 0, -4, 0))
probe("add-key-user-keyring", lambda: call(248, b"user", b"selftest", b"x", 1, -4))
probe("request-key", lambda: call(249, b"user", b"selftest", 0, -4))
# unshare and nested user namespaces
probe("unshare-user", lambda: call(272, 0x10000000))
probe("unshare-mount", lambda: call(272, 0x00020000))
probe("unshare-net", lambda: call(272, 0x40000000))
probe("unshare-pid", lambda: call(272, 0x20000000))
probe("clone-newuser", lambda: call(56, 0x10000000 | 17, 0, 0, 0, 0))
probe("clone3", lambda: call(435, 0, 0))
probe("setns-pid-1-mnt", lambda: call(308, os.open("/proc/1/ns/mnt", os.O_RDONLY), 0))
for flags in ("-U", "-m", "-n", "-Ur"):
    probe(f"unshare-command{flags}", lambda flags=flags: "refused" if subprocess.run(["unshare", flags, "true"],
          capture_output=True).returncode != 0 else "LEAK: unshare " + flags + " ran")
# setuid-root and file-capability binaries made by root, run as the sandbox user
import shutil
shutil.copy("/usr/bin/python3", "/usr/local/bin/rootpy")
os.chmod("/usr/local/bin/rootpy", 0o4755)
def file_caps(name, caps):
    # security.capability v2: `caps` permitted and effective
    shutil.copy("/usr/bin/python3", name)
    os.setxattr(name, "security.capability", struct.pack("<IIIII", 0x02000001, caps, 0, 0, 0))
probe("set-file-capability-admin", lambda: file_caps("/usr/local/bin/cappy", (1 << 21) | (1 << 2)))
probe("set-file-capability-dac", lambda: file_caps("/usr/local/bin/dacpy", 1 << 1))
AS_USER = ("import os; s = open('/proc/self/status').read(); "
           "print(os.geteuid(), [l.split()[1] for l in s.splitlines() if l.startswith('CapEff')][0])")
def as_user(binary):
    out = subprocess.run([binary, "-c", AS_USER], user=1000, group=1000, extra_groups=[], capture_output=True,
                         text=True)
    euid, cap = (out.stdout.split() + ["?", "?"])[:2]
    return "user, no capabilities" if euid == "1000" and int(cap, 16) == 0 else "LEAK: euid " + euid + " caps " + cap
probe("setuid-root-binary-run-as-user", lambda: as_user("/usr/local/bin/rootpy"))
probe("file-capability-binary-run-as-user", lambda: as_user("/usr/local/bin/cappy"))
probe("dac-override-binary-run-as-user", lambda: as_user("/usr/local/bin/dacpy"))
# raw sockets and the network stack
probe("raw-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
probe("raw-socket-v6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
probe("packet-socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
def link_down():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", 0))  # SIOCSIFFLAGS: lo down
probe("set-link-down", link_down)
probe("bind-privileged-port", lambda: socket.socket().bind(("127.0.0.1", 80)))
""".replace("__FORBIDDEN__", repr(FORBIDDEN_CAPS)),
    {
        "is-root-inside": allowed("root"),
        "uid-map": allowed("namespaced root"),
        "gid-map": allowed("namespaced"),
        "forbidden-effective-capabilities": allowed("none"),
        "forbidden-bounding-capabilities": allowed("none"),
        "no-new-privs": allowed("set"),
        "seccomp": allowed("filtered"),
        "mount-tmpfs": DENIED,
        "mount-proc": DENIED,
        "remount-root-rw": DENIED,
        "remount-proc-sys-rw": DENIED,
        "umount-agent-code": DENIED,
        "umount-run-dir": DENIED,
        "open-tree": DENIED,
        "fsopen-overlay": DENIED,
        "mount-command": allowed("refused"),
        "chroot": DENIED,
        "mknod-char-mem": DENIED,
        "mknod-block-disk": DENIED,
        "mknod-kmsg-in-dev": DENIED,
        "open-made-char-mem": MISSING,
        "mknod-command": allowed("refused"),
        "open-made-kmsg": MISSING,
        "write-core-pattern": allowed("EACCES"),
        "write-sysrq-sysctl": allowed("EACCES", "ENOENT"),
        "write-drop-caches": allowed("EACCES"),
        "write-ip-forward": allowed("EACCES"),
        "write-sysrq-trigger": allowed("EACCES", "ENOENT"),
        "sys-is-empty": CLEAN,
        "sethostname": DENIED,
        "lower-oom-score": allowed("EACCES"),
        "raise-nofile": allowed("ValueError"),
        "ptrace-agent": DENIED,
        # The agent is root of the same namespaces, holding nothing of the host's (hutch treats
        # what its socket answers as untrusted): root inside may already do all it can.
        "agent-memory": allowed("ok"),
        "overlay-xattr-trusted": DENIED,
        "keyctl-join-session": DENIED,
        "keyctl-user-keyring": DENIED,
        "add-key-user-keyring": DENIED,
        "request-key": DENIED,
        "unshare-user": DENIED,
        "unshare-mount": DENIED,
        "unshare-net": DENIED,
        "unshare-pid": DENIED,
        "clone-newuser": DENIED,
        "clone3": allowed("ENOSYS"),
        "setns-pid-1-mnt": DENIED,
        **{f"unshare-command{flags}": allowed("refused") for flags in ("-U", "-m", "-n", "-Ur")},
        "set-file-capability-admin": allowed("ok"),
        "set-file-capability-dac": allowed("ok"),
        "setuid-root-binary-run-as-user": allowed("user, no capabilities"),
        # Capabilities beyond the bounding set with the effective bit: the kernel refuses the exec.
        "file-capability-binary-run-as-user": allowed("EPERM"),
        # One within it: no_new_privs grants nothing.
        "dac-override-binary-run-as-user": allowed("user, no capabilities"),
        "raw-socket": DENIED,
        "raw-socket-v6": DENIED,
        "packet-socket": DENIED,
        "set-link-down": DENIED,
        "bind-privileged-port": allowed("ok"),
    },
    overrides={
        # Root inside a gVisor instance meets gVisor's kernel, none of whose objects is the host's:
        # nodes made on its /dev open nothing (ENXIO), its /proc/sys, /sys and OOM scores are its
        # own (the host's OOM killer sees the sentry), it keeps no file capabilities or trusted.*
        # attributes (ENOTSUP), and its network stack is its own loopback-only one.
        ROOT_GVISOR: {
            "uid-map": allowed("gVisor's own (judged on the host)"),
            "gid-map": allowed("gVisor's own (judged on the host)"),
            "mknod-kmsg-in-dev": allowed("ok"),
            "open-made-kmsg": allowed("ENXIO"),
            "mknod-command": allowed("made, opens nothing: ENXIO"),
            "write-core-pattern": allowed("EPERM"),
            "write-sysrq-sysctl": allowed("EPERM"),
            "write-drop-caches": allowed("EPERM"),
            "write-ip-forward": allowed("ok"),
            "write-sysrq-trigger": allowed("EPERM"),
            "sys-is-empty": allowed("gVisor's own"),
            "lower-oom-score": allowed("ok"),
            "agent-memory": allowed("EACCES"),
            "overlay-xattr-trusted": allowed("ENOTSUP"),
            "setns-pid-1-mnt": allowed("ENOENT"),
            "set-file-capability-admin": allowed("ENOTSUP"),
            "set-file-capability-dac": allowed("ENOTSUP"),
            "file-capability-binary-run-as-user": allowed("user, no capabilities"),
            "set-link-down": allowed("ENOTTY"),
        },
    },
    needs=(ROOT,),
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
    ROOT_KERNEL,
)
