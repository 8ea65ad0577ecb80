"""Connect RPC (https://connectrpc.com/docs/protocol) with the JSON codec, as envd speaks it.

- Unary: `POST /<package.Service>/<Method>`, `Content-Type: application/json`, the message as the
  body; errors are an HTTP status plus `{"code": "<connect code>", "message": ...}`.
- Server streaming: `Content-Type: application/connect+json`; request and response messages are
  *enveloped*: 1 flag byte, a 4-byte big-endian length, the JSON. The response always has HTTP
  200 and ends with an envelope flagged 0x02 holding `{}` or `{"error": {...}}`.
- Client streaming (StreamInput): the request body is a stream of envelopes; the response is
  one enveloped message and the end-of-stream envelope.

This is the agent's only place that turns `hutch.errors` into Connect wire errors.
"""

from __future__ import annotations

import json
import time

from hutch.agent.envelope import FLAG_COMPRESSED, FLAG_END_STREAM, HEADER, encode
from hutch.agent.http import Request, Response, StreamResponse, json_response
from hutch.agent.server import log
from hutch.errors import HutchError, InvalidArgument, ResourceExhausted, Unimplemented

UNARY_TYPES = ("application/json",)
STREAM_TYPE = "application/connect+json"
MAX_MESSAGE = 32 * 1024 * 1024


def read_envelopes(req: Request):
    """Yield the JSON messages of an enveloped request body until it ends."""
    body = req.body
    while True:
        head = body.read_exact(HEADER.size)
        if not head:
            return
        if len(head) < HEADER.size:
            raise InvalidArgument("truncated envelope")
        flags, length = HEADER.unpack(head)
        if flags & FLAG_COMPRESSED:
            raise Unimplemented("compressed messages are not supported")
        if length > MAX_MESSAGE:
            raise ResourceExhausted(f"message larger than {MAX_MESSAGE} bytes")
        data = body.read_exact(length)
        if len(data) < length:
            raise InvalidArgument("truncated envelope")
        if flags & FLAG_END_STREAM:
            return
        yield _decode(data)


def _decode(data: bytes) -> dict:
    if not data:
        return {}
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"message is not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InvalidArgument("message must be a JSON object")
    return message


def unary_error(exc: HutchError) -> Response:
    return json_response(exc.to_dict(), exc.http_status)


def end_stream(exc: BaseException | None) -> bytes:
    if exc is None:
        return encode({}, FLAG_END_STREAM)
    if not isinstance(exc, HutchError):
        log(f"stream failed: {exc.__class__.__name__}: {exc}")
        exc = HutchError(f"internal error: {exc}")
    return encode({"error": exc.to_dict()}, FLAG_END_STREAM)


class Service:
    """One Connect service: methods registered by kind, dispatched by the last path segment."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.prefix = f"/{name}/"
        self._unary: dict = {}
        self._server_stream: dict = {}
        self._client_stream: dict = {}

    def unary(self, method: str):
        def register(func):
            self._unary[method] = func
            return func

        return register

    def server_stream(self, method: str):
        def register(func):
            self._server_stream[method] = func
            return func

        return register

    def client_stream(self, method: str):
        def register(func):
            self._client_stream[method] = func
            return func

        return register

    def __call__(self, req: Request):
        method = req.path[len(self.prefix) :]
        content_type = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if req.method != "POST":
            return unary_error(InvalidArgument(f"Connect RPCs take POST, not {req.method}"))
        if method in self._unary:
            if content_type not in UNARY_TYPES:
                return unary_error(Unimplemented(f"unsupported content type {content_type!r}; use JSON"))
            try:
                message = _decode(req.body.read_all(MAX_MESSAGE))
                return json_response(self._unary[method](message, req))
            except HutchError as exc:
                return unary_error(exc)
        if method in self._server_stream:
            if content_type != STREAM_TYPE:
                return unary_error(Unimplemented(f"unsupported content type {content_type!r}"))
            # The request message is read before the response starts, as connect-go (envd) does:
            # a client that sees the response head early may end its body before sending it.
            try:
                first: dict[str, object] = next(read_envelopes(req), {})
            except HutchError as exc:
                return StreamResponse(200, iter([end_stream(exc)]), [("content-type", STREAM_TYPE)])
            return StreamResponse(200, self._stream(method, first, req), [("content-type", STREAM_TYPE)])
        if method in self._client_stream:
            if content_type != STREAM_TYPE:
                return unary_error(Unimplemented(f"unsupported content type {content_type!r}"))
            return self._client(method, req)
        return unary_error(Unimplemented(f"{self.name}/{method} does not exist"))

    def _stream(self, method: str, first: dict, req: Request):
        error = None
        messages = None
        try:
            messages = self._server_stream[method](first, req)
            for message in messages:
                yield None if message is None else encode(message)
        except HutchError as exc:
            error = exc
        except GeneratorExit:
            raise
        except Exception as exc:
            error = exc  # type: ignore[assignment]
        finally:
            if messages is not None and hasattr(messages, "close"):
                messages.close()
        yield end_stream(error)

    def _client(self, method: str, req: Request) -> StreamResponse:
        try:
            result = self._client_stream[method](read_envelopes(req), req)
            body = [encode(result), end_stream(None)]
        except Exception as exc:
            body = [end_stream(exc)]
        return StreamResponse(200, iter(body), [("content-type", STREAM_TYPE)])


def keepalive_interval(req: Request, default: float = 50.0) -> float:
    """Seconds between keepalive events, from E2B's `Keepalive-Ping-Interval` header."""
    try:
        value = float(req.headers.get("keepalive-ping-interval", default))
    except ValueError:
        return default
    return max(value, 0.05)


def with_keepalive(messages, interval: float, keepalive: dict):
    """Pass messages through; on idle ticks (None) insert `keepalive` every `interval` seconds."""
    last = time.monotonic()
    for message in messages:
        now = time.monotonic()
        if message is None:
            if now - last >= interval:
                last = now
                yield keepalive
            else:
                yield None
        else:
            last = now
            yield message
