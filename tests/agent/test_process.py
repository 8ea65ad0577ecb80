"""process.Process over Connect (JSON codec), against the real agent process."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time

from tests.connect_wire import STREAM_TYPE, envelope, iter_stream, parse_envelopes, server_stream, unary

START = "/process.Process/Start"


def _decode(events, key="stdout"):
    return b"".join(
        base64.b64decode(e["event"]["data"][key])
        for _, e in events
        if "event" in e and "data" in e["event"] and key in e["event"]["data"]
    )


def _end(events):
    return next(e["event"]["end"] for _, e in events if "event" in e and "end" in e["event"])


def test_start_streams_start_output_and_end_then_closes_the_stream(agent):
    events = server_stream(
        agent.client, START, {"process": {"cmd": "/bin/sh", "args": ["-c", "echo out; echo err >&2; exit 3"]}}
    )
    assert "start" in events[0][1]["event"] and events[0][1]["event"]["start"]["pid"] > 0
    assert _decode(events) == b"out\n"
    assert _decode(events, "stderr") == b"err\n"
    assert _end(events) == {"exitCode": 3, "exited": True, "status": "exit status 3"}
    assert events[-1] == (0x02, {})  # the end-of-stream envelope, no error


def test_a_killed_process_reports_the_signal(agent):
    events = server_stream(agent.client, START, {"process": {"cmd": "/bin/sh", "args": ["-c", "kill -9 $$"]}})
    assert _end(events) == {"exitCode": -1, "exited": False, "status": "signal: killed"}


def test_envs_and_cwd_apply_and_relative_cwd_starts_at_home(agent):
    (agent.home / "sub").mkdir()
    events = server_stream(
        agent.client,
        START,
        {
            "process": {
                "cmd": "/bin/sh",
                "args": ["-c", "echo $GREETING; pwd"],
                "envs": {"GREETING": "hi"},
                "cwd": "sub",
            }
        },
    )
    assert _decode(events) == f"hi\n{agent.home / 'sub'}\n".encode()


def test_start_failures_end_the_stream_with_a_connect_error(agent):
    missing = server_stream(agent.client, START, {"process": {"cmd": "/does/not/exist"}})
    assert missing[-1][0] == 0x02 and missing[-1][1]["error"]["code"] == "invalid_argument"
    no_cmd = server_stream(agent.client, START, {"process": {}})
    assert no_cmd[-1][1]["error"]["code"] == "invalid_argument"
    bad_cwd = server_stream(agent.client, START, {"process": {"cmd": "/bin/true", "cwd": "/nowhere/at/all"}})
    assert bad_cwd[-1][1]["error"]["code"] == "not_found"


def test_unary_errors_use_http_status_and_connect_codes(agent):
    response = unary(
        agent.client, "/process.Process/SendSignal", {"process": {"pid": 999999}, "signal": "SIGNAL_SIGTERM"}
    )
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
    response = agent.client.post(
        "/process.Process/List", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["code"] == "invalid_argument"
    response = agent.client.post("/process.Process/Nope", json={})
    assert response.json()["code"] == "unimplemented"
    response = agent.client.post(
        "/process.Process/List", content=b"\x00", headers={"content-type": "application/proto"}
    )
    assert response.json()["code"] == "unimplemented"


def test_a_background_process_outlives_its_request_and_can_be_reattached_by_tag(agent):
    stream = iter_stream(
        agent.client,
        START,
        {"process": {"cmd": "/bin/sh", "args": ["-c", "read line; echo got:$line"]}, "stdin": True, "tag": "bg"},
    )
    _, first = next(stream)
    pid = first["event"]["start"]["pid"]
    stream.close()  # the client goes away; the process must not
    listed = unary(agent.client, "/process.Process/List", {}).json()["processes"]
    assert any(p["pid"] == pid and p["tag"] == "bg" for p in listed)

    received = []

    def follow():
        received.extend(iter_stream(agent.client, "/process.Process/Connect", {"process": {"tag": "bg"}}))

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.3)  # let Connect subscribe before the output exists
    data = base64.b64encode(b"hello\n").decode()
    assert (
        unary(
            agent.client, "/process.Process/SendInput", {"process": {"pid": pid}, "input": {"stdin": data}}
        ).status_code
        == 200
    )
    follower.join(10)
    assert _decode(received) == b"got:hello\n"
    assert _end(received)["exitCode"] == 0
    assert all(p["pid"] != pid for p in unary(agent.client, "/process.Process/List", {}).json()["processes"])


def test_close_stdin_sends_eof(agent):
    stream = iter_stream(agent.client, START, {"process": {"cmd": "/bin/cat"}, "stdin": True})
    _, first = next(stream)
    pid = first["event"]["start"]["pid"]
    unary(
        agent.client,
        "/process.Process/SendInput",
        {"process": {"pid": pid}, "input": {"stdin": base64.b64encode(b"abc").decode()}},
    )
    unary(agent.client, "/process.Process/CloseStdin", {"process": {"pid": pid}})
    rest = list(stream)
    assert _decode(rest) == b"abc"
    assert _end(rest)["exitCode"] == 0


def test_stream_input_feeds_stdin_in_order(agent):
    stream = iter_stream(agent.client, START, {"process": {"cmd": "/bin/cat"}, "stdin": True})
    _, first = next(stream)
    pid = first["event"]["start"]["pid"]
    body = envelope({"start": {"process": {"pid": pid}}})
    for part in (b"one ", b"two ", b"three"):
        body += envelope({"data": {"input": {"stdin": base64.b64encode(part).decode()}}})
    body += envelope({"keepalive": {}})
    response = agent.client.post("/process.Process/StreamInput", content=body, headers={"content-type": STREAM_TYPE})
    assert response.status_code == 200 and parse_envelopes(response.content)[-1] == (0x02, {})
    unary(agent.client, "/process.Process/CloseStdin", {"process": {"pid": pid}})
    assert _decode(list(stream)) == b"one two three"


def test_send_signal_terminates_the_whole_process_group(agent):
    stream = iter_stream(
        agent.client, START, {"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 60 & sleep 60; wait"]}}
    )
    _, first = next(stream)
    pid = first["event"]["start"]["pid"]
    unary(agent.client, "/process.Process/SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})
    assert _end(list(stream))["status"] == "signal: killed"


def test_keepalives_arrive_on_a_quiet_stream(agent):
    events = server_stream(
        agent.client,
        START,
        {"process": {"cmd": "/bin/sleep", "args": ["0.7"]}},
        headers={"Keepalive-Ping-Interval": "0.2"},
    )
    keepalives = [e for _, e in events if "event" in e and "keepalive" in e["event"]]
    assert len(keepalives) >= 2


def test_a_pty_process_gets_a_terminal_and_can_be_resized(agent):
    stream = iter_stream(
        agent.client,
        START,
        {
            "process": {"cmd": "/bin/bash", "args": ["-c", "read x; stty size; tty"]},
            "pty": {"size": {"cols": 100, "rows": 30}},
        },
    )
    _, first = next(stream)
    pid = first["event"]["start"]["pid"]
    unary(
        agent.client, "/process.Process/Update", {"process": {"pid": pid}, "pty": {"size": {"cols": 120, "rows": 40}}}
    )
    unary(
        agent.client,
        "/process.Process/SendInput",
        {"process": {"pid": pid}, "input": {"pty": base64.b64encode(b"go\n").decode()}},
    )
    rest = list(stream)
    output = _decode(rest, "pty").decode()
    assert "40 120" in output and "/dev/pts/" in output
    assert unary(agent.client, "/process.Process/CloseStdin", {"process": {"pid": 1}}).status_code == 404


def test_large_output_arrives_whole_and_in_order(agent):
    events = server_stream(
        agent.client,
        START,
        {
            "process": {
                "cmd": "/usr/bin/env",
                "args": ["python3", "-c", "import sys; sys.stdout.write('x' * 5_000_000)"],
            }
        },
    )
    assert _decode(events) == b"x" * 5_000_000


def test_envelopes_are_length_prefixed_json(agent):
    raw = agent.client.post(
        START,
        content=envelope({"process": {"cmd": "/bin/echo", "args": ["framed"]}}),
        headers={"content-type": STREAM_TYPE},
    ).content
    offset = 0
    flags_seen = []
    while offset < len(raw):
        flags, length = struct.unpack(">BI", raw[offset : offset + 5])
        json.loads(raw[offset + 5 : offset + 5 + length])  # each payload is one JSON document
        flags_seen.append(flags)
        offset += 5 + length
    assert offset == len(raw)
    assert flags_seen[-1] == 0x02 and set(flags_seen[:-1]) == {0}
