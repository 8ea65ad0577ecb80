"""The agent notices a streaming client that hung up (`Connection.peer_closed`), also when the
client's last bytes were never read: a chunked request body's last chunk ("0\\r\\n\\r\\n") that
arrived after the stream's handler had read the message it needed. Until then the agent held its
end of the connection for as long as the stream had nothing to send (a background command's
stream: forever), and CRIU could not dump an instance with such a half-closed socket."""

from __future__ import annotations

import socket

from hutch.agent.http import Connection


def test_a_client_that_closes_is_seen_gone_even_past_unread_bytes():
    for family in (socket.AF_UNIX, socket.AF_INET):
        agent_side, client = _pair(family)
        conn = Connection(agent_side)
        try:
            client.sendall(b"0\r\n\r\n")  # the body's last chunk, read by nobody
            assert not conn.peer_closed()  # unread bytes, the client still there
            client.close()
            assert conn.peer_closed(), family
        finally:
            agent_side.close()


def test_a_client_that_stays_is_not_seen_gone():
    agent_side, client = _pair(socket.AF_UNIX)
    conn = Connection(agent_side)
    try:
        assert not conn.peer_closed()
        client.sendall(b"GET / HTTP/1.1\r\n")  # a pipelined request: data, not a hang-up
        assert not conn.peer_closed()
    finally:
        client.close()
        agent_side.close()


def _pair(family: int) -> tuple[socket.socket, socket.socket]:
    if family == socket.AF_UNIX:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        agent_side, _ = listener.accept()
    return agent_side, client
