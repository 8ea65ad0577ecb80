"""A small synchronous client of hutch's own control plane (`/v1/...`), used by the CLI.

What it owns: one method per resource operation, and turning error answers back into the
`hutch.errors` exceptions the server raised (`{"code": "<wire code>", "message"}` ->
`errors.from_wire`; E2B's `{"code": <status>}` or a body without a code -> `errors.from_status`).
A server that cannot be reached is `Unavailable`. Answers are the server's JSON, unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from hutch.errors import HutchError, InvalidArgument, NotFound, Unavailable, from_status, from_wire

DEFAULT_URL = "http://127.0.0.1:3000"


def error_of(response: httpx.Response) -> HutchError:
    """The exception an error answer stands for."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        code = body.get("code")
        if isinstance(code, str):
            return from_wire(code, body["message"])
        return from_status(response.status_code, body["message"])
    text = response.text.strip()[:200] or response.reason_phrase
    return from_status(response.status_code, f"HTTP {response.status_code}: {text}")


class HutchClient:
    """`HutchClient()` reads `HUTCH_URL` (default http://127.0.0.1:3000) and `HUTCH_API_KEY`."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url = (url or os.environ.get("HUTCH_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key or os.environ.get("HUTCH_API_KEY")
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HutchClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs) -> Any:
        """The decoded JSON answer (None for 204); raises the `HutchError` of an error answer."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach hutch at {self.url}: {exc or exc.__class__.__name__}") from None
        if response.status_code >= 400:
            raise error_of(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # -- tenants and keys ------------------------------------------------------------------------

    def me(self) -> dict:
        return self.request("GET", "/v1/tenants/me")

    def list_tenants(self) -> list[dict]:
        return self.request("GET", "/v1/tenants")["tenants"]

    def create_tenant(
        self,
        name: str,
        max_sessions: int | None = None,
        max_vcpu: float | None = None,
        max_memory_mb: int | None = None,
        max_image_disk_mb: int | None = None,
    ) -> dict:
        body: dict = {"name": name}
        if max_image_disk_mb is not None:
            body["maxImageDiskMB"] = max_image_disk_mb
        if max_sessions is not None:
            body["maxSessions"] = max_sessions
        if max_vcpu is not None:
            body["maxVcpu"] = max_vcpu
        if max_memory_mb is not None:
            body["maxMemoryMB"] = max_memory_mb
        return self.request("POST", "/v1/tenants", json=body)

    def update_tenant(self, tenant_id: str, quotas: dict) -> dict:
        """Change quotas (wire names: maxSessions, maxVcpu, maxMemoryMB, maxImageDiskMB; None lifts
        the last three)."""
        return self.request("PATCH", f"/v1/tenants/{tenant_id}", json=quotas)

    def create_key(self, tenant_id: str | None = None, label: str | None = None) -> dict:
        tenant_id = tenant_id or self.me()["tenantId"]
        return self.request("POST", f"/v1/tenants/{tenant_id}/keys", json={"label": label} if label else {})

    # -- functions -------------------------------------------------------------------------------

    def list_functions(self) -> list[dict]:
        return self.request("GET", "/v1/functions")["functions"]

    def get_function(self, name: str) -> dict:
        return self.request("GET", f"/v1/functions/{name}")

    def create_function(self, spec: dict) -> dict:
        return self.request("POST", "/v1/functions", json=spec)

    def update_function(self, name: str, spec: dict) -> dict:
        return self.request("PUT", f"/v1/functions/{name}", json=spec)

    def delete_function(self, name: str) -> None:
        self.request("DELETE", f"/v1/functions/{name}")

    # -- sessions --------------------------------------------------------------------------------

    def list_templates(self) -> list[dict]:
        return self.request("GET", "/v1/templates")["templates"]

    def get_template(self, name: str) -> dict:
        return self.request("GET", f"/v1/templates/{name}")

    def build_template(self, spec: dict) -> dict:
        return self.request("POST", "/v1/templates", json=spec)

    def get_build(self, build_id: str, offset: int = 0) -> dict:
        return self.request("GET", f"/v1/templates/builds/{build_id}", params={"offset": offset})

    def delete_template(self, name: str) -> None:
        self.request("DELETE", f"/v1/templates/{name}")

    def create_session(
        self,
        function: str,
        session_id: str | None = None,
        ttl_s: int | None = None,
        idle_timeout_s: int | None = None,
        env: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> dict:
        body: dict = {}
        if session_id is not None:
            body["sessionId"] = session_id
        if ttl_s is not None:
            body["sessionTTLInSeconds"] = ttl_s
        if idle_timeout_s is not None:
            body["sessionIdleTimeoutInSeconds"] = idle_timeout_s
        if env:
            body["environmentVariables"] = env
        if metadata:
            body["metadata"] = metadata
        return self.request("POST", f"/v1/functions/{function}/sessions", json=body)

    def list_sessions(
        self, function: str | None = None, status: str | None = None, limit: int = 100, next_token: str | None = None
    ) -> tuple[list[dict], str | None]:
        """One page of sessions, newest first, and the token of the next page."""
        params: dict = {"limit": limit}
        if status:
            params["status"] = status
        if next_token:
            params["nextToken"] = next_token
        path = f"/v1/functions/{function}/sessions" if function else "/v1/sessions"
        page = self.request("GET", path, params=params)
        return page["sessions"], page.get("nextToken")

    def find_function_of(self, session_id: str) -> str:
        """The function of the caller's session with this id (Active first, then the newest).

        Raises:
            NotFound: no session has that id.
            InvalidArgument: sessions of several functions have it (name one).
        """
        for status in ("Active", None):
            token: str | None = None
            functions: set[str] = set()
            while True:
                page, token = self.list_sessions(status=status, limit=1000, next_token=token)
                functions |= {s["functionName"] for s in page if s["sessionId"] == session_id}
                if not token:
                    break
            if len(functions) == 1:
                return functions.pop()
            if functions:
                raise InvalidArgument(f"sessions of {', '.join(sorted(functions))} have id {session_id}: name one")
        raise NotFound(f"session {session_id} not found")

    def get_session(self, function: str, session_id: str) -> dict:
        return self.request("GET", f"/v1/functions/{function}/sessions/{session_id}")

    def renew_session(
        self, function: str, session_id: str, ttl_s: int | None = None, idle_timeout_s: int | None = None
    ) -> dict:
        body: dict = {}
        if ttl_s is not None:
            body["sessionTTLInSeconds"] = ttl_s
        if idle_timeout_s is not None:
            body["sessionIdleTimeoutInSeconds"] = idle_timeout_s
        return self.request("PATCH", f"/v1/functions/{function}/sessions/{session_id}", json=body)

    def pause_session(self, function: str, session_id: str, keep_memory: bool = True) -> dict:
        body = {"keepMemory": keep_memory}
        return self.request("POST", f"/v1/functions/{function}/sessions/{session_id}/pause", json=body)

    def fork_session(self, function: str, session_id: str, count: int = 1) -> list[dict]:
        """Copies of a running session with its memory: a session, or {"error"}, per copy."""
        body = {"count": count}
        return self.request("POST", f"/v1/functions/{function}/sessions/{session_id}/fork", json=body)["sessions"]

    def resume_session(self, function: str, session_id: str) -> dict:
        return self.request("POST", f"/v1/functions/{function}/sessions/{session_id}/resume")

    def delete_session(self, function: str, session_id: str) -> None:
        self.request("DELETE", f"/v1/functions/{function}/sessions/{session_id}")

    def session_logs(
        self, function: str, session_id: str, cursor_ms: int | None = None, limit: int = 1000, level: str | None = None
    ) -> list[dict]:
        """The session's log entries from `cursor_ms` (unix milliseconds) on, oldest first."""
        params: dict = {"limit": limit}
        if cursor_ms is not None:
            params["cursor"] = cursor_ms
        if level is not None:
            params["level"] = level
        return self.request("GET", f"/v1/functions/{function}/sessions/{session_id}/logs", params=params)["logs"]

    # -- usage -----------------------------------------------------------------------------------

    @staticmethod
    def _range(start: float | str | None, end: float | str | None, **more) -> dict:
        params = {"from": start, "to": end, **more}
        return {k: v for k, v in params.items() if v is not None}

    def usage(self, start: float | str | None = None, end: float | str | None = None, function: str | None = None):
        """The caller's totals and cost over `[start, end)` (unix seconds or ISO 8601), per function."""
        return self.request("GET", "/v1/usage", params=self._range(start, end, function=function))

    def usage_series(
        self, start: float | str | None = None, end: float | str | None = None, step: int | None = None
    ) -> dict:
        return self.request("GET", "/v1/usage/series", params=self._range(start, end, step=step))

    def usage_sessions(
        self,
        start: float | str | None = None,
        end: float | str | None = None,
        function: str | None = None,
        status: str | None = None,
        limit: int = 100,
        next_token: str | None = None,
    ) -> tuple[list[dict], str | None]:
        """One page of session usage records, newest first, and the token of the next page."""
        params = self._range(start, end, function=function, status=status, limit=limit, nextToken=next_token)
        page = self.request("GET", "/v1/usage/sessions", params=params)
        return page["sessions"], page.get("nextToken")

    def usage_csv(
        self,
        start: float | str | None = None,
        end: float | str | None = None,
        function: str | None = None,
        status: str | None = None,
    ) -> str:
        """Every matching session's usage record as CSV."""
        params = self._range(start, end, function=function, status=status, format="csv")
        try:
            response = self.http.get("/v1/usage/sessions", params=params)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach hutch at {self.url}: {exc or exc.__class__.__name__}") from None
        if response.status_code >= 400:
            raise error_of(response)
        return response.text

    def session_usage(self, function: str, session_id: str) -> dict:
        return self.request("GET", f"/v1/functions/{function}/sessions/{session_id}/usage")

    def usage_tenants(self, start: float | str | None = None, end: float | str | None = None) -> list[dict]:
        """Every tenant's totals (admin keys only)."""
        return self.request("GET", "/v1/usage/tenants", params=self._range(start, end))["tenants"]
