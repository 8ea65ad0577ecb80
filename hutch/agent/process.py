"""envd's `process.Process` service: start, re-attach to, feed, signal and list processes.

Each process runs in a session of its own (so a signal reaches its whole group), with pipes or a
PTY. One pump thread per process waits on its output fds and on a pidfd (under gVisor, which has no
pidfd_open, on a pipe closed by a thread blocked in `waitid(WNOWAIT)`), and hands events to the
streams subscribed to it: the `Start` stream that created it and any number of `Connect` streams
that re-attach later (they see output from the moment they attach). A process outlives the
request that started it; output nobody is subscribed to is dropped, as in envd.

Events on the wire (JSON codec, bytes as base64):
    {"event": {"start": {"pid": N}}}
    {"event": {"data": {"stdout" | "stderr" | "pty": "<base64>"}}}
    {"event": {"keepalive": {}}}
    {"event": {"end": {"exitCode": N, "exited": bool, "status": "exit status N", "error"?: str}}}
"""

from __future__ import annotations

import binascii
import collections
import contextlib
import errno
import os
import select
import signal
import subprocess
import threading

from hutch.agent import connect, paths
from hutch.agent.config import AgentConfig
from hutch.agent.http import Request
from hutch.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

TICK = 0.25  # seconds between checks that a streaming client is still there
READ_SIZE = 64 * 1024
EXIT_POLL = 0.05  # seconds between exit checks when no exit fd could be had
BACKLOG_LIMIT = 16 * 1024 * 1024  # bytes a slow subscriber may fall behind before output waits
SIGNALS = {
    "SIGNAL_SIGTERM": signal.SIGTERM,
    "SIGNAL_SIGKILL": signal.SIGKILL,
    15: signal.SIGTERM,
    9: signal.SIGKILL,
}
KEEPALIVE: dict[str, object] = {"event": {"keepalive": {}}}


def _exit_fd(pid: int) -> int | None:
    """An fd that becomes readable when child `pid` exits, without reaping it; None when neither a
    pidfd nor a waiting thread can be had (the caller then polls `_has_exited`)."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    # No pidfd (gVisor): a thread waits for the exit, leaving the zombie for Popen.wait.
    read_end, write_end = os.pipe2(os.O_CLOEXEC)

    def wait() -> None:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass  # already reaped
        finally:
            os.close(write_end)  # EOF: readable

    try:
        threading.Thread(target=wait, name=f"exit-{pid}", daemon=True).start()
    except RuntimeError:  # the pids limit
        os.close(read_end)
        os.close(write_end)
        return None
    return read_end


def _has_exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
    except ChildProcessError:
        return True


def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def unb64(text: str) -> bytes:
    try:
        return binascii.a2b_base64(text)
    except (binascii.Error, TypeError):
        raise InvalidArgument("input is not valid base64") from None


class Subscription:
    """The events one stream has not sent yet."""

    def __init__(self) -> None:
        self.events: collections.deque = collections.deque()
        self.backlog = 0
        self.cond = threading.Condition()
        self.closed = False

    def put(self, event: dict, size: int = 0) -> None:
        with self.cond:
            while size and self.backlog > BACKLOG_LIMIT and not self.closed:
                self.cond.wait(TICK)  # the client reads slowly: slow the process down
            if self.closed:
                return
            self.events.append((event, size))
            self.backlog += size
            self.cond.notify_all()

    def get(self, timeout: float):
        with self.cond:
            if not self.events:
                self.cond.wait(timeout)
            if not self.events:
                return None
            event, size = self.events.popleft()
            self.backlog -= size
            self.cond.notify_all()
            return event


class ManagedProcess:
    def __init__(self, popen: subprocess.Popen, config: dict, tag: str | None, pty_master: int | None):
        self.popen = popen
        self.pid = popen.pid
        self.config = config
        self.tag = tag
        self.pty_master = pty_master
        self.subscribers: list[Subscription] = []
        self.lock = threading.Lock()
        self.end: dict | None = None

    def subscribe(self) -> Subscription:
        sub = Subscription()
        with self.lock:
            if self.end is not None:
                sub.put(self.end)
            else:
                self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with sub.cond:
            sub.closed = True
            sub.cond.notify_all()
        with self.lock:
            if sub in self.subscribers:
                self.subscribers.remove(sub)

    def publish(self, event: dict, size: int = 0) -> None:
        with self.lock:
            subscribers = list(self.subscribers)
        for sub in subscribers:
            sub.put(event, size)

    def info(self) -> dict:
        info = {"config": self.config, "pid": self.pid}
        if self.tag is not None:
            info["tag"] = self.tag
        return info

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)  # the whole session the process leads
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def write_input(self, data: bytes, to_pty: bool) -> None:
        if to_pty:
            if self.pty_master is None:
                raise FailedPrecondition(f"process {self.pid} has no PTY")
            os.write(self.pty_master, data)
            return
        stdin = self.popen.stdin
        if stdin is None or stdin.closed:
            raise FailedPrecondition(f"stdin of process {self.pid} is not open")
        try:
            stdin.write(data)
            stdin.flush()
        except BrokenPipeError:
            raise FailedPrecondition(f"process {self.pid} closed its stdin") from None


def end_event(returncode: int) -> dict:
    if returncode >= 0:
        end = {"exitCode": returncode, "exited": True, "status": f"exit status {returncode}"}
    else:
        try:
            name = signal.Signals(-returncode).name[3:].lower()
        except ValueError:
            name = str(-returncode)
        end = {"exitCode": -1, "exited": False, "status": f"signal: {_SIGNAL_WORDS.get(name, name)}"}
    return {"event": {"end": end}}


_SIGNAL_WORDS = {"kill": "killed", "term": "terminated", "int": "interrupt", "hup": "hangup"}


class ProcessService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.processes: dict[int, ManagedProcess] = {}
        self.lock = threading.Lock()
        rpc = connect.Service("process.Process")
        rpc.server_stream("Start")(self.start)
        rpc.server_stream("Connect")(self.connect)
        rpc.unary("List")(self.list)
        rpc.unary("SendInput")(self.send_input)
        rpc.client_stream("StreamInput")(self.stream_input)
        rpc.unary("SendSignal")(self.send_signal)
        rpc.unary("CloseStdin")(self.close_stdin)
        rpc.unary("Update")(self.update)
        self.rpc = rpc

    # -- lookup --------------------------------------------------------------------------------

    def find(self, selector: dict | None) -> ManagedProcess:
        selector = selector or {}
        with self.lock:
            if "pid" in selector:
                proc = self.processes.get(int(selector["pid"]))
                if proc is not None:
                    return proc
                raise NotFound(f"process with pid {selector['pid']} not found")
            if "tag" in selector:
                for proc in self.processes.values():
                    if proc.tag == selector["tag"]:
                        return proc
                raise NotFound(f"process with tag {selector['tag']!r} not found")
        raise InvalidArgument("a process selector needs a pid or a tag")

    # -- starting ------------------------------------------------------------------------------

    def spawn(self, request: dict) -> tuple[ManagedProcess, Subscription]:
        config = request.get("process") or {}
        cmd = config.get("cmd")
        if not cmd or not isinstance(cmd, str):
            raise InvalidArgument("process.cmd is required")
        args = config.get("args") or []
        envs = config.get("envs") or {}
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidArgument("process.args must be a list of strings")
        if not isinstance(envs, dict):
            raise InvalidArgument("process.envs must be an object")
        argv = [cmd, *args]
        if any("\x00" in part for part in argv):
            raise InvalidArgument("a NUL byte in the command line")
        env = self.config.process_env()
        as_user: dict = {}
        user = None
        if self.config.rootful:
            from hutch.agent import users  # imported at boot by a root agent

            user = users.current()
        default_cwd = self.config.user_home()
        if user is not None:
            as_user = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
            env.update({"HOME": user.home, "USER": user.name, "LOGNAME": user.name})
            if user.name == self.config.user:
                default_cwd = self.config.workdir
            if not os.path.isdir(default_cwd):
                default_cwd = "/"  # a user without a home (nobody)
        cwd = paths.resolve(config.get("cwd"), default_cwd)
        env.update({str(k): str(v) for k, v in envs.items()})
        pty_request = request.get("pty")
        master = slave = None
        # A root agent's request thread may act as the user through its effective ids (gVisor).
        spawning = users.spawning if user is not None else contextlib.nullcontext
        try:
            if pty_request is not None:
                master, slave = os.openpty()
                _set_winsize(master, (pty_request.get("size") or {}))
                env.setdefault("TERM", "xterm-256color")
                # `setsid -c` makes the PTY the controlling terminal without a preexec_fn.
                with spawning():
                    popen = subprocess.Popen(
                        ["setsid", "-c", *argv], stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, **as_user
                    )
                os.close(slave)
                slave = None
            else:
                with spawning():
                    popen = subprocess.Popen(
                        argv,
                        stdin=subprocess.PIPE if request.get("stdin") else subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        cwd=cwd,
                        env=env,
                        start_new_session=True,
                        **as_user,
                    )
        except FileNotFoundError as exc:
            for fd in (master, slave):
                if fd is not None:
                    os.close(fd)
            missing = exc.filename if exc.filename and exc.filename != cwd else argv[0]
            if exc.filename == cwd:
                raise paths.os_error(exc, cwd) from None
            raise InvalidArgument(f"failed to start process: {missing}: no such file or directory") from None
        except OSError as exc:
            for fd in (master, slave):
                if fd is not None:
                    os.close(fd)
            if exc.errno == 11:  # EAGAIN: the pids limit
                raise ResourceExhausted(f"failed to start process: {exc.strerror}") from None
            raise paths.os_error(exc, argv[0]) from None
        proc_config = {"cmd": cmd, "args": args, "envs": envs, "cwd": cwd}
        proc = ManagedProcess(popen, proc_config, request.get("tag"), master)
        sub = proc.subscribe()
        try:
            threading.Thread(target=self._pump, args=(proc,), name=f"pump-{proc.pid}", daemon=True).start()
        except RuntimeError:
            proc.signal(signal.SIGKILL)
            popen.wait()
            raise ResourceExhausted("no thread left to follow the process (the sandbox's pids limit)") from None
        with self.lock:
            self.processes[proc.pid] = proc
        return proc, sub

    def _pump(self, proc: ManagedProcess) -> None:
        """Move output to subscribers until the process exits, then publish its end."""
        popen = proc.popen
        streams: dict[int, str] = {}
        if proc.pty_master is not None:
            streams[proc.pty_master] = "pty"
        else:
            streams[popen.stdout.fileno()] = "stdout"  # type: ignore[union-attr]
            streams[popen.stderr.fileno()] = "stderr"  # type: ignore[union-attr]
        exit_fd = _exit_fd(proc.pid)
        try:
            exited = False
            while streams and not exited:
                if exit_fd is None:
                    readable, _, _ = select.select(list(streams), [], [], EXIT_POLL)
                    exited = _has_exited(proc.pid)
                else:
                    readable, _, _ = select.select([*streams, exit_fd], [], [])
                for fd in readable:
                    if fd == exit_fd:
                        exited = True
                        continue
                    if not self._read_into(proc, fd, streams):
                        del streams[fd]
            # The process is gone, or all its output is closed: collect what is left without
            # waiting for grandchildren that may hold the pipes open.
            for fd in list(streams):
                os.set_blocking(fd, False)
                try:
                    while self._read_into(proc, fd, streams):
                        pass
                except BlockingIOError:
                    pass
            returncode = popen.wait()
        finally:
            if exit_fd is not None:
                os.close(exit_fd)
        with self.lock:
            self.processes.pop(proc.pid, None)
        event = end_event(returncode)
        with proc.lock:
            proc.end = event
            subscribers, proc.subscribers = proc.subscribers, []
        for sub in subscribers:
            sub.put(event)
        for pipe in (popen.stdin, popen.stdout, popen.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if proc.pty_master is not None:
            os.close(proc.pty_master)

    @staticmethod
    def _read_into(proc: ManagedProcess, fd: int, streams: dict[int, str]) -> bool:
        try:
            data = os.read(fd, READ_SIZE)
        except OSError as exc:
            if isinstance(exc, BlockingIOError):
                raise
            data = b""  # EIO on a PTY whose last writer closed
        if not data:
            return False
        proc.publish({"event": {"data": {streams[fd]: b64(data)}}}, len(data))
        return True

    def _follow(self, proc: ManagedProcess, sub: Subscription, req: Request):
        """The events of one subscription, with keepalives, until the process ends."""
        interval = connect.keepalive_interval(req)

        def events():
            while True:
                event = sub.get(TICK)
                yield event
                if event is not None and "end" in event["event"]:
                    return

        try:
            yield from connect.with_keepalive(events(), interval, KEEPALIVE)
        finally:
            proc.unsubscribe(sub)

    # -- RPCs ----------------------------------------------------------------------------------

    def start(self, request: dict, req: Request):
        proc, sub = self.spawn(request)
        yield {"event": {"start": {"pid": proc.pid}}}
        yield from self._follow(proc, sub, req)

    def connect(self, request: dict, req: Request):
        proc = self.find(request.get("process"))
        sub = proc.subscribe()
        yield {"event": {"start": {"pid": proc.pid}}}
        yield from self._follow(proc, sub, req)

    def list(self, request: dict, req: Request) -> dict:
        with self.lock:
            return {"processes": [proc.info() for proc in self.processes.values()]}

    def send_input(self, request: dict, req: Request) -> dict:
        proc = self.find(request.get("process"))
        self._write(proc, request.get("input") or {})
        return {}

    def _write(self, proc: ManagedProcess, data: dict) -> None:
        if "pty" in data:
            proc.write_input(unb64(data["pty"]), to_pty=True)
        elif "stdin" in data:
            proc.write_input(unb64(data["stdin"]), to_pty=False)

    def stream_input(self, messages, req: Request) -> dict:
        proc = None
        for message in messages:
            if "start" in message:
                proc = self.find((message["start"] or {}).get("process"))
            elif "data" in message:
                if proc is None:
                    raise InvalidArgument("StreamInput must start with a start event")
                self._write(proc, (message["data"] or {}).get("input") or {})
        return {}

    def send_signal(self, request: dict, req: Request) -> dict:
        proc = self.find(request.get("process"))
        signum = SIGNALS.get(request.get("signal"))
        if signum is None:
            raise InvalidArgument(f"unsupported signal {request.get('signal')!r}")
        proc.signal(signum)
        return {}

    def close_stdin(self, request: dict, req: Request) -> dict:
        proc = self.find(request.get("process"))
        if proc.pty_master is not None:
            raise FailedPrecondition("a PTY has no separate stdin; send Ctrl+D (0x04) instead")
        stdin = proc.popen.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except BrokenPipeError:
                pass
        return {}

    def update(self, request: dict, req: Request) -> dict:
        proc = self.find(request.get("process"))
        pty_request = request.get("pty")
        if pty_request is not None:
            if proc.pty_master is None:
                raise FailedPrecondition(f"process {proc.pid} has no PTY")
            _set_winsize(proc.pty_master, pty_request.get("size") or {})
        return {}


def _set_winsize(fd: int, size: dict) -> None:
    import fcntl
    import struct
    import termios

    rows = int(size.get("rows") or 24)
    cols = int(size.get("cols") or 80)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
