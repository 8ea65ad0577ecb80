"""API abuse: a tenant (or nobody) attacks hutch's own HTTP surface, the control plane and the
gateway, and every answer must be the exact refusal expected, with the server unharmed.

Each attack is a list of checks `(what was tried, the answer seen, the answers allowed)`; the
evidence is that list. The victim is the stage's other tenant, whose sessions, E2B sandboxes,
cookie sessions and MCP sessions are made here. Hutch's own memory is measured where a request
tries to make it hold something big.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from hutch.agent import envelope
from hutch.selftest.report import Outcome
from hutch.selftest.stage import LIMITS, Stage
from hutch.selftest.target import STREAM, Tenant

ENVD = "49983"
INTERPRETER = "49999"
MCP_NOT_FOUND = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


class Checks:
    def __init__(self) -> None:
        self.evidence: list[str] = []
        self.ok = True

    def expect(self, what: str, seen: object, *allowed: object) -> None:
        good = seen in allowed
        self.ok &= good
        self.evidence.append(f"{what}: {seen}" + ("" if good else f" (expected {' or '.join(map(str, allowed))})"))

    def status(self, what: str, response: httpx.Response, *allowed: int, code: object = None) -> None:
        """An HTTP status, and the error body's `code` where one is expected."""
        seen: object = response.status_code
        if code is not None:
            try:
                seen = f"{response.status_code} {response.json().get('code')}"
            except ValueError:
                seen = f"{response.status_code} {response.text[:80]!r}"
            allowed = tuple(f"{status} {code}" for status in allowed)  # type: ignore[misc]
        self.expect(what, seen, *allowed)

    def note(self, line: str) -> None:
        self.evidence.append(line)


def _outcome(stage: Stage, attack: str, title: str, checks: Checks, started: float, measured=None) -> Outcome:
    ok, bystanders = stage.bystanders()
    return Outcome(
        attack, "api", title, "server", checks.ok, checks.evidence, ok, bystanders, measured or {},
        time.monotonic() - started,
    )  # fmt: skip


def _cleanup(tenant: Tenant, function: str, key: str) -> None:
    tenant.http.delete(f"/v1/functions/{function}/sessions/{key}", timeout=60)


def _ensure_function(stage: Stage, spec: dict) -> None:
    for tenant in (stage.attacker, stage.victim_tenant):
        assert tenant is not None
        if tenant.http.get(f"/v1/functions/{spec['name']}").status_code == 404:
            tenant.function(spec)


# -- another tenant's ids ----------------------------------------------------------------------


def cross_tenant_ids(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    victim = stage.victims["bwrap"]
    fn, key = victim.session.function, victim.session.key
    http = attacker.http
    checks.status("GET another tenant's session", http.get(f"/v1/functions/{fn}/sessions/{key}"), 404, code="not_found")
    checks.status(
        "PATCH (renew) it",
        http.patch(f"/v1/functions/{fn}/sessions/{key}", json={"sessionTTLInSeconds": 1}),
        404,
        code="not_found",
    )
    checks.status("DELETE it", http.delete(f"/v1/functions/{fn}/sessions/{key}"), 404, code="not_found")
    checks.status("its usage", http.get(f"/v1/functions/{fn}/sessions/{key}/usage"), 404, code="not_found")
    listed = [s["sessionId"] for s in http.get("/v1/sessions").json()["sessions"]]
    checks.expect("the attacker's session list names it", key in listed, False)
    secret = "/home/user/victim-secret.txt"
    by_path = http.get(f"/functions/{fn}/sessions/{key}/files", params={"path": secret}, timeout=60)
    checks.status("its key in an invocation path: read its secret", by_path, 404)
    by_header = http.get(f"/functions/{fn}/invoke/files", params={"path": secret}, headers={"x-fc-session-id": key})
    checks.status("its key in x-fc-session-id: read its secret", by_header, 404)
    mine = http.get(f"/v1/functions/{fn}/sessions/{key}").json()
    checks.expect(
        "that key names an instance of the attacker's own",
        mine.get("containerId") not in (None, victim.record["instance_id"]),
        True,
    )
    _cleanup(attacker, fn, key)
    title = "another tenant's session ids, on the control plane and the gateway"
    return _outcome(stage, "cross-tenant-ids", title, checks, started)


def guessed_ids(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    victim = stage.victims["bwrap"]
    instance_id = victim.record["instance_id"]
    http = attacker.http
    for name, guess in (
        ("the victim's instance id", instance_id),
        ("the victim's session key", victim.session.key),
        ("a random id", secrets.token_hex(16)),
    ):
        answer = http.get("/health", headers={"e2b-sandbox-id": guess, "e2b-sandbox-port": ENVD})
        checks.status(f"{name} as an E2B sandbox id", answer, 502)
        checks.expect(f"{name}: says it was not found", "was not found" in answer.text, True)
    fn = victim.session.function
    checks.status(
        "the instance id as a session id on the control plane",
        http.get(f"/v1/functions/{fn}/sessions/{instance_id}"),
        404,
        code="not_found",
    )
    read = http.get(f"/functions/{fn}/sessions/{instance_id}/files", params={"path": "/home/user/victim-secret.txt"})
    checks.status("the instance id as a session key: read the victim's secret", read, 404)
    _cleanup(attacker, fn, instance_id)
    for bad in ("../../etc", "a" * 65, "-x", "x y"):
        answer = http.get(f"/functions/{fn}/invoke/health", headers={"x-fc-session-id": bad})
        checks.status(f"malformed session key {bad[:12]!r}", answer, 400, code="invalid_argument")
    return _outcome(stage, "guessed-ids", "guessed internal and instance ids", checks, started)


def _e2b_sandbox(tenant: Tenant, template: str) -> dict:
    made = tenant.api("POST", "/sandboxes", json={"templateID": template, "timeout": 300}, timeout=120)
    return made.json()


def e2b_headers(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker, victim = stage.attacker, stage.victim_tenant
    assert attacker is not None and victim is not None
    theirs = _e2b_sandbox(victim, "sec-bwrap")
    mine = _e2b_sandbox(attacker, "sec-bwrap")
    sid, token = theirs["sandboxID"], theirs["envdAccessToken"]
    envd = {"e2b-sandbox-id": sid, "e2b-sandbox-port": ENVD}
    put = victim.http.post(
        "/files",
        params={"path": "/home/user/e2b-secret.txt"},
        content=b"e2b-secret",
        headers={**envd, "x-access-token": token, "content-type": "application/octet-stream"},
    )
    checks.status("the victim writes a file with its token", put, 200)
    http = attacker.http
    read = {"path": "/home/user/e2b-secret.txt"}
    for name, extra in (
        ("no access token", {}),
        ("a wrong access token", {"x-access-token": secrets.token_hex(16)}),
        ("the attacker's own sandbox's token", {"x-access-token": mine["envdAccessToken"]}),
    ):
        checks.status(f"read its file with {name}", http.get("/files", params=read, headers={**envd, **extra}), 401)
    checks.status(
        "start a process without a token",
        http.post(
            "/process.Process/Start",
            content=envelope.encode({"process": {"cmd": "id"}}),
            headers={**envd, "content-type": STREAM},
        ),
        401,
    )
    interp = {"e2b-sandbox-id": sid, "e2b-sandbox-port": INTERPRETER}
    checks.status("run code without a token", http.post("/execute", json={"code": "1"}, headers=interp), 401)
    checks.status(
        "run code with a wrong token",
        http.post("/execute", json={"code": "1"}, headers={**interp, "x-access-token": "x" * 32}),
        401,
    )
    forged = {**read, "username": "user", "signature": "v1_" + "A" * 43}
    checks.status("a file URL with a forged signature", http.get("/files", params=forged, headers=envd), 401)
    expired = {**forged, "signature_expiration": "1000"}
    checks.status("a file URL whose signature expired", http.get("/files", params=expired, headers=envd), 401)
    health = http.get("/health", headers=envd)
    checks.note(f"envd's GET /health without a token: {health.status_code} (open by design, as E2B's envd)")
    for method, path, body in (
        ("GET", f"/sandboxes/{sid}", None),
        ("DELETE", f"/sandboxes/{sid}", None),
        ("POST", f"/sandboxes/{sid}/timeout", {"timeout": 1}),
        ("POST", f"/v2/sandboxes/{sid}/connect", {"timeout": 10}),
        ("PUT", f"/sandboxes/{sid}/network", {"allowOut": ["0.0.0.0/0"]}),
    ):
        answer = http.request(method, path, json=body)
        checks.status(f"{method} {path.replace(sid, '<theirs>')} with the attacker's key", answer, 404, code=404)
    for name, headers in (("no API key", {}), ("an unknown API key", {"x-api-key": "e2b_" + secrets.token_hex(20)})):
        answer = httpx.get(f"{stage.target.url}/v2/sandboxes", headers=headers)
        checks.status(f"list sandboxes with {name}", answer, 401, code=401)
    still = victim.http.get("/files", params=read, headers={**envd, "x-access-token": token})
    checks.expect("the victim's file afterwards", still.content, b"e2b-secret")
    victim.http.delete(f"/sandboxes/{sid}")
    attacker.http.delete(f"/sandboxes/{mine['sandboxID']}")
    title = "E2B traffic to another tenant's sandbox: no, wrong or foreign access tokens, forged file URLs"
    return _outcome(stage, "e2b-headers", title, checks, started)


COOKIE_FUNCTION = {
    "name": "sec-cookie",
    "runtime": "bwrap",
    "resources": LIMITS,
    "sessionAffinity": "GENERATED_COOKIE",
}


def forged_cookies(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    _ensure_function(stage, COOKIE_FUNCTION)
    attacker, victim = stage.attacker, stage.victim_tenant
    assert attacker is not None and victim is not None
    name = "x-fc-cookie-session-id"
    first = victim.http.get("/functions/sec-cookie/invoke/health", timeout=120)
    value = first.cookies.get(name)
    checks.expect("the victim's session got its cookie", bool(value), True)
    cookie = {"cookie": f"{name}={value}"}
    put = victim.http.post(
        "/functions/sec-cookie/invoke/files",
        params={"path": "cookie-secret.txt"},
        content=b"cookie-secret",
        headers={**cookie, "content-type": "application/octet-stream"},
    )
    checks.status("the victim writes a file in its cookie session", put, 200)
    stolen = attacker.http.get(
        "/functions/sec-cookie/invoke/files", params={"path": "cookie-secret.txt"}, headers=cookie, timeout=60
    )
    checks.status("the attacker replays the victim's cookie: read the file", stolen, 404)
    for bad in ("../../etc/passwd", "a" * 300, "a/b%00", '"quoted space"'):
        answer = attacker.http.get("/functions/sec-cookie/invoke/health", headers={"cookie": f"{name}={bad}"})
        checks.status(f"a malformed cookie {bad[:12]!r}", answer, 400, code="invalid_argument")
    mine = victim.http.get("/functions/sec-cookie/invoke/files", params={"path": "cookie-secret.txt"}, headers=cookie)
    checks.expect("the victim's file afterwards", mine.content, b"cookie-secret")
    _cleanup(victim, "sec-cookie", value or "")
    _cleanup(attacker, "sec-cookie", value or "")
    return _outcome(stage, "forged-cookies", "another tenant's and malformed affinity cookies", checks, started)


MCP_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "selftest", "version": "1"}},
}


def mcp_session_ids(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    spec = json.loads((Path(__file__).parents[2] / "examples/mcp-counter/function.json").read_text())
    spec = {**spec, "name": "sec-mcp", "warmPoolSize": 0}
    _ensure_function(stage, spec)
    attacker, victim = stage.attacker, stage.victim_tenant
    assert attacker is not None and victim is not None
    url = "/functions/sec-mcp/invoke/mcp"
    made = victim.http.post(url, json=INITIALIZE, headers=MCP_HEADERS, timeout=120)
    mcp_id = made.headers.get("mcp-session-id", "")
    checks.expect("the victim's MCP session got an id", bool(mcp_id), True)
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    for name, value in (("the victim's", mcp_id), ("a guessed", secrets.token_hex(16))):
        answer = attacker.http.post(url, json=listing, headers={**MCP_HEADERS, "mcp-session-id": value})
        checks.status(f"{name} Mcp-Session-Id", answer, 404)
        checks.expect(f"{name} Mcp-Session-Id: the body", _json(answer), MCP_NOT_FOUND)
    deleted = attacker.http.delete(url, headers={"mcp-session-id": mcp_id})
    checks.status("DELETE with the victim's Mcp-Session-Id", deleted, 404)
    alive = victim.http.post(url, json=listing, headers={**MCP_HEADERS, "mcp-session-id": mcp_id}, timeout=60)
    checks.status("the victim's MCP session afterwards", alive, 200)
    victim.http.delete(url, headers={"mcp-session-id": mcp_id})
    return _outcome(stage, "mcp-session-ids", "another tenant's and guessed MCP session ids", checks, started)


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return response.text[:100]


# -- malformed and oversized requests ----------------------------------------------------------


def oversized_bodies(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    rss = stage.target.rss_mb()
    peak = rss
    big = b'{"name": "' + b"x" * (64 << 20) + b'"}'
    json_type = {"content-type": "application/json"}
    checks.status(
        "64 MiB to the control plane", attacker.http.post("/v1/functions", content=big, headers=json_type), 413,
        code="resource_exhausted",
    )  # fmt: skip
    peak = max(peak, stage.target.rss_mb())

    def chunks():
        for _ in range(64):
            yield b"x" * (1 << 20)

    checks.status(
        "64 MiB chunked (no length) to the control plane",
        attacker.http.post("/v1/functions", content=chunks(), headers=json_type),
        413,
        code="resource_exhausted",
    )
    checks.status(
        "64 MiB to the E2B API", attacker.http.post("/v2/sandboxes", content=big, headers=json_type), 413, code=413
    )
    checks.status("16 MiB to /mcp", attacker.http.post("/mcp", content=big[: 16 << 20], headers=MCP_HEADERS), 413)
    peak = max(peak, stage.target.rss_mb())
    session = stage.attacker_session("bwrap")
    unary = session.http.post(
        f"{session.base}/process.Process/List", content=b"{" + b" " * (40 << 20) + b"}", headers=json_type
    )
    checks.status("40 MiB to a unary RPC of the agent", unary, 429, code="resource_exhausted")
    peak = max(peak, stage.target.rss_mb())
    checks.expect("hutch's memory grew by less than 32 MiB", peak - rss < 32, True)
    measured = {"hutch RSS": f"{rss:.0f} MiB -> peak {peak:.0f} MiB"}
    return _outcome(stage, "oversized-bodies", "oversized request bodies", checks, started, measured)


def _raw(port: int, data: bytes, read_timeout: float = 10.0) -> bytes:
    """Send raw bytes, return what the server answered until it closed (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(read_timeout)
        try:
            sock.sendall(data)
        except OSError:
            pass  # it may close before taking everything
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


def _status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"


def oversized_headers(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    port = stage.target.port
    rss = stage.target.rss_mb()
    one = attacker.http.get("/v1/functions", headers={"x-big": "a" * (128 << 10)})
    checks.status("one 128 KiB header", one, 431)
    many = attacker.http.get("/v1/functions", headers={f"x-h{i}": "v" * 100 for i in range(2000)})
    checks.status("2000 headers of 100 bytes", many, 431)
    long_url = _raw(port, b"GET /v1/functions?" + b"a" * (128 << 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    too_large = "HTTP/1.1 431 Request Header Fields Too Large"
    checks.expect("a 128 KiB URL", _status_line(long_url), too_large)
    endless = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: " + b"a" * (8 << 20))
    checks.expect(
        "an 8 MiB header that never ends", _status_line(endless), "HTTP/1.1 431 Request Header Fields Too Large"
    )
    gateway = attacker.http.get(
        "/functions/sec-bwrap/invoke/health", headers={"x-fc-session-id": "x", "x-big": "a" * (128 << 10)}
    )
    checks.status("a 128 KiB header to the gateway", gateway, 431)
    checks.expect("hutch's memory grew by less than 32 MiB", stage.target.rss_mb() - rss < 32, True)
    return _outcome(stage, "oversized-headers", "oversized request heads", checks, started)


def malformed_json(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    json_type = {"content-type": "application/json"}
    for name, body in (("truncated", b'{"name": '), ("an array", b"[1, 2]"), ("NUL bytes", b'{"name": "\x00"}')):
        answer = attacker.http.post("/v1/functions", content=body, headers=json_type)
        checks.status(f"control plane, {name}", answer, 400, code="invalid_argument")
        answer = attacker.http.post("/v2/sandboxes", content=body, headers=json_type)
        checks.status(f"E2B API, {name}", answer, 400, code=400)
    session = stage.attacker_session("bwrap")
    stat = session.http.post(f"{session.base}/filesystem.Filesystem/Stat", content=b"{bad", headers=json_type)
    checks.status("agent RPC (Filesystem/Stat), truncated", stat, 400, code="invalid_argument")
    execute = session.http.post(f"{session.base}/execute", content=b"{bad", headers=json_type)
    checks.status("code interpreter (/execute), truncated", execute, 400)
    wrong = session.http.post(f"{session.base}/filesystem.Filesystem/Stat", json={"path": {"nested": 1}})
    checks.status("agent RPC, a path that is not a string", wrong, 400, code="invalid_argument")
    return _outcome(stage, "malformed-json", "malformed JSON to the control plane and the agent", checks, started)


def _connect_answer(response: httpx.Response) -> str:
    """The end of a Connect stream: its error code, or `ok`."""
    envelopes, _ = envelope.split(response.content)
    last = envelopes[-1] if envelopes else None
    if last is None or not last[0] & envelope.FLAG_END_STREAM:
        return f"HTTP {response.status_code}, no end of stream"
    error = json.loads(last[1] or b"{}").get("error")
    return error["code"] if error else "ok"


def connect_envelopes(stage: Stage) -> Outcome:
    started = time.monotonic()
    checks = Checks()
    session = stage.attacker_session("bwrap")
    url = f"{session.base}/process.Process/Start"
    stream = {"content-type": STREAM}
    good = json.dumps({"process": {"cmd": "true"}}).encode()
    for name, body, expected in (
        ("a truncated envelope head", b"\x00\x00\x00", "invalid_argument"),
        ("a length longer than the body", envelope.HEADER.pack(0, 100) + good, "invalid_argument"),
        ("the compressed flag", envelope.HEADER.pack(1, len(good)) + good, "unimplemented"),
        ("a 4 GiB length", envelope.HEADER.pack(0, 0xFFFFFFFF) + good, "resource_exhausted"),
        ("a message that is not JSON", envelope.HEADER.pack(0, 8) + b"not json", "invalid_argument"),
        ("a JSON array", envelope.HEADER.pack(0, 3) + b"[1]", "invalid_argument"),
    ):
        response = session.http.post(url, content=body, headers=stream, timeout=30)
        checks.expect(f"Process/Start with {name}", f"{response.status_code} {_connect_answer(response)}",
                      f"200 {expected}")  # fmt: skip
    garbage = session.http.post(
        f"{session.base}/process.Process/StreamInput", content=envelope.HEADER.pack(0, 50) + b"{", headers=stream
    )
    checks.expect("StreamInput with a broken envelope", _connect_answer(garbage), "invalid_argument")
    wrong_type = session.http.post(url, content=good, headers={"content-type": "text/plain"})
    checks.status("a stream with the wrong content type", wrong_type, 501, code="unimplemented")
    after = session.sh("echo alive")
    checks.expect("the agent afterwards", after.text.strip(), "alive")
    title = "malformed Connect envelopes: truncated, bad lengths, compressed flag, huge length"
    return _outcome(stage, "connect-envelopes", title, checks, started)


def slow_loris(stage: Stage) -> Outcome:
    """Hundreds of clients that never finish their request heads, some that trickle a control-plane
    body, while another tenant works: it must be served, and the slow ones cut at the deadline."""
    started = time.monotonic()
    checks = Checks()
    port = stage.target.port
    heads: list[socket.socket] = []
    bodies: list[socket.socket] = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /v1/functions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        heads.append(sock)
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/functions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"na")  # fmt: skip
        bodies.append(sock)
    from hutch.selftest.abuse import Watch

    trickle = threading.Event()

    def drip() -> None:
        while not trickle.is_set():
            for sock in heads:
                try:
                    sock.send(b"a")
                except OSError:
                    pass
            trickle.wait(1.0)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    with Watch(stage, "bwrap") as watch:
        time.sleep(2)
    measured = watch.report()
    checks.expect("requests of others that failed while 320 slow clients held connections", len(watch.failures), 0)
    # The deadline (the config's request_timeout; short on the battery's server) cuts every one.
    deadline = time.monotonic() + stage.request_timeout + 10
    answers: dict[str, int] = {}
    for sock in heads + bodies:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(200)
        except OSError as exc:
            data = f"no answer ({type(exc).__name__})".encode()
        line = _status_line(data)
        answers[line] = answers.get(line, 0) + 1
        sock.close()
    trickle.set()
    dripper.join()
    cut = answers.get("HTTP/1.1 408 Request Timeout", 0)
    checks.note(f"what the slow clients got: {answers}")
    checks.expect("slow clients cut with 408 at the deadline", cut, len(heads) + len(bodies))
    return _outcome(stage, "slow-loris", "slow-loris clients (heads and bodies)", checks, started, measured)


def warm_pool_hoarding(stage: Stage) -> Outcome:
    """Warm pools are instances held ready on the host's capacity: a tenant's may not exceed its
    quota, or one tenant could fill the host with idle instances and starve every other."""
    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    quota = attacker.http.get("/v1/tenants/me").json()["maxSessions"]
    spec = {"name": "sec-hoard", "runtime": "bwrap", "resources": {"memoryMB": 64, "diskMB": 16}}
    for size in (64, quota + 1):
        answer = attacker.http.post("/v1/functions", json={**spec, "warmPoolSize": size})
        checks.status(f"a function with {size} warm instances (quota {quota} sessions)", answer, 429,
                      code="resource_exhausted")  # fmt: skip
    made = attacker.http.post("/v1/functions", json={**spec, "warmPoolSize": 0})
    checks.status("the same function without a warm pool", made, 201)
    raised = attacker.http.put("/v1/functions/sec-hoard", json={**spec, "warmPoolSize": quota + 1})
    checks.status(f"raising its warm pool to {quota + 1} later", raised, 429, code="resource_exhausted")
    attacker.http.delete("/v1/functions/sec-hoard")
    checks.expect("warm instances the attacker's functions hold", _warm(stage, attacker.tenant_id), 0)
    return _outcome(stage, "warm-pool-hoarding", "warm pools beyond the tenant's quota", checks, started)


def _warm(stage: Stage, tenant_id: str) -> int:
    pools = stage.target.admin.get("/health").json().get("warmPools", {})
    return sum(size for key, size in pools.items() if key.startswith(f"{tenant_id}/"))


def mcp_output_flood(stage: Stage) -> Outcome:
    """hutch's own MCP tools (`/mcp`, in hutch's process) asked for endless output and a huge file:
    what a tool call keeps is capped, so hutch's memory must not follow the sandbox's output."""
    import asyncio

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from hutch.selftest.abuse import Watch

    started = time.monotonic()
    checks = Checks()
    attacker = stage.attacker
    assert attacker is not None
    rss = stage.target.rss_mb()

    async def script() -> None:
        http = httpx2.AsyncClient(headers={"X-API-Key": attacker.api_key}, timeout=httpx2.Timeout(60, read=300))
        async with http, Client(streamable_http_client(f"{stage.target.url}/mcp", http_client=http)) as client:
            made = await client.call_tool("create_sandbox", {"template": "sec-bwrap"})
            sandbox = made.structured_content["sandboxId"]
            flood = await client.call_tool("run_command", {"sandbox_id": sandbox, "command": "yes"})
            result = flood.structured_content or {}
            checks.expect("run_command `yes`: truncated", result.get("truncated"), True)
            checks.expect("run_command `yes`: stdout kept (bytes)", len(result.get("stdout", "")), 1024 * 1024)
            await client.call_tool(
                "run_command", {"sandbox_id": sandbox, "command": "head -c 40000000 /dev/urandom > big"}
            )
            read = await client.call_tool("read_file", {"sandbox_id": sandbox, "path": "big"})
            said = read.content[0].text if read.content else ""  # type: ignore[union-attr]
            checks.expect(
                "read_file of a 40 MB file: refused, saying why", read.is_error and "larger than" in said, True
            )
            cell = await client.call_tool(
                "run_code", {"sandbox_id": sandbox, "code": "for _ in range(200000): print('x' * 100)"}
            )
            output = cell.structured_content or {}
            checks.note(
                f"run_code printing 20 MB: {len(output.get('stdout', ''))} bytes kept, error {output.get('error')}"
            )
            checks.expect("run_code printing 20 MB: truncated", output.get("truncated"), True)
            await client.call_tool("end_sandbox", {"sandbox_id": sandbox})

    with Watch(stage, "bwrap") as watch:
        asyncio.run(script())
    grew = watch.peak_rss - rss
    checks.expect("hutch's memory grew by less than 64 MiB", grew < 64, True)
    measured = {**watch.report(), "hutch RSS": f"{rss:.0f} MiB -> peak {watch.peak_rss:.0f} MiB"}
    title = "hutch's own MCP tools asked for endless output and a huge file"
    return _outcome(stage, "mcp-output-flood", title, checks, started, measured)


ATTACKS: tuple[tuple[str, Callable[[Stage], Outcome]], ...] = (
    ("cross-tenant-ids", cross_tenant_ids),
    ("guessed-ids", guessed_ids),
    ("e2b-headers", e2b_headers),
    ("forged-cookies", forged_cookies),
    ("mcp-session-ids", mcp_session_ids),
    ("oversized-bodies", oversized_bodies),
    ("oversized-headers", oversized_headers),
    ("malformed-json", malformed_json),
    ("connect-envelopes", connect_envelopes),
    ("slow-loris", slow_loris),
    ("warm-pool-hoarding", warm_pool_hoarding),
    ("mcp-output-flood", mcp_output_flood),
)


def plan() -> list:
    from hutch.selftest.battery import Attack

    return [Attack(name, "server", run) for name, run in ATTACKS]
