"""The agent's accept loop: one thread per connection, requests handed to an app callable.

`app(request)` returns a `Response`, a `StreamResponse` or a `Takeover` (see `hutch.agent.http`).
Errors from the hutch tree become their HTTP status with the envd error body; anything else is
logged to stderr and answered 500, never a traceback on the wire.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time

from hutch.agent.http import (
    BadRequest,
    ClientGone,
    Connection,
    Response,
    StreamResponse,
    Takeover,
    error_response,
)
from hutch.errors import HutchError


def log(message: str) -> None:
    sys.stderr.write(f"hutch-agent: {message}\n")
    sys.stderr.flush()


# The connections being served, for `close_connections` (gVisor's hibernation).
_connections: set[socket.socket] = set()
_connections_lock = threading.Lock()
_local = threading.local()  # the connection this thread serves


def serve_connection(sock: socket.socket, app) -> None:
    conn = Connection(sock)
    with _connections_lock:
        _connections.add(sock)
    _local.sock = sock
    try:
        while True:
            try:
                req = conn.read_request()
            except BadRequest as exc:
                conn.send_response(error_response(exc), keep_alive=False)
                return
            if req is None:
                return
            keep_alive = req.keep_alive
            try:
                resp = app(req)
            except HutchError as exc:
                resp = error_response(exc)
            except Exception as exc:
                import traceback

                log(f"{req.method} {req.path} failed:\n{traceback.format_exc()}")
                resp = error_response(HutchError(f"internal error: {exc.__class__.__name__}: {exc}"))
            if isinstance(resp, Takeover):
                resp.run(conn)
                return
            if isinstance(resp, StreamResponse):
                # A streaming handler reads the request body as it goes, so draining waits.
                try:
                    conn.send_stream(resp, keep_alive)
                except ClientGone:
                    return
            else:
                conn.send_response(resp, keep_alive, head_only=req.method == "HEAD")
            after_response = getattr(app, "after_response", None)
            if after_response is not None:
                after_response()
            if not keep_alive:
                return
            if not req.body.done:
                # Unread body bytes would be parsed as the next request: drain them if small,
                # otherwise close the connection.
                try:
                    req.body.read_all(1 << 20)
                except (HutchError, OSError):
                    return
    except (OSError, BadRequest):
        return
    finally:
        try:
            conn.rfile.close()
            sock.close()
        except OSError:
            pass
        with _connections_lock:
            _connections.discard(sock)


def serve_forever(listener: socket.socket, app, stop_fd: int | None = None) -> None:
    """Accept and serve connections; returns when `stop_fd` becomes readable (a pipe: a thread
    cannot wake another's accept() on a Unix socket by closing or shutting it down)."""
    poller = None
    if stop_fd is not None:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
    while True:
        if poller is not None and any(fd == stop_fd for fd, _ in poller.poll()):
            return
        try:
            sock, _ = listener.accept()
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno in (9, 22):  # listener closed: shutting down
                return
            log(f"accept failed: {exc}")
            continue
        try:
            threading.Thread(target=serve_connection, args=(sock, app), daemon=True).start()
        except RuntimeError:
            # No thread left under the pids limit (a fork bomb, say): say so instead of hanging.
            _refuse(sock, b'{"code":503,"message":"the sandbox has no process or thread left to serve this"}')


def open_tcp_sockets() -> int:
    """How many TCP sockets the sandbox holds (all processes': gVisor lists every socket)."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, "rb") as f:
                count += max(0, len(f.read().strip().splitlines()) - 1)  # after the header
        except OSError:
            pass
    return count


def close_connections(timeout: float = 2.0) -> None:
    """End every connection but the caller's, for a checkpoint of the whole sandbox (gVisor's
    hibernation: they are host sockets, which `runsc checkpoint` cannot save): their threads,
    woken by a shutdown, close them. Returns once they have, or after `timeout`."""
    own = getattr(_local, "sock", None)
    deadline = time.monotonic() + timeout
    while True:
        with _connections_lock:
            others = [sock for sock in _connections if sock is not own]
        if not others or time.monotonic() > deadline:
            break
        for sock in others:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # a blocked reader or writer fails and closes it
            except OSError:
                pass
        time.sleep(0.01)
    if others:
        log(f"release: {len(others)} connection(s) still open after {timeout:.0f} s")


def _refuse(sock: socket.socket, body: bytes) -> None:
    try:
        sock.sendall(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
    except OSError:
        pass
    finally:
        sock.close()


def method_not_allowed(method: str, path: str) -> Response:
    return error_response(HutchError(f"{method} is not allowed on {path}"), status=405)
