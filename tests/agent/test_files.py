"""The agent's `/files` REST endpoint (downloads and uploads), over its socket."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import time
import zlib

import httpx
import pytest
from e2b.envd.filesystem import filesystem_pb as pb
from e2b.sandbox.filesystem.filesystem import (
    WriteInfo,
    _to_httpx_file,
    map_entry_info,
    metadata_to_headers,
    to_upload_body,
)

from tests.agent.conftest import start_agent
from tests.connect_wire import unary

OCTET = {"content-type": "application/octet-stream"}
IDENTITY = {"accept-encoding": "identity"}


def put(agent, path: str, data, headers: dict | None = None, **params) -> httpx.Response:
    return agent.client.post(
        "/files", params={"path": path, **params}, content=data, headers={**OCTET, **(headers or {})}
    )


def peak_rss(pid: int) -> int:
    """The highest resident set size of a process so far, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def warm(agent) -> None:
    """Load the endpoint's code, so memory measured afterwards is the transfer's alone."""
    assert put(agent, "warm.txt", b"w").status_code == 200
    assert agent.client.get("/files", params={"path": "warm.txt"}).status_code == 200


# -- uploads ---------------------------------------------------------------------------------


def test_an_octet_stream_upload_writes_the_file_and_answers_what_it_wrote(agent):
    r = put(agent, "docs/readme.txt", b"hello")

    assert r.status_code == 200
    assert r.json() == [{"path": str(agent.home / "docs" / "readme.txt"), "name": "readme.txt", "type": "file"}]
    assert (agent.home / "docs" / "readme.txt").read_bytes() == b"hello"


def test_an_octet_stream_upload_needs_a_path(agent):
    r = agent.client.post("/files", content=b"x", headers=OCTET)

    assert r.status_code == 400
    assert r.json()["code"] == 400
    assert "path" in r.json()["message"]


def test_an_empty_upload_creates_an_empty_file(agent):
    assert put(agent, "empty", b"").status_code == 200

    assert (agent.home / "empty").read_bytes() == b""


def test_a_multipart_upload_with_a_path_writes_its_file_part_there(agent):
    r = agent.client.post(
        "/files",
        params={"path": "out/one.bin"},
        files={"file": ("whatever.bin", b"\x00\x01binary\xff")},
        data={"note": "other fields are ignored"},
    )

    assert r.status_code == 200, r.text
    assert [e["path"] for e in r.json()] == [str(agent.home / "out" / "one.bin")]
    assert (agent.home / "out" / "one.bin").read_bytes() == b"\x00\x01binary\xff"


def test_a_multipart_upload_of_several_files_writes_each_to_its_filename(agent):
    r = agent.client.post(
        "/files",
        files=[
            ("file", ("a/b/first.txt", b"first")),
            ("file", (str(agent.home / "abs.txt"), b"absolute")),
            ("file", ("naïve ünïcode.txt", b"unicode")),
        ],
    )

    assert r.status_code == 200, r.text
    assert [e["name"] for e in r.json()] == ["first.txt", "abs.txt", "naïve ünïcode.txt"]
    assert (agent.home / "a" / "b" / "first.txt").read_bytes() == b"first"
    assert (agent.home / "abs.txt").read_bytes() == b"absolute"
    assert (agent.home / "naïve ünïcode.txt").read_bytes() == b"unicode"


def test_a_multipart_part_without_a_filename_or_path_is_a_bad_request(agent):
    body = b'--XyZ\r\nContent-Disposition: form-data; name="file"\r\n\r\ndata\r\n--XyZ--\r\n'
    r = agent.client.post("/files", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"})

    assert r.status_code == 400
    assert "filename" in r.json()["message"]


def test_a_hand_written_multipart_body_with_preamble_quoting_and_no_part_headers_parses(agent):
    body = (
        b"preamble to ignore\r\n"
        b"--b\r\n\r\nno headers: not a file\r\n"
        b'--b  \r\ncontent-disposition: form-data; name="file"; filename="quo\\"ted.txt"\r\n\r\n'
        b"--b is not the boundary\r\n--bx neither\r\n"
        b"--b--\r\nepilogue"
    )
    r = agent.client.post("/files", content=body, headers={"content-type": 'multipart/form-data; boundary="b"'})

    assert r.status_code == 200, r.text
    assert (agent.home / 'quo"ted.txt').read_bytes() == b"--b is not the boundary\r\n--bx neither"


def test_a_multipart_body_without_its_closing_boundary_is_a_bad_request_and_leaves_no_file(agent):
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="cut.txt"\r\n\r\npartial'
    r = agent.client.post("/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"})

    assert r.status_code == 400
    assert not (agent.home / "cut.txt").exists()


def test_two_parts_for_the_same_path_are_refused(agent):
    r = agent.client.post("/files", files=[("file", ("same.txt", b"1")), ("file", ("same.txt", b"2"))])

    assert r.status_code == 400
    assert "same path" in r.json()["message"]


def test_an_upload_with_another_content_type_is_a_bad_request(agent):
    r = agent.client.post("/files", params={"path": "x"}, content=b"{}", headers={"content-type": "application/json"})

    assert r.status_code == 400
    assert r.json() == {"code": 400, "message": r.json()["message"]}


def test_a_gzip_encoded_upload_is_decompressed(agent):
    data = b"compressible " * 10_000
    r = put(agent, "z.txt", gzip.compress(data), {"content-encoding": "gzip"})

    assert r.status_code == 200, r.text
    assert (agent.home / "z.txt").read_bytes() == data


def test_a_gzip_upload_of_several_members_is_decompressed_whole(agent):
    members = [gzip.compress(b"one "), gzip.compress(b"two ") + gzip.compress(b"three")]

    r = put(agent, "multi.txt", iter(members), {"content-encoding": "gzip"})  # sent as two chunks

    assert r.status_code == 200, r.text
    assert (agent.home / "multi.txt").read_bytes() == b"one two three"


def test_a_gzip_multipart_upload_is_decompressed_before_parsing(agent):
    request = httpx.Request("POST", "http://x/files", files={"file": ("gz.txt", b"inside")})
    body = gzip.compress(request.read())
    headers = {"content-type": request.headers["content-type"], "content-encoding": "gzip"}

    r = agent.client.post("/files", content=body, headers=headers)

    assert r.status_code == 200, r.text
    assert (agent.home / "gz.txt").read_bytes() == b"inside"


def test_a_truncated_gzip_upload_is_a_bad_request_and_leaves_no_file(agent):
    r = put(agent, "broken.txt", gzip.compress(os.urandom(50_000))[:-100], {"content-encoding": "gzip"})

    assert r.status_code == 400
    assert "gzip" in r.json()["message"]
    assert not (agent.home / "broken.txt").exists()


def test_an_unknown_content_encoding_is_a_bad_request(agent):
    assert put(agent, "x", b"x", {"content-encoding": "br"}).status_code == 400


def test_a_few_megabyte_upload_arrives_intact(agent):
    data = os.urandom(5 * 1024 * 1024 + 123)

    assert put(agent, "big.bin", data).status_code == 200

    assert hashlib.sha256((agent.home / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


def test_a_chunked_multipart_upload_of_a_few_megabytes_arrives_intact(agent):
    data = os.urandom(3 * 1024 * 1024)

    r = agent.client.post("/files", params={"path": "mp.bin"}, files={"file": ("x", io.BytesIO(data))})

    assert r.status_code == 200, r.text
    assert (agent.home / "mp.bin").read_bytes() == data


def test_uploading_over_a_file_replaces_it_and_keeps_its_permissions(agent):
    target = agent.home / "script.sh"
    target.write_text("old")
    os.chmod(target, 0o750)

    assert put(agent, "script.sh", b"#!/bin/sh\necho new\n").status_code == 200

    assert target.read_bytes() == b"#!/bin/sh\necho new\n"
    assert os.stat(target).st_mode & 0o7777 == 0o750
    assert [p.name for p in agent.home.iterdir()] == ["script.sh"]  # no temporary file left


def test_uploading_to_a_symlink_writes_the_file_it_points_to(agent):
    (agent.home / "real.txt").write_text("old")
    (agent.home / "link.txt").symlink_to("real.txt")

    assert put(agent, "link.txt", b"new").status_code == 200

    assert (agent.home / "link.txt").is_symlink()
    assert (agent.home / "real.txt").read_bytes() == b"new"


def test_uploading_to_a_directory_is_a_bad_request(agent):
    (agent.home / "dir").mkdir()

    r = put(agent, "dir", b"x")

    assert r.status_code == 400
    assert r.json()["message"] == f"path '{agent.home / 'dir'}' is a directory"


def test_uploading_to_a_fifo_is_a_bad_request_rather_than_waiting_for_a_reader(agent):
    os.mkfifo(agent.home / "pipe")

    assert put(agent, "pipe", b"x").status_code == 400


def test_uploading_to_a_character_device_writes_into_it(agent):
    r = put(agent, "/dev/null", b"discarded")

    assert r.status_code == 200, r.text
    assert r.json()[0]["path"] == "/dev/null"


def test_uploading_under_a_file_is_a_bad_request(agent):
    (agent.home / "file").write_text("x")

    assert put(agent, "file/inside.txt", b"x").status_code == 400


def test_an_upload_path_with_a_nul_byte_is_a_bad_request(agent):
    r = put(agent, "bad\x00name", b"x")

    assert r.status_code == 400
    assert "NUL" in r.json()["message"]


def test_a_traversal_looking_upload_path_is_normalised_against_home(agent):
    r = put(agent, "sub/../../home/landed.txt", b"x")

    assert r.status_code == 200
    assert r.json()[0]["path"] == str(agent.home / "landed.txt")
    assert (agent.home / "landed.txt").exists()


def test_the_sandbox_user_is_accepted_root_is_refused_without_root_and_others_are_unknown(agent):
    assert put(agent, "u.txt", b"u", username="user").status_code == 200

    # An agent that is not root (the host template) has no root to act as: a clear 403, not a
    # write made silently as the sandbox user.
    r = put(agent, "r.txt", b"r", username="root")
    assert r.status_code == 403 and "no root user" in r.json()["message"]
    assert not (agent.home / "r.txt").exists()

    r = put(agent, "n.txt", b"n", username="nobody-here")

    assert r.status_code == 401
    assert not (agent.home / "n.txt").exists()


def test_metadata_headers_are_stored_as_xattrs_and_come_back_on_upload_and_stat(agent):
    r = put(agent, "meta.txt", b"m", {"X-Metadata-Project": "hutch", "X-Metadata-Build-ID": "42"})

    assert r.status_code == 200, r.text
    assert r.json()[0]["metadata"] == {"project": "hutch", "build-id": "42"}  # keys lower-cased
    assert os.getxattr(agent.home / "meta.txt", "user.e2b.project") == b"hutch"
    stat = unary(agent.client, "/filesystem.Filesystem/Stat", {"path": "meta.txt"})
    assert map_entry_info(pb.StatResponse.from_json(stat.content).entry).metadata == {
        "project": "hutch",
        "build-id": "42",
    }


def test_replacing_a_file_replaces_its_whole_metadata_set(agent):
    assert put(agent, "meta.txt", b"1", {"X-Metadata-A": "1", "X-Metadata-B": "2"}).status_code == 200

    r = put(agent, "meta.txt", b"2", {"X-Metadata-B": "3"})

    assert r.json()[0]["metadata"] == {"b": "3"}
    r = put(agent, "meta.txt", b"3")
    assert "metadata" not in r.json()[0]


def test_a_metadata_value_that_is_not_printable_ascii_is_a_bad_request(agent):
    r = put(agent, "m.txt", b"x", {"X-Metadata-Key": "café".encode()})

    assert r.status_code == 400
    assert not (agent.home / "m.txt").exists()


def test_the_sdks_own_multipart_and_gzip_request_building_is_understood(agent):
    """Bodies built by the E2B SDK's helpers, as `Sandbox.files.write(_files)` sends them."""
    headers = metadata_to_headers({"Origin": "sdk"})
    files = [
        _to_httpx_file("sdk/one.txt", "text data", is_async=False),
        _to_httpx_file("sdk/two.bin", io.BytesIO(b"\x00binary"), is_async=False),
    ]

    r = agent.client.post("/files", files=files, headers=headers)

    assert r.status_code == 200, r.text
    infos = [WriteInfo.from_dict(item) for item in r.json()]
    assert [(i.name, i.type.value, i.metadata) for i in infos] == [
        ("one.txt", "file", {"origin": "sdk"}),
        ("two.bin", "file", {"origin": "sdk"}),
    ]
    assert (agent.home / "sdk" / "two.bin").read_bytes() == b"\x00binary"

    body = to_upload_body(iter([b"streamed ", b"and ", b"gzipped"]), use_gzip=True)
    r = put(agent, "sdk/three.txt", body, {"Content-Encoding": "gzip"})

    assert r.status_code == 200, r.text
    assert (agent.home / "sdk" / "three.txt").read_bytes() == b"streamed and gzipped"


def test_a_large_streamed_upload_does_not_grow_the_agents_memory(agent):
    warm(agent)
    before = peak_rss(agent.proc.pid)
    block = b"\xab" * (1024 * 1024)

    r = put(agent, "huge.bin", (block for _ in range(50)))  # 50 MB, chunked, never whole anywhere

    assert r.status_code == 200, r.text
    assert os.path.getsize(agent.home / "huge.bin") == 50 * 1024 * 1024
    assert peak_rss(agent.proc.pid) - before < 16 * 1024 * 1024


def test_a_large_multipart_upload_does_not_grow_the_agents_memory(agent):
    warm(agent)
    before = peak_rss(agent.proc.pid)

    class Zeros(io.RawIOBase):
        def __init__(self, size):
            self.left = size

        def readable(self):
            return True

        def readinto(self, buf):
            n = min(len(buf), self.left)
            buf[:n] = bytes(n)
            self.left -= n
            return n

    r = agent.client.post("/files", params={"path": "huge.bin"}, files={"file": ("x", Zeros(40 * 1024 * 1024))})

    assert r.status_code == 200, r.text
    assert os.path.getsize(agent.home / "huge.bin") == 40 * 1024 * 1024
    assert peak_rss(agent.proc.pid) - before < 16 * 1024 * 1024


@pytest.fixture
def small_disk_agent(tmp_path):
    """An agent that may not write files over 1 MiB (RLIMIT_FSIZE: writes fail with EFBIG, the
    way they fail with ENOSPC on a full disk)."""
    (tmp_path / "limited").mkdir()
    config = {"rlimits": {"fsize": [1024 * 1024, 1024 * 1024]}}
    running = start_agent(tmp_path / "limited", {"HUTCH_AGENT": json.dumps(config)})
    yield running
    running.client.close()
    running.proc.kill()
    running.proc.wait()


def test_an_upload_that_does_not_fit_is_507_and_leaves_no_partial_file(small_disk_agent):
    agent = small_disk_agent

    r = put(agent, "new.bin", b"x" * (3 * 1024 * 1024))

    assert r.status_code == 507
    assert r.json()["code"] == 507
    assert not (agent.home / "new.bin").exists()
    assert list(agent.home.iterdir()) == []


def test_an_upload_that_does_not_fit_over_a_file_leaves_the_old_content_whole(small_disk_agent):
    agent = small_disk_agent
    (agent.home / "keep.txt").write_text("precious")

    r = put(agent, "keep.txt", b"x" * (3 * 1024 * 1024))

    assert r.status_code == 507
    assert (agent.home / "keep.txt").read_text() == "precious"
    assert [p.name for p in agent.home.iterdir()] == ["keep.txt"]


def wait_for(condition, seconds: float = 3.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def start_raw_upload(agent, path: str) -> socket.socket:
    """An octet-stream upload announced as 10 MB of which only 200 kB are sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(agent.socket_path))
    head = (
        f"POST /files?path={path} HTTP/1.1\r\nHost: sandbox\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"x" * 200_000)
    return sock


def test_a_client_that_vanishes_mid_upload_leaves_no_new_file_behind(agent):
    sock = start_raw_upload(agent, "partial.bin")
    assert wait_for((agent.home / "partial.bin").exists)

    sock.close()

    assert wait_for(lambda: not (agent.home / "partial.bin").exists())
    assert list(agent.home.iterdir()) == []


def test_a_client_that_vanishes_mid_replacement_leaves_the_old_file_whole(agent):
    (agent.home / "keep.txt").write_text("precious")
    sock = start_raw_upload(agent, "keep.txt")
    assert wait_for(lambda: len(list(agent.home.iterdir())) == 2)  # the temporary file beside it

    sock.close()

    assert wait_for(lambda: len(list(agent.home.iterdir())) == 1)
    assert (agent.home / "keep.txt").read_text() == "precious"


# -- downloads -------------------------------------------------------------------------------


def test_a_download_returns_the_bytes_as_an_octet_stream_naming_the_file(agent):
    (agent.home / "data.bin").write_bytes(b"\x00\x01\x02 payload")

    r = agent.client.get("/files", params={"path": "data.bin"}, headers=IDENTITY)

    assert r.status_code == 200
    assert r.content == b"\x00\x01\x02 payload"
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename="data.bin"'
    assert r.headers["content-length"] == str(len(r.content))


def test_a_download_of_a_non_ascii_name_carries_an_rfc_5987_filename(agent):
    (agent.home / "résumé.txt").write_text("x")

    r = agent.client.get("/files", params={"path": "résumé.txt"})

    assert r.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt"
    )


def test_a_download_with_the_username_parameter_resolves_relative_to_home(agent):
    (agent.home / "mine.txt").write_text("mine")

    r = agent.client.get("/files", params={"path": "mine.txt", "username": "user"})

    assert r.text == "mine"


def test_a_download_of_a_missing_file_is_404_in_envds_error_shape(agent):
    r = agent.client.get("/files", params={"path": "nope.txt"})

    assert r.status_code == 404
    assert r.json() == {"code": 404, "message": f"path '{agent.home / 'nope.txt'}' does not exist"}


def test_a_download_of_a_directory_is_400(agent):
    (agent.home / "d").mkdir()

    r = agent.client.get("/files", params={"path": "d"})

    assert r.status_code == 400
    assert "is a directory" in r.json()["message"]


def test_a_download_of_home_when_no_path_is_given_is_400(agent):
    assert agent.client.get("/files").status_code == 400


def test_a_download_of_a_fifo_is_400_rather_than_waiting_for_a_writer(agent):
    os.mkfifo(agent.home / "pipe")

    r = agent.client.get("/files", params={"path": "pipe"})

    assert r.status_code == 400
    assert "not a regular file" in r.json()["message"]


def test_a_download_path_with_a_nul_byte_is_400(agent):
    assert agent.client.get("/files", params={"path": "a\x00b"}).status_code == 400


def test_a_download_is_gzip_compressed_when_the_client_asks_for_it(agent):
    data = b"repetitive text " * 100_000
    (agent.home / "t.txt").write_bytes(data)

    with agent.client.stream("GET", "/files", params={"path": "t.txt"}, headers={"accept-encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())

    assert r.headers["content-encoding"] == "gzip"
    assert len(raw) < len(data) // 10
    assert zlib.decompress(raw, 31) == data


def test_a_small_download_is_gzip_compressed_too(agent):
    (agent.home / "s.txt").write_bytes(b"small")

    with agent.client.stream("GET", "/files", params={"path": "s.txt"}, headers={"accept-encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())

    assert gzip.decompress(raw) == b"small"


def test_a_download_is_not_compressed_when_the_client_prefers_identity(agent):
    (agent.home / "t.txt").write_bytes(b"plain")

    r = agent.client.get("/files", params={"path": "t.txt"}, headers={"accept-encoding": "gzip;q=0, identity"})

    assert "content-encoding" not in r.headers
    assert r.content == b"plain"


def test_a_range_request_gets_that_part_of_the_file(agent):
    (agent.home / "r.bin").write_bytes(bytes(range(100)))

    r = agent.client.get("/files", params={"path": "r.bin"}, headers={"range": "bytes=10-19"})
    tail = agent.client.get("/files", params={"path": "r.bin"}, headers={"range": "bytes=-5"})
    beyond = agent.client.get("/files", params={"path": "r.bin"}, headers={"range": "bytes=200-"})

    assert r.status_code == 206
    assert r.content == bytes(range(10, 20))
    assert r.headers["content-range"] == "bytes 10-19/100"
    assert tail.content == bytes(range(95, 100))
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == "bytes */100"


def test_a_large_download_is_streamed_without_growing_the_agents_memory(agent):
    block = os.urandom(1024 * 1024)
    with open(agent.home / "large.bin", "wb") as f:
        for _ in range(50):
            f.write(block)
    warm(agent)
    before = peak_rss(agent.proc.pid)

    digest = hashlib.sha256()
    size = 0
    with agent.client.stream("GET", "/files", params={"path": "large.bin"}, headers=IDENTITY) as r:
        assert r.status_code == 200
        assert r.headers["transfer-encoding"] == "chunked"
        for chunk in r.iter_bytes():
            digest.update(chunk)
            size += len(chunk)

    assert size == 50 * 1024 * 1024
    assert digest.digest() == hashlib.sha256(block * 50).digest()
    assert peak_rss(agent.proc.pid) - before < 16 * 1024 * 1024


def test_a_download_reads_proc_files_whose_size_is_zero(agent):
    r = agent.client.get("/files", params={"path": f"/proc/{agent.proc.pid}/cmdline"})

    assert r.status_code == 200
    assert b"hutch.agent" in r.content


def test_other_methods_are_405(agent):
    for method in ("PUT", "DELETE", "PATCH"):
        r = agent.client.request(method, "/files", params={"path": "x"})
        assert r.status_code == 405
        assert r.json()["code"] == 405
        assert r.headers["allow"] == "GET, POST"


def test_the_connection_stays_usable_after_a_failed_upload(agent):
    (agent.home / "dir").mkdir()

    assert put(agent, "dir", os.urandom(2 * 1024 * 1024)).status_code == 400
    assert put(agent, "after.txt", b"ok").status_code == 200
