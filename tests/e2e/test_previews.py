"""Host-named traffic on the preview listener: `{port}-{sandboxId}.{domain}` reaches a port of a
sandbox (user servers, streams, WebSockets, envd's signed file URLs), with E2B's private traffic
token and host mask. Real requests carry those Host names to a real `hutch serve`; the official
SDK makes the sandboxes and computes the host names and signed URLs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from e2b import Sandbox
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.e2e.conftest import Server, _cleanup, free_port
from tests.e2e.test_gateway import HTTP_SERVER, WS_SERVER


@pytest.fixture(scope="module")
def preview():
    """A server whose preview listener is on a port of its own; `domain` is the default, localhost."""
    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-preview-", dir="/var/tmp"))
    root.chmod(0o755)
    port = free_port()
    srv = Server(root / "data", f'[warm_pools]\nbase = 1\n"code-interpreter-v1" = 0\n[preview]\nport = {port}\n')
    srv.preview_port = port  # type: ignore[attr-defined]
    srv.start()
    yield srv
    _cleanup(srv)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sdk(preview, monkeypatch):
    tenant = preview.new_tenant("preview")
    monkeypatch.setenv("E2B_API_URL", preview.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", preview.url)
    monkeypatch.setenv("E2B_API_KEY", tenant.headers["X-API-Key"])
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    yield tenant
    for sandbox in tenant.get("/v2/sandboxes").json():
        tenant.delete(f"/sandboxes/{sandbox['sandboxID']}")


def _wait_for(predicate, timeout: float = 20.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def _via_host(preview: Server, host: str, path: str = "/", **kwargs) -> httpx.Response:
    """A request to the preview listener carrying `host` (what a browser sends once DNS resolves it)."""
    kwargs.setdefault("timeout", 30)
    method = kwargs.pop("method", "GET")
    headers = {"Host": host, **kwargs.pop("headers", {})}
    return httpx.request(method, f"http://127.0.0.1:{preview.preview_port}{path}", headers=headers, **kwargs)


def _url_via_host(preview: Server, url: str, **kwargs) -> httpx.Response:
    """Fetch an SDK-made `https://{host}/...` URL over the preview listener, Host kept."""
    parts = urlsplit(url)
    return _via_host(preview, parts.netloc, f"{parts.path}?{parts.query}", **kwargs)


def _serve(box: Sandbox) -> None:
    box.files.write("/home/user/web.py", HTTP_SERVER)
    box.files.write("/home/user/ws.py", WS_SERVER)
    box.commands.run("python3 web.py", background=True)
    box.commands.run("python3 ws.py", background=True)


def test_a_user_server_is_previewed_by_host_name_streams_and_websockets_included(preview, sdk):
    box = Sandbox.create(timeout=120)
    host = box.get_host(8080)
    assert host == f"8080-{box.sandbox_id}.localhost:{preview.preview_port}"  # the domain hutch reports
    _serve(box)
    whoami = _wait_for(lambda: (r := _via_host(preview, host, "/whoami")).status_code == 200 and r)
    assert _headers(whoami)["host"] == host  # unmasked: the client's own

    with httpx.stream(
        "GET",
        f"http://127.0.0.1:{preview.preview_port}/sse",
        params={"stream": "s"},
        headers={"Host": host},
        timeout=30,
    ) as events:
        lines = events.iter_lines()
        assert next(lines) == "id: 0"  # the first event, before the stream ends
        _via_host(preview, host, "/ack", method="POST", params={"stream": "s", "i": "0"})
        _via_host(preview, host, "/ack", method="POST", params={"stream": "s", "i": "1"})
        rest = [line for line in lines if line.startswith("data")]
    assert rest == ["data: event 0", "data: event 1", "data: event 2"]

    ws_host = box.get_host(8081)
    echoed = _wait_for(lambda: _ws_echo(preview.preview_port, ws_host))
    assert echoed == "hello"

    before = _activity(sdk, box.sandbox_id)
    _via_host(preview, host, "/whoami")
    assert _wait_for(lambda: _activity(sdk, box.sandbox_id) > before, timeout=10)  # a preview is activity


def _headers(whoami: httpx.Response) -> dict[str, str]:
    return {name.lower(): value for name, value in whoami.json()["headers"].items()}


def _ws_echo(port: int, host: str) -> str | None:
    """A WebSocket to `ws://{host}/`, its connection made to the preview listener (DNS's part)."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        with ws_connect(f"ws://{host}/", sock=sock, subprotocols=["echo"]) as ws:
            ws.send("hello")
            return str(ws.recv(timeout=10))
    except (OSError, InvalidStatus):
        return None  # the server is not listening yet


def _activity(client: httpx.Client, sandbox_id: str) -> str:
    sessions = client.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    return next(s["lastActivityTime"] for s in sessions if s["sessionId"] == sandbox_id)


def test_a_native_session_s_user_server_is_previewed_by_its_preview_id(preview):
    client = preview.new_tenant("native")
    function = {"name": "web", "startCommand": ["python3", "-c", HTTP_SERVER], "port": 8080}
    assert client.post("/v1/functions", json=function).status_code == 201
    made = client.post("/v1/functions/web/sessions", json={"sessionId": "user-42"}).json()
    host = f"8080-{made['previewId']}.localhost:{preview.preview_port}"
    whoami = _wait_for(lambda: (r := _via_host(preview, host, "/whoami")).status_code == 200 and r)
    assert _headers(whoami)["host"] == host and "x-api-key" not in _headers(whoami)
    agent = _via_host(preview, f"49983-{made['previewId']}.localhost", "/envs")
    assert agent.status_code == 403 and "/functions/{name}/invoke" in agent.json()["message"]
    guessed = _via_host(preview, f"8080-user-42.localhost:{preview.preview_port}", "/whoami")
    assert guessed.status_code == 502  # a client-chosen id names no host: it is neither unique nor secret
    client.delete("/v1/functions/web/sessions/user-42")
    ended = _via_host(preview, host, "/whoami")
    assert ended.status_code == 502 and "was not found" in ended.json()["message"]


def test_the_preview_listener_answers_hosts_it_does_not_know_with_a_404(preview):
    unknown = _via_host(preview, "api.localhost")
    assert unknown.status_code == 404 and unknown.json()["code"] == 404
    gone = _via_host(preview, f"8080-inosuchsandbox000000.localhost:{preview.preview_port}")
    assert gone.status_code == 502 and "was not found" in gone.json()["message"]


def test_private_traffic_needs_the_traffic_access_token_and_the_mask_is_the_host_seen(preview, sdk):
    box = Sandbox.create(
        timeout=120, network={"allow_public_traffic": False, "mask_request_host": "${PORT}-app.example.com"}
    )
    token = box.traffic_access_token
    assert token
    info = sdk.get(f"/sandboxes/{box.sandbox_id}").json()["network"]
    assert info["allowPublicTraffic"] is False and info["maskRequestHost"] == "${PORT}-app.example.com"
    _serve(box)
    host = box.get_host(8080)
    with_token = {"e2b-traffic-access-token": token}
    whoami = _wait_for(lambda: (r := _via_host(preview, host, "/whoami", headers=with_token)).status_code == 200 and r)
    seen = _headers(whoami)
    assert seen["host"] == "8080-app.example.com" and "e2b-traffic-access-token" not in seen

    missing = _via_host(preview, host, "/whoami")
    wrong = _via_host(preview, host, "/whoami", headers={"e2b-traffic-access-token": "guess"})
    for refused in (missing, wrong):
        assert refused.status_code == 403 and refused.json()["code"] == 403
    assert box.commands.run("echo envd needs no traffic token").exit_code == 0  # as E2B: envd has its own
    listed = sdk.get("/v1/sessions", params={"status": "Active"}).json()["sessions"]
    preview_id = next(s["previewId"] for s in listed if s["sessionId"] == box.sandbox_id)
    by_row = _via_host(preview, f"8080-{preview_id}.localhost", "/whoami", headers=with_token)
    assert by_row.status_code == 502  # a sandbox is named by its sandbox id only


def test_signed_file_urls_work_without_headers_and_expired_or_altered_ones_are_refused(preview, sdk, monkeypatch):
    box = Sandbox.create(timeout=120)
    box.files.write("/home/user/report.txt", "signed")
    monkeypatch.delenv("E2B_SANDBOX_URL")  # URLs by host name, as the SDK makes them without it
    hosted = Sandbox.connect(box.sandbox_id)

    download = hosted.download_url("/home/user/report.txt")
    assert urlsplit(download).netloc == f"49983-{box.sandbox_id}.localhost:{preview.preview_port}"
    fetched = _url_via_host(preview, download)
    assert fetched.status_code == 200 and fetched.text == "signed"
    expiring = _url_via_host(preview, hosted.download_url("/home/user/report.txt", use_signature_expiration=60))
    assert expiring.status_code == 200 and expiring.text == "signed"

    upload = hosted.upload_url("/home/user/uploaded.txt")
    sent = _url_via_host(preview, upload, method="POST", files={"file": ("uploaded.txt", b"from a browser")})
    assert sent.status_code == 200
    assert box.files.read("/home/user/uploaded.txt") == "from a browser"

    expired = _url_via_host(preview, hosted.download_url("/home/user/report.txt", use_signature_expiration=-5))
    other_path = _url_via_host(preview, download.replace("report.txt", "uploaded.txt"))
    as_upload = _url_via_host(preview, download, method="POST", files={"file": ("x", b"x")})
    for refused in (expired, other_path, as_upload):
        assert refused.status_code == 401 and refused.json()["code"] == 401
    unsigned = _via_host(preview, urlsplit(download).netloc, "/files", params={"path": "/home/user/report.txt"})
    assert unsigned.status_code == 401


def test_tls_on_the_preview_port_with_the_operator_s_certificate(tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=*.localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="hutch-e2e-tls-", dir="/var/tmp"))
    root.chmod(0o755)
    port = free_port()
    config = f'[warm_pools]\nbase = 0\n"code-interpreter-v1" = 0\n[preview]\nport = {port}\n'
    config += f'tls_cert = "{cert}"\ntls_key = "{key}"\npublic_domain = "sbx.example.com"\n'
    srv = Server(root / "data", config)
    try:
        srv.start()
        tenant = srv.new_tenant("tls")
        made = tenant.post("/v2/sandboxes", json={"templateID": "base", "timeout": 60}).json()
        assert made["domain"] == "sbx.example.com"  # what the operator's DNS and proxy serve
        host = f"49983-{made['sandboxID']}.localhost"
        health = httpx.get(f"https://127.0.0.1:{port}/health", headers={"Host": host}, verify=False)
        assert health.status_code == 204
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", headers={"Host": host}, timeout=5)  # TLS only there
        assert httpx.get(f"{srv.url}/health").status_code == 200  # the main port stays as it was
    finally:
        _cleanup(srv)
        shutil.rmtree(root, ignore_errors=True)
