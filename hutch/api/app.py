"""The control plane: a FastAPI app (its OpenAPI document is served at `/openapi.json`), and the
static usage page (`hutch/ui/`) at `/ui/`.

This module is the single place where errors become HTTP answers on the control plane:
- hutch's own API: `{"code": "<wire code>", "message": ...}` with the error's HTTP status;
- E2B's API (`/sandboxes`, `/v2/sandboxes`, ...): `{"code": <http status>, "message": ...}`,
  the shape the E2B SDKs parse.
Malformed requests (FastAPI validation) are 400s, never tracebacks. Bodies are bounded before any
route reads them (`BodyLimit`): at most `MAX_BODY_BYTES` (413), received within the config's
`request_timeout` (408), so that no client can make hutch hold a huge body in memory or a
connection forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from hutch import __version__
from hutch.api.deps import ControlPlane, ControlPlaneApp
from hutch.errors import HutchError, InvalidArgument

log = logging.getLogger(__name__)

E2B_PREFIXES = ("/sandboxes", "/v2/sandboxes", "/templates", "/v2/templates", "/v3/templates")
MAX_BODY_BYTES = 1024 * 1024  # the control plane takes JSON documents only (specs, settings)...
STREAMED_UPLOAD = re.compile(r"^/templates/[^/]+/files/[0-9a-f]{64}/upload$")  # ...and the files of template builds
BODY_TIMEOUT_S = 30.0


def _is_e2b(request: Request) -> bool:
    return request.url.path.startswith(E2B_PREFIXES)


def _error_body(path: str, status: int, code: str, message: str) -> dict:
    if path.startswith(E2B_PREFIXES):
        return {"code": status, "message": message}
    return {"code": code, "message": message}


def error_response(request: Request, status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(_error_body(request.url.path, status, code, message), status_code=status)


class BodyLimit:
    """Pure ASGI: read a request's whole body (at most `limit` bytes, within `timeout` seconds)
    before the app runs, then hand it over from memory; refuse it otherwise."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or (scope["method"] == "PUT" and STREAMED_UPLOAD.match(scope["path"])):
            # Template files stream to disk under a bound of their own (`e2b_templates.upload_files`).
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(scope, send, 413, f"request body larger than {self.limit} bytes")
                return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limit:
                        await self._refuse(scope, send, 413, f"request body larger than {self.limit} bytes")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._refuse(scope, send, 408, f"request body not received within {self.timeout:.0f} s")
            return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only a disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope, send, status: int, message: str) -> None:
        code = "deadline_exceeded" if status == 408 else "resource_exhausted"
        data = json.dumps(_error_body(scope["path"], status, code, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(plane: ControlPlane) -> FastAPI:
    """The control-plane app, with the collaborators its routes use (`hutch.api.deps`)."""
    from hutch.api import e2b, e2b_templates, native, sandbox_metrics, session_logs, templates, usage

    app = ControlPlaneApp(
        plane,
        title="hutch",
        version=__version__,
        description="Sessions of isolated sandboxes for AI agents; E2B-compatible.",
    )
    app.add_middleware(BodyLimit, timeout=plane.config.request_timeout)

    @app.exception_handler(HutchError)
    async def hutch_error(request: Request, exc: HutchError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(request, exc.http_status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 400, InvalidArgument.code, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated"}
        return error_response(request, exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(request, 500, "internal", f"internal error: {exc.__class__.__name__}")

    @app.get("/health", tags=["health"], summary="200 once the server is ready")
    async def health() -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "activeSessions": len(plane.sessions.active_sessions()),
            "warmPools": plane.warm_pools(),
        }

    app.include_router(sandbox_metrics.router)  # before e2b's: its /sandboxes/{id} would take /sandboxes/metrics
    app.include_router(session_logs.router)  # before e2b's catch-all of sandbox actions
    app.include_router(native.router)
    app.include_router(templates.router)
    app.include_router(usage.router)
    app.include_router(e2b.router)
    app.include_router(e2b_templates.router)
    # The web page (static; it reads the usage API with a key the user types in).
    app.mount("/ui", StaticFiles(directory=Path(__file__).parent.parent / "ui", html=True), name="ui")
    return app
