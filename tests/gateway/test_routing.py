"""Which requests are data-plane traffic, and how they are addressed: invoke paths, E2B headers
and hosts, and the E2B access rule (checked against the official SDK's own signature code)."""

from __future__ import annotations

import time

import pytest
from e2b.sandbox.signature import get_signature

from hutch.errors import InvalidArgument, Unauthenticated
from hutch.gateway import e2b, invoke

TOKEN = "tok_abc123"


def _scope(path: str = "/", method: str = "GET", headers=(), query: bytes = b"", raw_path: bytes | None = None):
    return {
        "type": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "method": method,
        "headers": list(headers),
        "query_string": query,
    }


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("/functions/base/invoke", ("base", "/", None)),
        ("/functions/base/invoke/", ("base", "/", None)),
        ("/functions/base/invoke/execute", ("base", "/execute", None)),
        ("/functions/my-fn/invoke/a/b/c", ("my-fn", "/a/b/c", None)),
        ("/functions/base/invoker", None),
        ("/functions/base/sessions", None),
        ("/functions/base/sessions/", None),
        ("/functions//invoke/x", None),
        ("/v1/functions/base/invoke/x", None),
        ("/functions/base", None),
    ],
)
def test_invoke_paths_name_the_function_and_the_path_on_the_instance(path, parsed):
    invocation = invoke.parse_path(path)
    found = None if invocation is None else (invocation.function, invocation.rest, invocation.session_key)
    assert found == parsed


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("/functions/mcp/sessions/s-1/mcp", ("mcp", "/mcp", "s-1", "/functions/mcp/sessions/s-1")),
        ("/functions/mcp/sessions/s-1", ("mcp", "/", "s-1", "/functions/mcp/sessions/s-1")),
        ("/functions/mcp/sessions/s-1/", ("mcp", "/", "s-1", "/functions/mcp/sessions/s-1")),
        ("/functions/web/sessions/k/a/b", ("web", "/a/b", "k", "/functions/web/sessions/k")),
    ],
)
def test_session_paths_name_the_session_as_well(path, parsed):
    invocation = invoke.parse_path(path)
    assert invocation is not None
    assert (invocation.function, invocation.rest, invocation.session_key, invocation.prefix) == parsed


def test_the_instance_gets_the_raw_path_and_the_query_unchanged():
    scope = _scope(
        "/functions/fn/invoke/a b/%2F",
        raw_path=b"/functions/fn/invoke/a%20b/%252F",
        query=b"x=1&y=%20",
    )
    assert invoke._target(scope, "/functions/fn/invoke", "/a b/%2F") == b"/a%20b/%252F?x=1&y=%20"
    bare = _scope("/functions/fn/invoke", raw_path=b"/functions/fn/invoke")
    assert invoke._target(bare, "/functions/fn/invoke", "/") == b"/"
    by_session = _scope("/functions/fn/sessions/s1/mcp", raw_path=b"/functions/fn/sessions/s1/mcp", query=b"a=1")
    assert invoke._target(by_session, "/functions/fn/sessions/s1", "/mcp") == b"/mcp?a=1"


def test_e2b_headers_name_the_sandbox_and_port():
    scope = _scope(headers=[(b"e2b-sandbox-id", b"isbx"), (b"e2b-sandbox-port", b"49983")])
    assert e2b.sandbox_address(scope, "") == ("isbx", 49983)


@pytest.mark.parametrize("port", [b"", b"x", b"0", b"70000"])
def test_a_missing_or_bad_e2b_port_is_rejected(port):
    headers = [(b"e2b-sandbox-id", b"isbx")] + ([(b"e2b-sandbox-port", port)] if port else [])
    with pytest.raises(InvalidArgument):
        e2b.sandbox_address(_scope(headers=headers), "")


@pytest.mark.parametrize(
    ("host", "address"),
    [
        (b"49983-isbx.sandbox.example.com", ("isbx", 49983)),
        (b"8080-isbx.Sandbox.Example.com:3000", ("isbx", 8080)),
        (b"8080-i-dashed-id.sandbox.example.com", ("i-dashed-id", 8080)),
        (b"sandbox.example.com", None),
        (b"api.sandbox.example.com", None),
        (b"x-isbx.sandbox.example.com", None),
        (b"8080-a.b.sandbox.example.com", None),
        (b"8080-isbx.example.org", None),
        (b"[::1]:3000", None),
    ],
)
def test_hosts_under_the_domain_name_port_and_sandbox(host, address):
    assert e2b.host_route(host, "sandbox.example.com") == address


def test_without_a_domain_hosts_are_not_e2b_traffic():
    assert e2b.sandbox_address(_scope(headers=[(b"host", b"49983-isbx.localhost")]), "") is None


def test_envd_needs_the_access_token():
    e2b.check_access(_scope("/envs", headers=[(b"x-access-token", TOKEN.encode())]), 49983, TOKEN)
    with pytest.raises(Unauthenticated):
        e2b.check_access(_scope("/envs"), 49983, TOKEN)
    with pytest.raises(Unauthenticated):
        e2b.check_access(_scope("/envs", headers=[(b"x-access-token", b"tok_abc124")]), 49983, TOKEN)


def test_envd_health_is_open():
    e2b.check_access(_scope("/health"), 49983, TOKEN)


def test_a_wrong_token_is_refused_even_where_none_is_needed():
    with pytest.raises(Unauthenticated):
        e2b.check_access(_scope("/health", headers=[(b"x-access-token", b"nope")]), 49983, TOKEN)


def test_code_execution_needs_the_token_but_contexts_do_not():
    with pytest.raises(Unauthenticated):
        e2b.check_access(_scope("/execute", "POST"), 49999, TOKEN)
    e2b.check_access(_scope("/execute", "POST", headers=[(b"x-access-token", TOKEN.encode())]), 49999, TOKEN)
    e2b.check_access(_scope("/contexts", "POST"), 49999, TOKEN)
    e2b.check_access(_scope("/contexts/abc/restart", "POST"), 49999, TOKEN)


def test_user_server_ports_are_public_like_e2b_sandboxes():
    e2b.check_access(_scope("/anything", "POST"), 8080, TOKEN)


def _file_scope(method: str, path: str, user: str | None, signature: dict) -> dict:
    from urllib.parse import urlencode

    query = {"path": path, "signature": signature["signature"]}
    if user:
        query["username"] = user
    if signature["expiration"]:
        query["signature_expiration"] = str(signature["expiration"])
    return _scope("/files", method, query=urlencode(query).encode())


@pytest.mark.parametrize(("method", "operation"), [("GET", "read"), ("POST", "write")])
@pytest.mark.parametrize("user", [None, "user"])
def test_signed_file_urls_from_the_sdk_are_accepted(method, operation, user):
    signature = get_signature("/home/user/a.txt", operation, user, TOKEN, 60)
    e2b.check_access(_file_scope(method, "/home/user/a.txt", user, signature), 49983, TOKEN)
    unexpiring = get_signature("/home/user/a.txt", operation, user, TOKEN)
    e2b.check_access(_file_scope(method, "/home/user/a.txt", user, unexpiring), 49983, TOKEN)


def test_a_signature_for_another_path_operation_or_token_is_refused():
    for signature, method, path in [
        (get_signature("/home/user/a.txt", "read", None, TOKEN), "GET", "/home/user/b.txt"),
        (get_signature("/home/user/a.txt", "read", None, TOKEN), "POST", "/home/user/a.txt"),
        (get_signature("/home/user/a.txt", "read", None, "other"), "GET", "/home/user/a.txt"),
    ]:
        with pytest.raises(Unauthenticated):
            e2b.check_access(_file_scope(method, path, None, signature), 49983, TOKEN)


def test_an_expired_signature_is_refused():
    signature = get_signature("/a", "read", None, TOKEN, 60)
    signature["expiration"] = int(time.time()) - 1
    signature["signature"] = e2b.expected_signature("/a", "read", "", TOKEN, str(signature["expiration"]))
    with pytest.raises(Unauthenticated) as caught:
        e2b.check_access(_file_scope("GET", "/a", None, signature), 49983, TOKEN)
    assert "expired" in caught.value.message
