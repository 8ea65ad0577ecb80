"""E2B in-sandbox traffic: requests the E2B SDKs send to a sandbox, routed to its instance.

A request names its sandbox and port either with the `E2b-Sandbox-Id` and `E2b-Sandbox-Port`
headers (what the SDKs send when `E2B_SANDBOX_URL` points at hutch), or with the host
`{port}-{sandboxId}.{domain}` (`domain`: `localhost` unless configured; `Sandbox.get_host(port)`
and signed file URLs), on the main port or on the preview listener (`[preview] port`). Only
sessions created through the E2B API have an access token, and only those are reachable so.

Access rule (what the official SDKs send, checked against e2b 2.63 / e2b-code-interpreter 2.11):
- envd (49983): `X-Access-Token` must equal the sandbox's token (constant-time compare), except
  `GET /health` (envd's own health check is open; the SDK probes it to tell a dead sandbox from a
  slow one) and `/files` with E2B's v1 URL `signature` (`download_url`/`upload_url`), which is
  checked against the token, operation, path, user and expiry instead.
- code interpreter (49999): `/execute` runs code, so it needs the token (the SDK sends it there);
  `/contexts...` are accepted without one because the SDK sends none there (they create, list,
  restart and remove contexts; none runs code). A wrong token is refused everywhere.
- any other port: a user server inside the sandbox, reachable like E2B's default public sandbox
  traffic: whoever knows the sandbox id (about 100 random bits) may reach it, no token needed,
  and headers pass as they are.
- a sandbox created with `network.allowPublicTraffic: false` has a traffic access token: every
  port but envd's (the code interpreter's included, as E2B) then needs it in
  `e2b-traffic-access-token`; missing or wrong is a 403, as E2B's proxy answers.
A sandbox's `maskRequestHost` (`${PORT}` replaced by the port) is the `Host` its user servers see.
Native sessions are reached by host name too, as `{port}-{previewId}.{domain}` (`previewId`: the
session's row id, 128 random bits, as unguessable as a sandbox id; their public ids are chosen by
clients and only unique per tenant and function): user-server ports only, public like E2B's.
The tokens and the tenant's API key are not forwarded to the agent's own ports.

Errors use E2B's shape `{"code": <status>, "message"}`; an unknown or ended sandbox is a 502
whose message says "was not found", which the SDKs turn into `SandboxNotRunningException`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Any
from urllib.parse import parse_qsl

from hutch.agent.config import ENVD_PORT, INTERPRETER_PORT
from hutch.errors import InvalidArgument, NotFound, Paused, PermissionDenied, Unauthenticated
from hutch.gateway.affinity import header_value
from hutch.gateway.types import DataPlane, Header, Scope, Target

AGENT_PORTS = (ENVD_PORT, INTERPRETER_PORT)
TOKEN_HEADER = b"x-access-token"
TRAFFIC_TOKEN_HEADER = b"e2b-traffic-access-token"
ROW_ID = re.compile(r"[0-9a-f]{32}")  # a session's row id: native sessions' host names
AGENT_DROPPED = frozenset({TOKEN_HEADER, TRAFFIC_TOKEN_HEADER, b"x-api-key", b"e2b-sandbox-port"})
USER_DROPPED = frozenset({TRAFFIC_TOKEN_HEADER, b"e2b-sandbox-port"})


class SandboxNotFound(NotFound):
    """No live sandbox by that id. 502, as E2B's edge answers it (the SDKs rely on that)."""

    http_status = 502


def host_route(host: bytes | None, domain: str) -> tuple[str, int] | None:
    """(sandbox id, port) from a host `{port}-{sandboxId}.{domain}[:port]`, else None."""
    if not host or not domain:
        return None
    name = host.decode("latin-1").lower()
    if name.startswith("["):
        return None  # an IPv6 literal
    name = name.partition(":")[0]
    suffix = "." + domain.lower().strip(".")
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    port_text, sep, sandbox_id = label.partition("-")
    if not sep or not sandbox_id or "." in sandbox_id or not port_text.isdigit():
        return None
    return sandbox_id, int(port_text)


def _port(value: bytes) -> int:
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise InvalidArgument(f"invalid E2b-Sandbox-Port {value.decode('latin-1')!r}")
    return port


def sandbox_address(scope: Scope, domain: str) -> tuple[str, int] | None:
    """(sandbox id, port) a request is for, or None when it is not E2B sandbox traffic.

    Raises:
        InvalidArgument: the sandbox headers are incomplete or malformed.
    """
    headers: list[Header] = scope["headers"]
    sandbox_id = header_value(headers, b"e2b-sandbox-id")
    if sandbox_id is not None:
        port = header_value(headers, b"e2b-sandbox-port")
        if port is None:
            raise InvalidArgument("E2b-Sandbox-Id needs E2b-Sandbox-Port")
        return sandbox_id.decode("latin-1"), _port(port)
    if domain:
        return host_route(header_value(headers, b"host"), domain)
    return None


def expected_signature(path: str, operation: str, user: str, token: str, expiration: str | None) -> str:
    """E2B's v1 file-URL signature (`e2b.sandbox.signature.get_signature`)."""
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def _equal(given: str | bytes, expected: str) -> bool:
    given_bytes = given.encode("latin-1") if isinstance(given, str) else given
    return hmac.compare_digest(given_bytes, expected.encode("latin-1"))


def check_traffic(scope: Scope, port: int, traffic: dict[str, Any] | None) -> None:
    """A private sandbox's traffic access token, on every port but envd's.

    Raises:
        PermissionDenied: the token is missing or wrong (403, as E2B's proxy).
    """
    token = (traffic or {}).get("token")
    if not token or port == ENVD_PORT:
        return
    given = header_value(scope["headers"], TRAFFIC_TOKEN_HEADER)
    if given is None or not _equal(given, token):
        raise PermissionDenied(
            "this sandbox's traffic is private: send its traffic access token (e2b-traffic-access-token)"
        )


def masked_host(traffic: dict[str, Any] | None, port: int) -> bytes | None:
    """The `Host` a user server sees (`maskRequestHost`, `${PORT}` replaced), or None: the client's."""
    mask = (traffic or {}).get("mask")
    return mask.replace("${PORT}", str(port)).encode("latin-1") if mask else None


def check_access(scope: Scope, port: int, token: str) -> None:
    """Apply the access rule of the module docstring.

    Raises:
        Unauthenticated: the request may not reach this sandbox port.
    """
    if port not in AGENT_PORTS:
        return
    given = header_value(scope["headers"], TOKEN_HEADER)
    if given is not None:
        if not _equal(given, token):
            raise Unauthenticated("invalid access token")
        return
    path: str = scope["path"]
    method: str = scope["method"]
    if port == INTERPRETER_PORT:
        if path == "/contexts" or path.startswith("/contexts/"):
            return
    elif path == "/health" and method in ("GET", "HEAD"):
        return
    elif path == "/files" and method in ("GET", "POST"):
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        signature = query.get("signature")
        if signature is not None:
            expiration = query.get("signature_expiration")
            if expiration is not None and (not expiration.isdigit() or int(expiration) < time.time()):
                raise Unauthenticated("the signature of this file URL has expired")
            operation = "read" if method == "GET" else "write"
            wanted = expected_signature(query.get("path", ""), operation, query.get("username", ""), token, expiration)
            if not _equal(signature, wanted):
                raise Unauthenticated("invalid file URL signature")
            return
    raise Unauthenticated("this sandbox needs its access token (X-Access-Token)")


async def resolve(plane: DataPlane, scope: Scope, sandbox_id: str, port: int) -> Target:
    """The target of one request to a sandbox.

    Raises:
        SandboxNotFound: no live sandbox with that id.
        Unauthenticated: see `check_access`.
    """
    sessions = plane.sessions
    session = await sessions.find_by_public_id(sandbox_id)
    if session is None and ROW_ID.fullmatch(sandbox_id):
        session = await sessions.find_by_row(sandbox_id)  # a native session's `previewId`
        if session is not None and session.access_token:
            session = None  # a sandbox is named by its sandbox id only
        elif session is not None and port in AGENT_PORTS:
            raise PermissionDenied("a session's agent is reached through /functions/{name}/invoke, with an API key")
    elif session is not None and not session.access_token:
        session = None
    if session is None:
        raise SandboxNotFound(f"The sandbox {sandbox_id} was not found")
    check_traffic(scope, port, session.traffic)
    if session.access_token:
        check_access(scope, port, session.access_token)
    try:
        route = await sessions.route(session)
    except NotFound:
        raise SandboxNotFound(f"The sandbox {sandbox_id} was not found") from None
    except Paused as exc:
        # As E2B's edge: a paused sandbox is not running (the SDKs' is_running() is False, their
        # calls raise SandboxNotRunningException), until connect resumes it.
        raise SandboxNotFound(exc.message) from None
    session = route.session
    agent = port in AGENT_PORTS
    raw: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
    query: bytes = scope.get("query_string", b"")
    drop = AGENT_DROPPED if agent else USER_DROPPED
    add = [(b"e2b-sandbox-port", str(port).encode())]
    host = None if agent else masked_host(session.traffic, port)
    if host is not None:
        drop, add = drop | {b"host"}, [*add, (b"host", host)]
    return Target(
        session=session,
        address=route.socket_path,
        node=route.node,
        hop=route.hop,
        pool_key=(session.instance_id or "", None if agent else port),
        path=raw + b"?" + query if query else raw,
        drop=drop,
        add=add,
    )
