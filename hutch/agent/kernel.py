"""One IPython kernel process, driven through jupyter_client without an event loop of our own.

Imported lazily (jupyter_client and zmq cost ~100 ms): only `hutch.agent.interpreter` imports
this module, and only when a kernel is about to start.

The kernel listens on `ipc` sockets (Unix sockets, not TCP: the sandbox's TCP ports belong to
user servers) whose paths, like the connection file and the kernel's log, live in a private
directory the interpreter owns. The hot path (sending an execute request, reading IOPub) uses
the client's zmq sockets directly and blocks in `zmq_poll`; jupyter_client's manager (which
runs small coroutines on a per-thread loop of its own) is only used to start, interrupt and
shut the process down.

A `Kernel` is not thread-safe: its owner (the context's lock) lets one thread use it at a
time. Only `kill()` may be called from any thread, to stop a kernel that is busy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from queue import Empty

import zmq
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import KernelManager

from hutch.errors import Unavailable

# One zmq context (one IO thread) for every kernel's sockets. Receive queues are unbounded: a
# SUB socket drops messages past its high-water mark, and a dropped "idle" would leave an
# execution waiting forever; output waits here when the HTTP client reads slowly.
ZMQ_CONTEXT = zmq.Context()
ZMQ_CONTEXT.setsockopt(zmq.RCVHWM, 0)

READY_TIMEOUT = 60.0  # seconds a new kernel may take until its IOPub reaches us
LOG_TAIL = 2000  # bytes of the kernel's log quoted when it fails to start


class Kernel:
    def __init__(
        self,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        workdir: str,
        name: str,
        as_user: dict | None = None,
        language: str = "python",
        colon_ipc: bool = False,
        tcp: bool = False,
        late_output: bool = False,
        interrupt_mode: str = "signal",
    ) -> None:
        self.name = name
        self.colon_ipc = colon_ipc  # the kernel names its ipc sockets `{ip}:{port}`, not `{ip}-{port}`
        self.late_output = late_output  # may publish a cell's output after the cell's idle (Deno's)
        self.as_user = as_user or {}  # Popen's user/group/extra_groups: a root agent's kernels run as the user
        self.cwd = cwd
        self.log_path = os.path.join(workdir, f"{name}.log")
        km = KernelManager(
            transport="tcp" if tcp else "ipc",
            ip="127.0.0.1" if tcp else os.path.join(workdir, name),
            connection_file=os.path.join(workdir, f"{name}.json"),
            context=ZMQ_CONTEXT,
        )
        # The kernel command is ours, not a kernelspec found on disk.
        km._kernel_spec = KernelSpec(argv=argv, display_name=language, language=language, interrupt_mode=interrupt_mode)
        self.km = km
        self.env = env
        self.client = None
        self.popen = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the process and connect to it; raises Unavailable (with its log) when it fails."""
        if self.colon_ipc and self.km.transport == "ipc":
            self._link_colon_sockets()
        spawning: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        if self.as_user:
            from hutch.agent import users  # imported at boot by a root agent

            # Written by the user the kernel runs as (it reads it), then started with root's ids.
            self.km.write_connection_file()
            spawning = users.spawning
        with open(self.log_path, "ab") as log:
            try:
                with spawning():
                    self.km.start_kernel(
                        cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **self.as_user
                    )
            except OSError as exc:
                self.shutdown()
                raise Unavailable(f"could not start the kernel: {exc}") from None
        self.popen = self.km.provisioner.process  # type: ignore[union-attr]
        client = self.km.client(context=ZMQ_CONTEXT)
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self.client = client  # type: ignore[assignment]
        try:
            self._wait_ready(timeout)
        except Unavailable:
            self.shutdown()
            raise

    def _link_colon_sockets(self) -> None:
        """Kernels not built on ipykernel (tslab, IRkernel) bind `ipc://{ip}:{port}` where
        jupyter_client connects to `ipc://{ip}-{port}`: each name jupyter_client uses becomes a
        link to the kernel's (zmq retries the connect until the kernel has bound it)."""
        km = self.km
        km.write_connection_file()  # chooses the ports; start_kernel keeps a file already written
        for port in (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port):
            link = f"{km.ip}-{port}"
            try:
                os.symlink(os.path.basename(f"{km.ip}:{port}"), link)
            except FileExistsError:
                pass

    def _wait_ready(self, timeout: float) -> None:
        """Until IOPub is known to reach us: after that no output of a cell can be lost.

        Proof is the kernel's `iopub_welcome` (sent when our subscription arrives, JEP 65) or
        the IOPub status of one of our kernel_info requests (kernels without the welcome).
        """
        deadline = time.monotonic() + timeout
        asked: set[str] = set()
        while time.monotonic() < deadline:
            asked.add(self.client.kernel_info())  # type: ignore[attr-defined]
            retry_at = time.monotonic() + 0.2
            while time.monotonic() < retry_at:
                msg = self.next_message(0.05)
                if msg is None:
                    if not self.alive():
                        raise Unavailable(f"the kernel exited during start-up{self._log_tail()}")
                    continue
                if msg["msg_type"] == "iopub_welcome" or (
                    msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") in asked
                ):
                    return
        raise Unavailable(f"the kernel did not answer within {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL))
                tail = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f": {tail}" if tail else ""

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def interrupt(self) -> None:
        """SIGINT to the kernel's process group (a KeyboardInterrupt in a Python cell), or an
        interrupt_request on the control channel for kernels that ask for it (Deno's)."""
        if self.alive():
            try:
                self.km.interrupt_kernel()
            except (OSError, RuntimeError):
                pass

    def kill(self) -> None:
        """SIGKILL the kernel and everything it started. Safe from any thread."""
        popen = self.popen
        if popen is None or popen.returncode is not None:
            return
        try:
            os.killpg(popen.pid, signal.SIGKILL)  # the kernel leads its own session
        except (ProcessLookupError, PermissionError):
            try:
                popen.kill()
            except ProcessLookupError:
                pass

    def shutdown(self) -> None:
        """Stop the process (at once) and remove its connection file, sockets and log."""
        if self.client is not None:
            try:
                self.client.stop_channels()
            except Exception:
                pass
            self.client = None
        self.kill()
        try:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
            else:
                self.km.cleanup_resources()
        except Exception:
            pass
        for path in (self.km.connection_file, self.log_path):
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            self.km.cleanup_ipc_files()
        except Exception:
            pass
        if self.colon_ipc:
            km = self.km
            for port in (km.shell_port, km.iopub_port, km.stdin_port, km.control_port, km.hb_port):
                for path in (f"{km.ip}:{port}", f"{km.ip}-{port}"):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass

    # -- messages ------------------------------------------------------------------------------

    def execute(self, code: str, silent: bool = False) -> str:
        """Send an execute request; returns its msg_id (the parent id of its IOPub messages)."""
        return self.client.execute(  # type: ignore[attr-defined]
            code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False
        )

    def request_info(self) -> str:
        """Send a kernel_info request; returns its msg_id."""
        return self.client.kernel_info()  # type: ignore[attr-defined]

    def next_message(self, timeout: float) -> dict | None:
        """The next IOPub message, or None when none came within `timeout` seconds."""
        try:
            return self.client.iopub_channel.get_msg(timeout=timeout)  # type: ignore[attr-defined]
        except Empty:
            return None

    def drain_shell(self) -> None:
        """Drop the shell replies nobody waits for (progress is read on IOPub)."""
        sock = self.client.shell_channel.socket  # type: ignore[attr-defined]
        while sock.poll(0):
            sock.recv_multipart()
