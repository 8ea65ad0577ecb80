"""The control plane: a FastAPI app (its OpenAPI document is served at `/openapi.json`), and the
static usage page (`hutch/ui/`) at `/ui/`.

This module is the single place where errors become HTTP answers on the control plane:
- hutch's own API: `{"code": "<wire code>", "message": ...}` with the error's HTTP status;
- E2B's API (`/sandboxes`, `/v2/sandboxes`, ...): `{"code": <http status>, "message": ...}`,
  the shape the E2B SDKs parse.
Malformed requests (FastAPI validation) are 400s, never tracebacks.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from hutch import __version__
from hutch.errors import HutchError, InvalidArgument

log = logging.getLogger(__name__)

E2B_PREFIXES = ("/sandboxes", "/v2/sandboxes", "/templates", "/v2/templates", "/v3/templates")


def _is_e2b(request: Request) -> bool:
    return request.url.path.startswith(E2B_PREFIXES)


def error_response(request: Request, status: int, code: str, message: str) -> JSONResponse:
    if _is_e2b(request):
        return JSONResponse({"code": status, "message": message}, status_code=status)
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(hutch) -> FastAPI:
    """The control-plane app for a started `hutch.server.Hutch`."""
    from hutch.api import e2b, native, usage

    app = FastAPI(
        title="hutch",
        version=__version__,
        description="Sessions of isolated sandboxes for AI agents; E2B-compatible.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.hutch = hutch

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
        sessions = hutch.sessions
        return {
            "status": "ok",
            "version": __version__,
            "activeSessions": len(sessions.active_sessions()) if sessions else 0,
            "warmPools": hutch.scheduler.pool_sizes() if hutch.scheduler else {},
        }

    app.include_router(native.router)
    app.include_router(usage.router)
    app.include_router(e2b.router)
    # The web page (static; it reads the usage API with a key the user types in).
    app.mount("/ui", StaticFiles(directory=Path(__file__).parent.parent / "ui", html=True), name="ui")
    return app
