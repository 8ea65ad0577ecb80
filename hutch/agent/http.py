"""HTTP/1.1 for the in-sandbox agent: parse a request, read its body, write a response.

The agent must answer within a few milliseconds of its process starting, and on this kind of
machine `import asyncio` alone costs ~40 ms and `import h11` ~19 ms. So the agent speaks
HTTP/1.1 with blocking sockets and a thread per connection, parsed here by hand. Its only
client is hutch's gateway (or a test), over the instance's Unix socket.

Deliberately supported: keep-alive, Content-Length and chunked request bodies (streamed, never
buffered whole), `Expect: 100-continue`, chunked streaming responses, and handing the raw
connection to a handler (port forwarding, WebSocket pass-through).
"""

from __future__ import annotations

import select
import socket

from hutch.errors import HutchError, InvalidArgument, ResourceExhausted

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
READ_CHUNK = 64 * 1024

REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    206: "Partial Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    507: "Insufficient Storage",
}


class BadRequest(InvalidArgument):
    """The bytes on the wire are not a valid HTTP/1.1 request."""


class ClientGone(Exception):
    """The peer closed the connection while a response was being streamed."""


class Body:
    """A request body, read incrementally. `read()` returns b"" at the end."""

    __slots__ = ("_chunked", "_continue_sock", "_remaining", "_rfile", "done")

    def __init__(self, rfile, length: int | None, chunked: bool, continue_sock=None) -> None:
        self._rfile = rfile
        self._chunked = chunked
        self._remaining = 0 if chunked else (length or 0)
        self._continue_sock = continue_sock  # set when the client waits for "100 Continue"
        self.done = not chunked and not length

    def _send_continue(self) -> None:
        sock, self._continue_sock = self._continue_sock, None
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read(self, n: int = READ_CHUNK) -> bytes:
        if self.done:
            return b""
        if self._continue_sock is not None:
            self._send_continue()
        if self._chunked:
            if self._remaining == 0:
                size_line = self._rfile.readline(1026)
                if not size_line.endswith(b"\n"):
                    raise BadRequest("truncated chunk size")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadRequest("bad chunk size") from None
                if size == 0:
                    # trailers, then the blank line
                    while self._rfile.readline(MAX_HEAD_BYTES) not in (b"\r\n", b"\n", b""):
                        pass
                    self.done = True
                    return b""
                self._remaining = size
            data = self._rfile.read(min(n, self._remaining))
            if not data:
                raise BadRequest("body ended early")
            self._remaining -= len(data)
            if self._remaining == 0:
                self._rfile.readline(3)  # CRLF after the chunk data
            return data
        data = self._rfile.read(min(n, self._remaining))
        if not data:
            raise BadRequest("body ended early")
        self._remaining -= len(data)
        if self._remaining == 0:
            self.done = True
        return data

    def read_exact(self, n: int) -> bytes:
        """Exactly n bytes, or fewer only at the end of the body."""
        parts = []
        while n > 0:
            data = self.read(n)
            if not data:
                break
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            data = self.read()
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                raise ResourceExhausted(f"request body larger than {limit} bytes")
            parts.append(data)

    def __iter__(self):
        while True:
            data = self.read()
            if not data:
                return
            yield data

    def drain(self) -> None:
        if self._continue_sock is not None:
            # The client never sent the body; it will not, so there is nothing to drain.
            self.done = True
            return
        while self.read():
            pass


class Request:
    __slots__ = ("body", "conn", "headers", "method", "path", "query", "raw_head", "target", "version")

    def __init__(self, method, target, version, headers, raw_head, conn) -> None:
        self.method: str = method
        self.target: str = target
        self.version: str = version
        self.headers: dict[str, str] = headers
        self.raw_head: bytes = raw_head
        self.conn: Connection = conn
        path, _, query = target.partition("?")
        if path.startswith(("http://", "https://")):  # absolute-form, as proxies send it
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        self.path: str = path
        self.query: str = query
        self.body: Body = Body(None, 0, False)

    def query_params(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.query, keep_blank_values=True))

    def json(self, limit: int = 16 * 1024 * 1024):
        import json

        raw = self.body.read_all(limit)
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise InvalidArgument(f"request body is not valid JSON: {exc}") from None

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int = 200, body: bytes = b"", headers: list | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers or []


class StreamResponse:
    """A response sent with chunked encoding as its iterator yields.

    The iterator may yield None while it has nothing to send: the server then checks whether
    the client is still there, and closes the iterator (GeneratorExit inside it) if not.
    """

    __slots__ = ("chunks", "headers", "status")

    def __init__(self, status: int, chunks, headers: list | None = None) -> None:
        self.status = status
        self.chunks = chunks
        self.headers = headers or []


class Takeover:
    """The handler takes the raw connection; the server sends nothing and closes it afterwards."""

    __slots__ = ("run",)

    def __init__(self, run) -> None:
        self.run = run  # run(conn: Connection) -> None


def json_response(obj, status: int = 200, headers: list | None = None) -> Response:
    import json  # not at module level: json costs ~6 ms to import, and /health must not wait for it

    body = json.dumps(obj, separators=(",", ":")).encode()
    return Response(status, body, [("content-type", "application/json"), *(headers or [])])


def error_response(exc: HutchError, status: int | None = None) -> Response:
    """The envd REST error shape: `{"code": <http status>, "message": ...}`."""
    status = status or exc.http_status
    return json_response({"code": status, "message": exc.message}, status)


class Connection:
    """One client connection: the socket and a buffered reader on it."""

    __slots__ = ("rfile", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=READ_CHUNK)

    def read_request(self) -> Request | None:
        """The next request head on this connection, or None when the client closed it."""
        line = self.rfile.readline(MAX_HEAD_BYTES)
        while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between requests (RFC 9112 §2.2)
            line = self.rfile.readline(MAX_HEAD_BYTES)
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise BadRequest("request line too long")
        head = [line]
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            raise BadRequest("malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise BadRequest(f"unsupported protocol {version!r}")
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            line = self.rfile.readline(MAX_HEAD_BYTES)
            size += len(line)
            if size > MAX_HEAD_BYTES or len(headers) > MAX_HEADERS:
                raise BadRequest("request head too large")
            if not line.endswith(b"\n"):
                raise BadRequest("request head ended early")
            head.append(line)
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise BadRequest("malformed header line")
            name = name.lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        req = Request(method, target, version, headers, b"".join(head), self)
        te = headers.get("transfer-encoding", "").lower()
        chunked = "chunked" in te
        length = None
        if not chunked and "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise BadRequest("bad content-length") from None
            if length < 0:
                raise BadRequest("bad content-length")
        expects = headers.get("expect", "").lower() == "100-continue" and (chunked or bool(length))
        req.body = Body(self.rfile, length, chunked, self.sock if expects else None)
        return req

    def send_response(self, resp: Response, keep_alive: bool, head_only: bool = False) -> None:
        head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}\r\n"]
        head.extend(f"{k}: {v}\r\n" for k, v in resp.headers)
        if resp.status not in (204, 304) and resp.status >= 200:
            head.append(f"content-length: {len(resp.body)}\r\n")
        if not keep_alive:
            head.append("connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1")
        if not head_only:
            data += resp.body
        self.sock.sendall(data)

    def send_stream(self, resp: StreamResponse, keep_alive: bool) -> None:
        head = [f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}\r\n"]
        head.extend(f"{k}: {v}\r\n" for k, v in resp.headers)
        head.append("transfer-encoding: chunked\r\n")
        head.append("x-accel-buffering: no\r\n")
        if not keep_alive:
            head.append("connection: close\r\n")
        head.append("\r\n")
        sock = self.sock
        chunks = resp.chunks
        try:
            sock.sendall("".join(head).encode("latin-1"))
            for chunk in chunks:
                if chunk is None:
                    if self.peer_closed():
                        raise ClientGone
                    continue
                if chunk:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError as exc:
            raise ClientGone from exc
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def peer_closed(self) -> bool:
        """True when the client has hung up: its side shut (seen even past bytes it sent that
        nobody read, such as a chunked body's last chunk while its response streams), or EOF
        or an error on a readable socket."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLRDHUP)
            events = poller.poll(0)
        except (OSError, ValueError):
            return True
        if not events:
            return False
        if events[0][1] & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
