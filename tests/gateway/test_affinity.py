"""Session keys from headers and cookies, and what the answer gives the client back."""

from __future__ import annotations

import pytest

from hutch.errors import InvalidArgument
from hutch.functions import FunctionSpec
from hutch.gateway import affinity


def _spec(mode: str = "HEADER_FIELD", **config) -> FunctionSpec:
    return FunctionSpec.model_validate({"name": "fn", "sessionAffinity": mode, "sessionAffinityConfig": config})


def test_the_default_header_carries_the_key():
    assert affinity.session_key(_spec(), [(b"x-fc-session-id", b"user_42-a")]) == "user_42-a"


def test_a_request_without_the_header_starts_a_new_session():
    assert affinity.session_key(_spec(), [(b"host", b"h")]) is None


def test_a_function_can_name_its_own_header_case_insensitively():
    spec = _spec(headerName="X-Agent-Session")
    assert affinity.session_key(spec, [(b"x-agent-session", b"abc")]) == "abc"
    assert affinity.session_key(spec, [(b"x-fc-session-id", b"abc")]) is None


@pytest.mark.parametrize("value", [b"", b"-lead", b"has space", b"a/b", b"x" * 65, b"caf\xc3\xa9", b"a\tb"])
def test_malformed_keys_are_rejected_with_the_rule(value):
    with pytest.raises(InvalidArgument) as caught:
        affinity.session_key(_spec(), [(b"x-fc-session-id", value)])
    assert "x-fc-session-id" in caught.value.message and "1-64 characters" in caught.value.message


def test_the_longest_allowed_key_is_64_characters():
    assert affinity.session_key(_spec(), [(b"x-fc-session-id", b"_" + b"a" * 63)]) == "_" + "a" * 63


def test_the_cookie_carries_the_key_in_cookie_mode():
    spec = _spec("GENERATED_COOKIE")
    headers = [(b"cookie", b'theme=dark; x-fc-cookie-session-id="abc_1"; other=1')]
    assert affinity.session_key(spec, headers) == "abc_1"
    assert affinity.session_key(spec, [(b"x-fc-session-id", b"abc")]) is None


def test_a_malformed_cookie_is_rejected():
    with pytest.raises(InvalidArgument):
        affinity.session_key(_spec("GENERATED_COOKIE"), [(b"cookie", b"x-fc-cookie-session-id=a b")])
    with pytest.raises(InvalidArgument):
        affinity.session_key(_spec("GENERATED_COOKIE"), [(b"cookie", b"x-fc-cookie-session-id=")])


def test_a_cookie_with_a_longer_name_is_not_mistaken_for_the_session_cookie():
    headers = [(b"cookie", b"my-x-fc-cookie-session-id=abc")]
    assert affinity.session_key(_spec("GENERATED_COOKIE"), headers) is None


@pytest.mark.parametrize("mode", ["MCP_STREAMABLE", "MCP_SSE"])
def test_mcp_requests_without_an_mcp_session_name_one_by_param_header_or_cookie_in_that_order(mode):
    spec = _spec(mode)
    param = (b"mcp-param-sandbox-id", b"by-param")
    header = (b"x-fc-session-id", b"by-header")
    cookie = (b"cookie", b"x-fc-cookie-session-id=by-cookie")
    assert affinity.session_key(spec, [cookie, header, param]) == "by-param"
    assert affinity.session_key(spec, [cookie, header]) == "by-header"
    assert affinity.session_key(spec, [cookie]) == "by-cookie"
    assert affinity.session_key(spec, []) is None


def test_a_base64_wrapped_mcp_param_header_is_decoded_before_the_id_rule_applies():
    assert affinity.mcp_param_key([(b"mcp-param-sandbox-id", b"=?base64?c2FuZGJveC0x?=")]) == "sandbox-1"
    with pytest.raises(InvalidArgument):
        affinity.mcp_param_key([(b"mcp-param-sandbox-id", b"=?base64?L2V0Yy9wYXNzd2Q=?=")])  # "/etc/passwd"
    with pytest.raises(InvalidArgument):
        affinity.mcp_param_key([(b"mcp-param-sandbox-id", b"=?base64?!!?=")])


def test_header_mode_echoes_the_session_id_in_the_same_header():
    spec = _spec(headerName="X-My-Session")
    assert affinity.response_headers(spec, "s1", 600, created=False) == [(b"x-my-session", b"s1")]


def test_cookie_mode_sets_the_cookie_only_on_the_answer_that_created_the_session():
    spec = _spec("GENERATED_COOKIE", cookieName="sid")
    assert affinity.response_headers(spec, "s1", 600, created=True) == [
        (b"set-cookie", b"sid=s1; Path=/; Max-Age=600; HttpOnly")
    ]
    assert affinity.response_headers(spec, "s1", 600, created=False) == []
