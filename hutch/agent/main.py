"""Boot of the in-sandbox agent.

Order matters for start-up time and safety:
1. If we are pid 1 of the sandbox (bwrap `--as-pid-1`, gVisor), fork: the parent stays pid 1 and
   only reaps orphans, the child becomes the agent. One process that reaps everything would
   steal exit statuses from the agent's own `subprocess` children. Under gVisor we start as root
   with CAP_SETUID/CAP_SETGID only, and the child drops to the sandbox user, the reaper to
   `nobody` (`switch_user`). With a `go_fd` (bwrap), the agent then reads the byte the runtime
   writes there once it has recorded the instance, and exits on end of file: a sandbox whose
   start hutch did not live to record must not run unknown to anyone.
2. Apply the rlimits the runtime asked for (hard limits: user code cannot raise them again).
3. Close every inherited fd but stdio and the listening socket.
4. Serve. Service modules are imported on first use, and pre-imported by a background thread
   right after the socket is being served, so the first request does not wait for imports.
"""

from __future__ import annotations

import os
import sys

NOBODY = 65534


def _switch_user(uid: int, gid: int) -> None:
    """From root to `uid`: the kernel clears every capability with the change."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _become_reaper_or_agent(switch_user: list[int] | None = None) -> None:
    """As pid 1: fork off the agent and reap every child until the agent exits.

    `switch_user` ([uid, gid]): we start as root inside the sandbox, holding only CAP_SETUID and
    CAP_SETGID (gVisor, whose pid 1, unlike Linux's, the sandbox user could kill). The agent
    becomes that user; the reaper becomes `nobody`, whom the sandbox user cannot signal."""
    if os.getpid() != 1:
        if switch_user:
            _switch_user(*switch_user)
        return
    agent_pid = os.fork()
    if agent_pid == 0:
        if switch_user:
            _switch_user(*switch_user)
        return
    if switch_user:
        _switch_user(NOBODY, NOBODY)
    os.closerange(3, 1 << 16)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == agent_pid:
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _apply_rlimits(rlimits: dict[str, list[int]]) -> None:
    import resource

    for name, (soft, hard) in rlimits.items():
        which = getattr(resource, f"RLIMIT_{name.upper()}")
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY and (hard < 0 or hard > current_hard):
            hard = current_hard  # rlimits can only be lowered here
        if soft < 0 or (hard >= 0 and soft > hard):
            soft = hard
        resource.setrlimit(which, (soft, hard))


def _listener(config):
    import socket

    if config.listen_fd is not None:
        return socket.socket(fileno=config.listen_fd)
    if config.listen:
        return _tcp_listener(config.listen)
    path = config.socket_path
    if not path:
        raise SystemExit("hutch-agent: no listening fd, no --socket path and no --listen address")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    try:
        os.chmod(path, 0o600)  # the host connects as root; no other user inside may
    except OSError:
        pass  # gVisor's host socket: its run directory is the sandbox user's alone anyway
    sock.listen(128)
    return sock


def _tcp_listener(address: str):
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise SystemExit(f"hutch-agent: --listen wants HOST:PORT, not {address!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, int(port)), family=family, backlog=128)
    # Accepted sockets inherit it (Linux): small answers go out at once, not after Nagle's 40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _parse_args(argv: list[str], raw: dict) -> dict:
    # argparse costs milliseconds to import; a few flags do not need it.
    args = iter(argv)
    for arg in args:
        if arg == "--socket":
            raw["socket_path"] = next(args)
        elif arg == "--listen":
            raw["listen"] = next(args)
        elif arg == "--home":
            raw["home"] = next(args)
        elif arg == "--prestart-kernel":
            raw["prestart_kernel"] = True
        else:
            raise SystemExit(f"hutch-agent: unknown argument {arg!r}")
    return raw


def _redirect_stdio(log_path: str | None) -> None:
    """Point stdio away from the host: the pipe bwrap was given is for set-up errors only.
    Without `log_path`, stdout and stderr go nowhere."""
    null = os.open("/dev/null", os.O_RDWR)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else os.dup(null)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def decode_config(value: str) -> dict:
    """`HUTCH_AGENT`: JSON, or `marshal:<hex>` from the runtime. The agent runs on the very same
    interpreter as hutch, and marshal is built in, while json costs ~6 ms to import at boot."""
    if value.startswith("marshal:"):
        import marshal

        return marshal.loads(bytes.fromhex(value[8:]))
    if not value:
        return {}
    import json

    return json.loads(value)


def main(argv: list[str] | None = None) -> None:
    raw = decode_config(os.environ.pop("HUTCH_AGENT", ""))
    switch_user = raw.get("switch_user")
    if raw.get("log_path"):
        # As root (switch_user), the log would be root's: the agent opens it once it is the user.
        _redirect_stdio(None if switch_user else raw["log_path"])
    _become_reaper_or_agent(switch_user)
    if raw.get("log_path") and switch_user:
        _redirect_stdio(raw["log_path"])
    go_fd = raw.pop("go_fd", None)
    if go_fd is not None and os.read(go_fd, 1) != b"1":
        # The runtime writes this byte once it has recorded the instance. End of file instead: hutch
        # died while starting us, and nobody would ever know this sandbox runs.
        os._exit(1)

    from hutch.agent.config import AgentConfig

    config = AgentConfig(_parse_args(sys.argv[1:] if argv is None else argv, raw))
    if config.rlimits:
        _apply_rlimits(config.rlimits)
    keep = {0, 1, 2} | ({config.listen_fd} if config.listen_fd is not None else set())
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd of the listdir itself
    for path in config.python_path:
        if path not in sys.path:
            sys.path.append(path)
    try:
        os.chdir(config.home)
    except OSError:
        pass

    import signal

    # SIGTERM ends the agent through SystemExit, so atexit hooks (kernel cleanup) run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    from hutch.agent.app import AgentApp
    from hutch.agent.server import serve_forever

    listener = _listener(config)
    app = AgentApp(config)
    if config.rootful:
        import threading

        import hutch.agent.users  # noqa: F401  before serving: requests must not import it concurrently
        from hutch.agent.sudo import serve

        threading.Thread(target=serve, name="sudo", daemon=True).start()
    if config.releasable:
        _serve_releasable(config, app, listener)
    else:
        serve_forever(listener, app)


def _serve_releasable(config, app, listener) -> None:
    """Serve on a socket the agent bound itself, which it lets go of on the runtime's request
    (gVisor, before `runsc checkpoint`: a host socket cannot be saved) and binds again on SIGUSR1
    (sent after `runsc restore`, or after a checkpoint that did not happen)."""
    import signal
    import threading

    from hutch.agent.server import close_connections, serve_forever

    stop_r, stop_w = os.pipe()
    released = threading.Event()
    closed = threading.Event()
    rebind = threading.Event()

    def on_release() -> None:
        rebind.clear()
        closed.clear()
        released.set()
        os.write(stop_w, b"x")  # the accept loop returns, and the main thread closes the listener
        if not closed.wait(5):
            raise OSError("the agent's listener did not close")
        close_connections()

    # Run in the main thread, which then waits on `rebind`: the wait is interrupted for it.
    signal.signal(signal.SIGUSR1, lambda *_: rebind.set())
    app.on_release = on_release
    while True:
        serve_forever(listener, app, stop_r)
        if not released.is_set():
            return  # the listener failed for another reason: end as before
        os.read(stop_r, 1)
        listener.close()
        closed.set()
        while not rebind.wait(1.0):
            pass
        released.clear()
        listener = _listener(config)


if __name__ == "__main__":
    main()
