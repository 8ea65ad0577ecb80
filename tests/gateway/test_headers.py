"""Hop-by-hop filtering (RFC 9110 §7.6.1) and the request head sent to instances."""

from __future__ import annotations

from hutch.gateway import headers as hop


def test_connection_and_every_header_it_lists_are_removed_from_requests():
    out, chunked = hop.request_headers(
        [
            (b"host", b"h"),
            (b"connection", b"Keep-Alive, X-Private"),
            (b"connection", b"x-other"),
            (b"x-private", b"1"),
            (b"x-other", b"2"),
            (b"keep-alive", b"timeout=5"),
            (b"x-end", b"3"),
        ]
    )
    assert out == [(b"host", b"h"), (b"x-end", b"3")] and not chunked


def test_te_trailer_upgrade_proxy_and_framing_headers_are_not_copied():
    out, chunked = hop.request_headers(
        [
            (b"te", b"trailers"),
            (b"trailer", b"x-checksum"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"Basic Zm9v"),
            (b"proxy-connection", b"keep-alive"),
            (b"transfer-encoding", b"gzip, chunked"),
            (b"content-length", b"10"),
            (b"expect", b"100-continue"),
            (b"authorization", b"Bearer end-to-end"),
        ]
    )
    assert out == [(b"authorization", b"Bearer end-to-end"), (b"host", b"localhost")]
    assert chunked


def test_the_content_length_of_a_request_is_found():
    assert hop.content_length([(b"a", b"1"), (b"content-length", b"42")]) == b"42"
    assert hop.content_length([(b"a", b"1")]) is None


def test_requested_drops_apply_on_top_of_hop_by_hop():
    out, _ = hop.request_headers(
        [(b"host", b"h"), (b"x-api-key", b"hk"), (b"x-keep", b"1")], drop=frozenset({b"x-api-key"})
    )
    assert out == [(b"host", b"h"), (b"x-keep", b"1")]


def test_answers_lose_hop_by_hop_headers_and_say_whether_they_are_sized():
    out, sized = hop.response_headers(
        [
            (b"connection", b"close, x-hop"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
            (b"content-type", b"text/event-stream"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]
    )
    assert out == [(b"content-type", b"text/event-stream"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]
    assert not sized
    _, sized = hop.response_headers([(b"content-length", b"3")])
    assert sized


def test_websocket_handshake_headers_are_left_to_the_upstream_client():
    out = hop.websocket_headers(
        [
            (b"host", b"h"),
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-key", b"k"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-extensions", b"permessage-deflate"),
            (b"sec-websocket-protocol", b"chat"),
            (b"origin", b"https://app"),
            (b"cookie", b"a=1"),
        ]
    )
    assert out == [(b"origin", b"https://app"), (b"cookie", b"a=1")]


def test_the_request_head_is_http_1_1_with_crlf_lines():
    head = hop.request_head(b"POST", b"/a?b=1", [(b"host", b"h"), (b"content-length", b"0")])
    assert head == b"POST /a?b=1 HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
