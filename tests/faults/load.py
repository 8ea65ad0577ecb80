"""Many sessions at once, every answer checked against the session it was meant for.

The driver behind `tests/faults/test_load.py` (a modest size, in CI) and `bench/load.py` (200
sessions and more, with a report). It makes its tenant and four functions on a running server
and starts sessions of four kinds, each with an identity (a random token) that only its own
instance knows:
- `header`: HEADER_FIELD sessions created through the API with the token in their environment;
  their first request has the instance write `$LOAD_ID` into `identity` and echo it;
- `cookie`: GENERATED_COOKIE sessions started by their first request, an upload of `identity`
  (the token), whose answer sets the session cookie;
- `e2b`: sandboxes created through E2B's API (`POST /sandboxes`, `envVars`), reached with the
  `E2b-Sandbox-Id`/`E2b-Sandbox-Port` headers and their access token, identity as for `header`;
- `server`: a function whose instances run a user HTTP server that answers every request with
  the `LOAD_ID` of its environment (its instances start with the session's environment).
Then every session gets `requests` requests, interleaved at random across `concurrency`
clients: reads of `identity` through envd's `/files`, commands (`cat identity; echo $LOAD_ID`)
through envd's process service, and for `server` sessions GETs of the user server. Each answer
must carry exactly its session's token: a token of another session is a misroute, anything else
an error. At the end every session must still be Active, on the instance it started on.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import statistics
import time
from dataclasses import dataclass, field
from http.cookiejar import CookieJar

import httpx

from tests.connect_wire import envelope, split, stdout_of

KINDS = ("header", "cookie", "e2b", "server")
RESOURCES = {"cpu": 0.25, "memoryMB": 128, "diskMB": 64, "pids": 64, "tmpMB": 16}
ECHO_SERVER = (
    "import http.server, os\n"
    "token = os.environ['LOAD_ID'].encode()\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    protocol_version = 'HTTP/1.1'\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.send_header('content-length', str(len(token))); self.end_headers()\n"
    "        self.wfile.write(token)\n"
    "    def log_message(self, *args): pass\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', 8080), H).serve_forever()\n"
)
FUNCTIONS = {
    "load-h": {"sessionAffinity": "HEADER_FIELD"},
    "load-c": {"sessionAffinity": "GENERATED_COOKIE"},
    "load-s": {"sessionAffinity": "HEADER_FIELD", "startCommand": ["python3", "-c", ECHO_SERVER], "port": 8080},
}
HEADER = "x-fc-session-id"
COOKIE = "x-fc-cookie-session-id"
CONNECT = "application/connect+json"


class _NoJar(CookieJar):
    """Keeps no cookie: the load's one client speaks for many sessions."""

    def extract_cookies(self, response, request) -> None:
        pass

    def set_cookie(self, cookie) -> None:
        pass


@dataclass
class Session:
    kind: str
    token: str
    key: str = ""  # header / server: the session id; cookie: the cookie's value; e2b: the sandbox id
    access_token: str = ""  # e2b
    container: str = ""  # the instance it started on


@dataclass
class Result:
    """What a load run saw; latencies in milliseconds."""

    sessions: int = 0
    requests: int = 0
    ok: int = 0
    misroutes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)  # per request kind
    create_ms: list[float] = field(default_factory=list)
    lost_sessions: list[str] = field(default_factory=list)
    rebound_sessions: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        every = [v for values in self.latencies.values() for v in values]
        return {
            "sessions": self.sessions,
            "requests": self.requests,
            "ok": self.ok,
            "misroutes": len(self.misroutes),
            "errors": len(self.errors),
            "error_rate": len(self.errors) / self.requests if self.requests else 0.0,
            "lost_sessions": len(self.lost_sessions),
            "rebound_sessions": len(self.rebound_sessions),
            "requests_per_second": self.requests / self.seconds if self.seconds else 0.0,
            "latency_ms": {"all": percentiles(every), **{k: percentiles(v) for k, v in sorted(self.latencies.items())}},
            "create_ms": percentiles(self.create_ms),
            "memory": self.memory,
        }


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": round(statistics.median(ordered), 2), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 2)}


def _connect(command: str) -> bytes:
    return envelope({"process": {"cmd": "/bin/bash", "args": ["-c", command]}})


def _stdout(data: bytes) -> str | None:
    """The stdout of a Connect process stream; None unless it ended cleanly."""
    ended = any(flags & 2 and "error" not in message for flags, message in split(data)[0])
    return stdout_of(data) if ended else None


class Load:
    """One load run against a server at `url`, as a fresh tenant made with the admin key."""

    def __init__(self, url: str, admin_key: str, concurrency: int = 32, seed: int = 0) -> None:
        self.url = url
        self.admin_key = admin_key
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.result = Result()
        self.sessions: list[Session] = []
        self.tokens: set[str] = set()
        self.http: httpx.AsyncClient | None = None

    # -- set-up ------------------------------------------------------------------------------

    async def prepare(self, sessions: int) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency * 2)
        admin = httpx.AsyncClient(base_url=self.url, headers={"X-API-Key": self.admin_key}, timeout=120)
        async with admin:
            tenant = {"name": f"load-{secrets.token_hex(3)}", "maxSessions": sessions * 2}
            made = await admin.post("/v1/tenants", json=tenant)
            made.raise_for_status()
            key = made.json()["apiKey"]
        # One client for every session: it must keep no cookie (each request carries its own).
        self.http = httpx.AsyncClient(
            base_url=self.url, headers={"X-API-Key": key}, timeout=120, limits=limits, cookies=_NoJar()
        )
        for name, extra in FUNCTIONS.items():
            body = {"name": name, "resources": RESOURCES, "warmPoolSize": 0, **extra}
            response = await self.http.post("/v1/functions", json=body)
            assert response.status_code == 201, response.text
        plan = [KINDS[n % len(KINDS)] for n in range(sessions)]
        gate = asyncio.Semaphore(max(1, min(8, self.concurrency)))

        async def start(n: int, kind: str) -> None:
            async with gate:
                session = Session(kind, secrets.token_hex(8))
                self.tokens.add(session.token)  # even if its start fails: an answer with it is a misroute
                started = time.perf_counter()
                try:
                    await getattr(self, f"_start_{kind}")(session, n)
                except (AssertionError, httpx.HTTPError, KeyError, ValueError) as exc:
                    self.result.errors.append(f"create {kind} #{n}: {exc!r}"[:300])
                    return
                self.result.create_ms.append((time.perf_counter() - started) * 1000)
                self.sessions.append(session)

        await asyncio.gather(*(start(n, kind) for n, kind in enumerate(plan)))
        self.result.sessions = len(self.sessions)
        listed = await self._active()
        for session in self.sessions:
            session.container = listed.get(session.key, {}).get("containerId", "")

    async def _start_header(self, session: Session, n: int) -> None:
        session.key = f"h{n}-{session.token[:6]}"
        body = {"sessionId": session.key, "environmentVariables": {"LOAD_ID": session.token}}
        created = await self.http.post("/v1/functions/load-h/sessions", json=body)
        assert created.status_code == 201, created.text
        answer = await self.http.post(
            "/functions/load-h/invoke/process.Process/Start",
            content=_connect('printf %s "$LOAD_ID" > identity; printf %s "$LOAD_ID"'),
            headers={HEADER: session.key, "content-type": CONNECT},
        )
        assert answer.status_code == 200 and _stdout(answer.content) == session.token, answer.text[:200]

    async def _start_cookie(self, session: Session, n: int) -> None:
        answer = await self.http.post(
            "/functions/load-c/invoke/files?path=identity",
            content=session.token.encode(),
            headers={"content-type": "application/octet-stream"},
        )
        assert answer.status_code == 200, answer.text[:200]
        for value in answer.headers.get_list("set-cookie"):
            name, _, rest = value.partition("=")
            if name.strip() == COOKIE:
                session.key = rest.split(";", 1)[0]
        assert session.key, f"no session cookie in {answer.headers}"

    async def _start_e2b(self, session: Session, n: int) -> None:
        created = await self.http.post(
            "/sandboxes", json={"templateID": "load-h", "timeout": 3600, "envVars": {"LOAD_ID": session.token}}
        )
        assert created.status_code == 201, created.text
        session.key, session.access_token = created.json()["sandboxID"], created.json()["envdAccessToken"]
        answer = await self.http.post(
            "/process.Process/Start",
            content=_connect('printf %s "$LOAD_ID" > identity; printf %s "$LOAD_ID"'),
            headers={**self._e2b_headers(session), "content-type": CONNECT},
        )
        assert answer.status_code == 200 and _stdout(answer.content) == session.token, answer.text[:200]

    async def _start_server(self, session: Session, n: int) -> None:
        session.key = f"s{n}-{session.token[:6]}"
        body = {"sessionId": session.key, "environmentVariables": {"LOAD_ID": session.token}}
        created = await self.http.post("/v1/functions/load-s/sessions", json=body)
        assert created.status_code == 201, created.text

    @staticmethod
    def _e2b_headers(session: Session) -> dict[str, str]:
        return {"E2b-Sandbox-Id": session.key, "E2b-Sandbox-Port": "49983", "X-Access-Token": session.access_token}

    async def _active(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        token = None
        while True:
            params = {"status": "Active", "limit": 1000, **({"nextToken": token} if token else {})}
            page = (await self.http.get("/v1/sessions", params=params)).json()
            out.update({s["sessionId"]: s for s in page["sessions"]})
            token = page.get("nextToken")
            if not token:
                return out

    # -- the load ----------------------------------------------------------------------------

    async def _one(self, session: Session, command: bool) -> tuple[str, httpx.Response, str | None]:
        """One request for a session; (request kind, answer, the token it carried or None)."""
        http = self.http
        if session.kind == "server":
            answer = await http.get("/functions/load-s/invoke/", headers={HEADER: session.key})
            return "server GET", answer, answer.text if answer.status_code == 200 else None
        if session.kind == "e2b":
            headers, path = self._e2b_headers(session), ""
        elif session.kind == "cookie":
            headers, path = {"cookie": f"{COOKIE}={session.key}"}, "/functions/load-c/invoke"
        else:
            headers, path = {HEADER: session.key}, "/functions/load-h/invoke"
        if command and session.kind != "cookie":
            answer = await http.post(
                f"{path}/process.Process/Start",
                content=_connect('cat identity; printf " %s" "$LOAD_ID"'),
                headers={**headers, "content-type": CONNECT},
            )
            out = _stdout(answer.content) if answer.status_code == 200 else None
            if out is not None:
                file_token, _, env_token = out.partition(" ")
                out = file_token if file_token == env_token else f"{file_token}|{env_token}"
            return f"{session.kind} command", answer, out
        answer = await http.get(f"{path}/files", params={"path": "identity"}, headers=headers)
        return f"{session.kind} read", answer, answer.text if answer.status_code == 200 else None

    async def run(self, requests_per_session: int, command_share: float = 0.2) -> Result:
        work = [(s, self.rng.random() < command_share) for s in self.sessions for _ in range(requests_per_session)]
        self.rng.shuffle(work)
        queue: asyncio.Queue = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        result = self.result

        async def client() -> None:
            while not queue.empty():
                session, command = queue.get_nowait()
                started = time.perf_counter()
                try:
                    kind, answer, token = await self._one(session, command)
                except httpx.HTTPError as exc:
                    result.requests += 1
                    result.errors.append(f"{session.kind} {session.key}: {exc!r}"[:300])
                    continue
                took = (time.perf_counter() - started) * 1000
                result.requests += 1
                result.latencies.setdefault(kind, []).append(took)
                if token == session.token:
                    result.ok += 1
                elif token is not None and any(part in self.tokens for part in token.split("|")):
                    result.misroutes.append(f"{kind} for {session.key} answered {token!r}")
                else:
                    result.errors.append(f"{kind} {session.key}: {answer.status_code} {answer.text[:150]!r}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(self.concurrency)))
        result.seconds = time.perf_counter() - started
        listed = await self._active()
        for session in self.sessions:
            now = listed.get(session.key)
            if now is None:
                result.lost_sessions.append(session.key)
            elif now["containerId"] != session.container or now["epoch"] != 0:
                result.rebound_sessions.append(session.key)
        return result

    async def close(self, end_sessions: bool = True) -> None:
        if self.http is None:
            return
        if end_sessions:
            for session in self.sessions:
                if session.kind == "e2b":
                    await self.http.delete(f"/sandboxes/{session.key}")
                else:
                    function = {"header": "load-h", "cookie": "load-c", "server": "load-s"}[session.kind]
                    await self.http.delete(f"/v1/functions/{function}/sessions/{session.key}")
        await self.http.aclose()


async def run_load(
    url: str, admin_key: str, sessions: int, requests_per_session: int, concurrency: int = 32, seed: int = 0
) -> Result:
    """Start `sessions` sessions, send each `requests_per_session` requests, check every answer."""
    load = Load(url, admin_key, concurrency, seed)
    try:
        await load.prepare(sessions)
        return await load.run(requests_per_session)
    finally:
        await load.close()
