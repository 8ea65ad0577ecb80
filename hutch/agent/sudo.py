"""`sudo` in instances with a root file system of their own: the command runs as root, started by
the agent for the caller.

bubblewrap sets no_new_privs on every sandbox (so nothing inside can gain privileges by exec'ing
a setuid binary), which makes Debian's setuid `sudo` useless. Instead the runtime mounts this
program over `/usr/bin/sudo` (`hutch.runtime.rootfs`); it hands its command line, environment,
working directory and its stdin/stdout/stderr (as file descriptors) to the agent, which runs as
root inside, over a Unix socket in the instance's own abstract namespace; the agent starts the
command as the target user, relays signals the caller receives, and answers with the exit
status. Every user of an instance may do this without a password, as in E2B's templates: the
instance is the boundary, and root inside it is an unprivileged host uid.

Options understood: `-u USER`, `-E`, `-H`, `-i`, `-s`, `-n`, `-S`, `-k`, `-v`, `--`. `sudoers`
is not read.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SOCKET = b"\0hutch-sudo"
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KEPT = ("TERM", "LANG", "LANGUAGE", "COLORTERM", "DISPLAY", "TZ")
USAGE = "usage: sudo [-EHins] [-u user] command [arg ...]\n"


def _frame(payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    return struct.pack(">I", len(data)) + data


def _read_frame(conn: socket.socket) -> dict | None:
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = struct.unpack(">I", head)
    if size > 1 << 20:
        return None
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return json.loads(body)


# -- the client: /usr/bin/sudo ----------------------------------------------------------------


LONG = {"user": "user", "preserve-env": "preserve_env", "login": "login", "shell": "shell"}
SHORT = {"u": "user", "E": "preserve_env", "i": "login", "s": "shell"}
IGNORED_LONG = ("set-home", "non-interactive", "stdin", "reset-timestamp", "remove-timestamp", "validate")


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts: dict = {"user": "root", "preserve_env": False, "login": False, "shell": False, "noop": False}
    args = iter(argv)
    for arg in args:
        if arg == "--":
            return opts, list(args)
        if not arg.startswith("-") or arg == "-":
            return opts, [arg, *args]
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            if name == "user":
                opts["user"] = value or next(args, "")
            elif name in LONG:
                opts[LONG[name]] = True
            elif name in IGNORED_LONG:
                opts["noop"] = opts["noop"] or name in ("reset-timestamp", "remove-timestamp", "validate")
            else:
                raise SystemExit(f"sudo: unrecognized option '--{name}'\n{USAGE}")
            continue
        flags = arg[1:]
        for index, flag in enumerate(flags):
            if flag == "u":
                opts["user"] = flags[index + 1 :] or next(args, "")
                break
            if flag in SHORT:
                opts[SHORT[flag]] = True
            elif flag in "kKv":
                opts["noop"] = True
            elif flag not in "HnSA":
                raise SystemExit(f"sudo: invalid option -- '{flag}'\n{USAGE}")
    return opts, []


def main() -> None:
    import pwd

    opts, command = _parse(sys.argv[1:])
    if not command and not (opts["login"] or opts["shell"]):
        if opts["noop"]:
            sys.exit(0)
        sys.stderr.write(USAGE)
        sys.exit(1)
    name = opts["user"]
    if name.startswith("#") and name[1:].isdigit():
        target = pwd.getpwuid(int(name[1:]))
    else:
        try:
            target = pwd.getpwnam(name)
        except KeyError:
            sys.stderr.write(f"sudo: unknown user {name}\n")
            sys.exit(1)
    caller = os.getuid()
    try:
        caller_name = pwd.getpwuid(caller).pw_name
    except KeyError:
        caller_name = str(caller)
    shell = target.pw_shell or "/bin/sh"
    if opts["login"]:
        argv = [shell, "-l", *(["-c", " ".join(command)] if command else [])]
    elif opts["shell"]:
        argv = [os.environ.get("SHELL", shell), *(["-c", " ".join(command)] if command else [])]
    else:
        argv = command
    if opts["preserve_env"]:
        env = dict(os.environ)
    else:
        env = {k: v for k, v in os.environ.items() if k in KEPT or k.startswith("LC_")}
        env["PATH"] = SECURE_PATH
        env["HOME"] = target.pw_dir
    env.update(
        {
            "USER": target.pw_name,
            "LOGNAME": target.pw_name,
            "SHELL": shell,
            "SUDO_USER": caller_name,
            "SUDO_UID": str(caller),
            "SUDO_GID": str(os.getgid()),
            "SUDO_COMMAND": " ".join(argv),
        }
    )
    cwd = target.pw_dir if opts["login"] else os.getcwd()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(SOCKET)
    except OSError as exc:
        sys.stderr.write(f"sudo: cannot reach the sandbox's agent: {exc.strerror}\n")
        sys.exit(1)
    request = {"argv": argv, "env": env, "cwd": cwd, "uid": target.pw_uid, "gid": target.pw_gid, "user": name}
    socket.send_fds(conn, [_frame(request)], [0, 1, 2])

    def relay(signum: int, _frame_: object) -> None:
        try:
            conn.sendall(_frame({"signal": signum}))
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, relay)
    while True:
        try:
            answer = _read_frame(conn)
        except InterruptedError:
            continue
        if answer is None:
            sys.stderr.write("sudo: the sandbox's agent went away\n")
            sys.exit(1)
        if "error" in answer:
            sys.stderr.write(f"sudo: {answer['error']}\n")
            sys.exit(1)
        if "exit" in answer:
            code = int(answer["exit"])
            if code < 0:  # killed by a signal: die the same way, as a shell would report it
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            sys.exit(code)


# -- the agent's side --------------------------------------------------------------------------


def serve() -> None:
    """Accept `sudo` requests forever (a daemon thread of a root agent)."""
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(SOCKET)
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_run, args=(conn,), name="sudo", daemon=True).start()


def _run(conn: socket.socket) -> None:
    import pwd
    import subprocess

    fds: list[int] = []
    try:
        data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 3)
        if len(data) < 4 or len(fds) != 3:
            return
        (size,) = struct.unpack(">I", data[:4])
        body = data[4:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                return
            body += chunk
        request = json.loads(body)
        uid, gid = int(request["uid"]), int(request["gid"])
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = os.getgrouplist(name, gid)
        except (KeyError, OSError):
            groups = [gid]
        try:
            child = subprocess.Popen(
                request["argv"], stdin=fds[0], stdout=fds[1], stderr=fds[2], cwd=request["cwd"],
                env=request["env"], user=uid, group=gid, extra_groups=groups, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            conn.sendall(_frame({"error": f"{request['argv'][0]}: {exc.strerror}"}))
            return
        finally:
            for fd in fds:
                os.close(fd)
            fds = []
        relay = _relay_signals(conn, child.pid)
        code = child.wait()
        relay.set()
        conn.sendall(_frame({"exit": code}))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _relay_signals(conn: socket.socket, pid: int):
    """Deliver the signals the caller relays to the command's process group until it ends;
    a caller that goes away hangs the command up."""
    import threading

    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            try:
                message = _read_frame(conn)
            except (OSError, ValueError):
                message = None
            if done.is_set():
                return
            signum = int(message.get("signal", signal.SIGHUP)) if message else int(signal.SIGHUP)
            try:
                os.killpg(pid, signum)
            except (ProcessLookupError, PermissionError, ValueError):
                return
            if message is None:
                return

    threading.Thread(target=run, name="sudo-signals", daemon=True).start()
    return done
