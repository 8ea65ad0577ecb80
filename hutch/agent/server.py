"""The agent's accept loop: one thread per connection, requests handed to an app callable.

`app(request)` returns a `Response`, a `StreamResponse` or a `Takeover` (see `hutch.agent.http`).
Errors from the hutch tree become their HTTP status with the envd error body; anything else is
logged to stderr and answered 500, never a traceback on the wire.
"""

from __future__ import annotations

import socket
import sys
import threading

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


def serve_connection(sock: socket.socket, app) -> None:
    conn = Connection(sock)
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


def serve_forever(listener: socket.socket, app) -> None:
    while True:
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
