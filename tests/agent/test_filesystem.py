"""The agent's `filesystem.Filesystem` Connect service, over its socket.

Answers are also decoded with the official E2B SDK's own protobuf classes and mappers, so what the
agent sends is what the SDK can read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
from e2b.envd.filesystem import filesystem_pb as pb
from e2b.sandbox.filesystem.filesystem import FileType, map_entry_info

from tests.connect_wire import iter_stream, unary

FS = "/filesystem.Filesystem/"


def call(agent, method: str, message: dict) -> httpx.Response:
    return unary(agent.client, FS + method, message)


def ok(agent, method: str, message: dict) -> dict:
    r = call(agent, method, message)
    assert r.status_code == 200, r.text
    return r.json()


def error(agent, method: str, message: dict) -> tuple[int, str]:
    r = call(agent, method, message)
    assert r.status_code != 200, r.text
    return r.status_code, r.json()["code"]


def sdk_entry(agent, path: str):
    r = call(agent, "Stat", {"path": path})
    assert r.status_code == 200, r.text
    return map_entry_info(pb.StatResponse.from_json(r.content).entry)


def upload(agent, path: str, data: bytes) -> None:
    r = agent.client.post(
        "/files", params={"path": path}, content=data, headers={"content-type": "application/octet-stream"}
    )
    assert r.status_code == 200, r.text


# -- Stat ------------------------------------------------------------------------------------


def test_stat_of_a_file_reports_its_type_size_permissions_owner_and_time(agent):
    path = agent.home / "hello.txt"
    path.write_bytes(b"hello world")
    os.chmod(path, 0o640)
    before = datetime.now(UTC)

    raw = ok(agent, "Stat", {"path": "hello.txt"})["entry"]
    entry = sdk_entry(agent, "hello.txt")

    assert raw["size"] == "11"  # int64 goes out as a string
    assert raw["type"] == "FILE_TYPE_FILE"
    assert raw["isSymlink"] is False
    assert "symlinkTarget" not in raw
    assert entry.name == "hello.txt"
    assert entry.path == str(path)
    assert entry.type == FileType.FILE
    assert entry.size == 11
    assert entry.mode == 0o640
    assert entry.permissions == "-rw-r-----"
    assert entry.owner == "root" and entry.group == "root"
    assert entry.symlink_target is None
    assert entry.metadata is None
    assert abs((entry.modified_time - before).total_seconds()) < 5


def test_stat_of_a_directory_reports_a_directory_and_go_style_permissions(agent):
    (agent.home / "sub").mkdir(mode=0o755)
    os.chmod(agent.home / "sub", 0o1777)

    entry = sdk_entry(agent, str(agent.home / "sub"))

    assert entry.type == FileType.DIR
    assert entry.size == os.lstat(agent.home / "sub").st_size > 0  # its own size, as envd (Lstat) and `stat`
    assert entry.mode == 0o777
    assert entry.permissions == "dtrwxrwxrwx"  # Go's FileMode.String(), as envd reports it


def test_stat_of_a_symlink_reports_the_link_with_its_target_and_the_targets_type(agent):
    (agent.home / "real").mkdir()
    (agent.home / "link").symlink_to("real")

    raw = ok(agent, "Stat", {"path": "link"})["entry"]
    entry = sdk_entry(agent, "link")

    assert raw["isSymlink"] is True
    assert raw["type"] == "FILE_TYPE_DIRECTORY"  # the target's type, as envd 0.6.4 does
    assert raw["permissions"].startswith("L")
    assert entry.type == FileType.SYMLINK
    assert entry.symlink_target == str(agent.home / "real")
    assert entry.path == str(agent.home / "link")


def test_stat_of_a_dangling_symlink_still_reports_a_symlink(agent):
    (agent.home / "dangling").symlink_to("nowhere")

    raw = ok(agent, "Stat", {"path": "dangling"})["entry"]

    assert raw["type"] == "FILE_TYPE_SYMLINK"
    assert raw["isSymlink"] is True
    assert raw["symlinkTarget"] == "nowhere"


def test_stat_of_a_missing_path_is_not_found(agent):
    r = call(agent, "Stat", {"path": "missing.txt"})

    assert r.status_code == 404
    assert r.json()["code"] == "not_found"
    assert "missing.txt" in r.json()["message"]


def test_stat_of_an_empty_path_is_the_home_directory(agent):
    assert ok(agent, "Stat", {})["entry"]["path"] == str(agent.home)


def test_stat_reports_metadata_kept_in_user_e2b_xattrs(agent):
    path = agent.home / "tagged.txt"
    path.write_text("x")
    os.setxattr(path, "user.e2b.owner-team", b"infra")
    os.setxattr(path, "user.other", b"not ours")

    assert sdk_entry(agent, "tagged.txt").metadata == {"owner-team": "infra"}


def test_a_path_with_a_nul_byte_is_an_invalid_argument(agent):
    assert error(agent, "Stat", {"path": "bad\x00name"}) == (400, "invalid_argument")


def test_a_path_with_an_overlong_name_is_an_invalid_argument(agent):
    assert error(agent, "Stat", {"path": "x" * 300}) == (400, "invalid_argument")


def test_a_path_that_is_not_a_string_is_an_invalid_argument(agent):
    assert error(agent, "Stat", {"path": 42}) == (400, "invalid_argument")


def test_a_traversal_looking_relative_path_is_normalised_against_home(agent):
    (agent.home / "b.txt").write_text("b")

    entry = ok(agent, "Stat", {"path": "a/../b.txt"})["entry"]

    assert entry["path"] == str(agent.home / "b.txt")


# -- ListDir ---------------------------------------------------------------------------------


def make_tree(home):
    (home / "d1" / "d2" / "d3").mkdir(parents=True)
    (home / "d1" / "f1.txt").write_text("1")
    (home / "d1" / "d2" / "f2.txt").write_text("22")
    (home / "d1" / "d2" / "d3" / "f3.txt").write_text("333")
    (home / "top.txt").write_text("t")


def test_list_dir_lists_direct_children_by_default(agent):
    make_tree(agent.home)

    r = call(agent, "ListDir", {"path": "d1"})
    assert r.status_code == 200, r.text
    entries = pb.ListDirResponse.from_json(r.content).entries

    assert [(e.name, map_entry_info(e).type) for e in entries] == [
        ("d2", FileType.DIR),
        ("f1.txt", FileType.FILE),
    ]
    assert entries[0].path == str(agent.home / "d1" / "d2")


def test_list_dir_with_depth_walks_subdirectories_each_directory_before_its_contents(agent):
    make_tree(agent.home)

    entries = ok(agent, "ListDir", {"path": str(agent.home / "d1"), "depth": 2})["entries"]

    assert [e["path"][len(str(agent.home)) + 1 :] for e in entries] == [
        "d1/d2",
        "d1/d2/d3",
        "d1/d2/f2.txt",
        "d1/f1.txt",
    ]


def test_list_dir_takes_depth_as_a_string_too(agent):
    make_tree(agent.home)

    entries = ok(agent, "ListDir", {"path": "d1", "depth": "3"})["entries"]

    assert len(entries) == 5


def test_list_dir_does_not_descend_into_symlinked_directories(agent):
    make_tree(agent.home)
    (agent.home / "d1" / "loop").symlink_to(agent.home)

    entries = ok(agent, "ListDir", {"path": "d1", "depth": 5})["entries"]
    names = [e["name"] for e in entries]

    assert "loop" in names
    assert "top.txt" not in names


def test_list_dir_through_a_symlinked_directory_reports_paths_under_the_link(agent):
    make_tree(agent.home)
    (agent.home / "alias").symlink_to("d1")

    entries = ok(agent, "ListDir", {"path": "alias"})["entries"]

    assert {e["path"] for e in entries} == {str(agent.home / "alias" / n) for n in ("d2", "f1.txt")}


def test_list_dir_of_a_file_is_an_invalid_argument_and_of_a_missing_path_not_found(agent):
    (agent.home / "f.txt").write_text("f")

    assert error(agent, "ListDir", {"path": "f.txt"}) == (400, "invalid_argument")
    assert error(agent, "ListDir", {"path": "nope"}) == (404, "not_found")


def test_list_dir_with_a_negative_depth_is_an_invalid_argument(agent):
    assert error(agent, "ListDir", {"path": "", "depth": -1}) == (400, "invalid_argument")


# -- MakeDir, Move, Remove -------------------------------------------------------------------


def test_make_dir_creates_missing_parents_and_returns_the_new_directory(agent):
    r = call(agent, "MakeDir", {"path": "a/b/c"})
    assert r.status_code == 200, r.text

    entry = map_entry_info(pb.MakeDirResponse.from_json(r.content).entry)

    assert (agent.home / "a" / "b" / "c").is_dir()
    assert entry.type == FileType.DIR
    assert entry.path == str(agent.home / "a" / "b" / "c")


def test_make_dir_of_an_existing_directory_is_already_exists_which_the_sdk_turns_into_false(agent):
    (agent.home / "there").mkdir()

    assert error(agent, "MakeDir", {"path": "there"}) == (409, "already_exists")


def test_make_dir_where_a_file_is_in_the_way_fails_cleanly(agent):
    (agent.home / "file").write_text("x")

    assert error(agent, "MakeDir", {"path": "file"}) == (400, "invalid_argument")
    assert error(agent, "MakeDir", {"path": "file/sub"}) == (400, "failed_precondition")


def test_move_renames_and_creates_the_destinations_parents(agent):
    (agent.home / "old.txt").write_text("content")

    r = call(agent, "Move", {"source": "old.txt", "destination": "new/dir/new.txt"})
    assert r.status_code == 200, r.text
    entry = map_entry_info(pb.MoveResponse.from_json(r.content).entry)

    assert not (agent.home / "old.txt").exists()
    assert (agent.home / "new" / "dir" / "new.txt").read_text() == "content"
    assert entry.name == "new.txt"
    assert entry.path == str(agent.home / "new" / "dir" / "new.txt")


def test_move_of_a_missing_source_is_not_found_and_creates_nothing(agent):
    assert error(agent, "Move", {"source": "ghost", "destination": "x/y"}) == (404, "not_found")
    assert not (agent.home / "x").exists()


def test_move_without_a_destination_is_an_invalid_argument(agent):
    (agent.home / "a").write_text("a")

    assert error(agent, "Move", {"source": "a"}) == (400, "invalid_argument")


def test_remove_deletes_a_file(agent):
    (agent.home / "gone.txt").write_text("x")

    ok(agent, "Remove", {"path": "gone.txt"})

    assert not (agent.home / "gone.txt").exists()


def test_remove_deletes_a_directory_tree_but_not_what_a_symlink_inside_points_to(agent):
    make_tree(agent.home)
    (agent.home / "d1" / "d2" / "to-top").symlink_to(agent.home / "top.txt")

    ok(agent, "Remove", {"path": "d1"})

    assert not (agent.home / "d1").exists()
    assert (agent.home / "top.txt").read_text() == "t"


def test_remove_of_a_symlink_removes_the_link_only(agent):
    make_tree(agent.home)
    (agent.home / "alias").symlink_to("d1")

    ok(agent, "Remove", {"path": "alias"})

    assert not (agent.home / "alias").is_symlink()
    assert (agent.home / "d1" / "f1.txt").exists()


def test_remove_of_a_missing_path_succeeds(agent):
    assert ok(agent, "Remove", {"path": "never-was"}) == {}


def test_remove_with_an_empty_path_is_refused_rather_than_removing_home(agent):
    assert error(agent, "Remove", {"path": ""}) == (400, "invalid_argument")
    assert agent.home.is_dir()


def test_an_unknown_method_is_unimplemented(agent):
    assert error(agent, "Chmod", {"path": "x"}) == (501, "unimplemented")


# -- WatchDir (the stream the async SDK uses) ------------------------------------------------


@pytest.fixture
def watch_client(agent):
    client = httpx.Client(
        transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://sandbox", timeout=5
    )
    yield client
    client.close()


def watch(client, path: str, headers: dict | None = None, **options):
    return iter_stream(client, FS + "WatchDir", {"path": path, **options}, headers)


def fs_events(stream, count: int) -> list[tuple[str, str]]:
    """The next `count` filesystem events as (type, name), skipping keepalives."""
    out = []
    while len(out) < count:
        flags, message = next(stream)
        assert flags == 0, message
        if "filesystem" in message:
            event = message["filesystem"]
            out.append((event["type"].removeprefix("EVENT_TYPE_"), event["name"]))
    return out


def test_watch_dir_starts_with_a_start_event_then_reports_create_write_and_remove(agent, watch_client):
    (agent.home / "w").mkdir()
    stream = watch(watch_client, "w")
    try:
        assert next(stream) == (0, {"start": {}})

        path = agent.home / "w" / "f.txt"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"data")
        os.close(fd)
        os.unlink(path)

        assert fs_events(stream, 3) == [("CREATE", "f.txt"), ("WRITE", "f.txt"), ("REMOVE", "f.txt")]
    finally:
        stream.close()


def test_watch_dir_reports_a_rename_as_rename_of_the_old_name_and_create_of_the_new(agent, watch_client):
    (agent.home / "w").mkdir()
    (agent.home / "w" / "a").write_text("a")
    stream = watch(watch_client, "w")
    try:
        next(stream)
        os.rename(agent.home / "w" / "a", agent.home / "w" / "b")
        os.chmod(agent.home / "w" / "b", 0o600)

        assert fs_events(stream, 3) == [("RENAME", "a"), ("CREATE", "b"), ("CHMOD", "b")]
    finally:
        stream.close()


def test_recursive_watch_dir_follows_into_a_subdirectory_created_after_it_started(agent, watch_client):
    (agent.home / "w").mkdir()
    stream = watch(watch_client, "w", recursive=True)
    try:
        next(stream)
        (agent.home / "w" / "sub").mkdir()
        assert fs_events(stream, 1) == [("CREATE", "sub")]  # sent once "sub" is watched too
        (agent.home / "w" / "sub" / "inner.txt").write_text("x")

        events = fs_events(stream, 2)

        assert events == [("CREATE", "sub/inner.txt"), ("WRITE", "sub/inner.txt")]
    finally:
        stream.close()


def test_recursive_watch_dir_watches_subtrees_moved_in_or_made_faster_than_it_can_follow(agent, watch_client):
    (agent.home / "w").mkdir()
    stream = watch(watch_client, "w", recursive=True)
    try:
        next(stream)
        staged = agent.home / "staged"
        (staged / "deep").mkdir(parents=True)
        os.rename(staged, agent.home / "w" / "moved-in")
        (agent.home / "w" / "fresh" / "deeper").mkdir(parents=True)  # likely before its watch
        assert fs_events(stream, 2) == [("CREATE", "moved-in"), ("CREATE", "fresh")]

        events = []
        while ("CREATE", "fresh/deeper") not in events:
            events += fs_events(stream, 1)
        (agent.home / "w" / "moved-in" / "deep" / "g.txt").write_text("g")
        (agent.home / "w" / "fresh" / "deeper" / "h.txt").write_text("h")
        while ("CREATE", "fresh/deeper/h.txt") not in events:
            events += fs_events(stream, 1)

        assert ("CREATE", "moved-in/deep/g.txt") in events
    finally:
        stream.close()


def test_non_recursive_watch_dir_ignores_changes_inside_subdirectories(agent, watch_client):
    (agent.home / "w" / "sub").mkdir(parents=True)
    stream = watch(watch_client, "w")
    try:
        next(stream)
        (agent.home / "w" / "sub" / "hidden.txt").write_text("x")
        (agent.home / "w" / "seen.txt").write_text("x")

        assert fs_events(stream, 1) == [("CREATE", "seen.txt")]
    finally:
        stream.close()


def test_watch_dir_with_include_entry_attaches_the_entry_info_when_it_still_exists(agent, watch_client):
    (agent.home / "w").mkdir()
    stream = watch(watch_client, "w", includeEntry=True)

    def next_event():
        _, message = next(stream)
        return pb.WatchDirResponse.from_json(json.dumps(message)).event.value

    try:
        next(stream)
        (agent.home / "w" / "e.txt").write_bytes(b"12345")
        create = next_event()
        next_event()  # the write
        os.unlink(agent.home / "w" / "e.txt")
        remove = next_event()

        assert create.type == pb.EventType.CREATE
        assert create.entry.path == str(agent.home / "w" / "e.txt")
        assert create.entry.type == pb.FileType.FILE
        assert remove.type == pb.EventType.REMOVE
        assert remove.entry is None
    finally:
        stream.close()


def test_watch_dir_sends_keepalives_at_the_requested_interval(agent, watch_client):
    (agent.home / "w").mkdir()
    stream = watch(watch_client, "w", headers={"Keepalive-Ping-Interval": "0.1"})
    try:
        assert next(stream) == (0, {"start": {}})
        started = time.monotonic()

        assert next(stream) == (0, {"keepalive": {}})
        assert next(stream) == (0, {"keepalive": {}})
        assert time.monotonic() - started < 2
    finally:
        stream.close()


def test_watch_dir_of_a_missing_directory_ends_the_stream_with_not_found(agent, watch_client):
    (flags, message), *rest = list(watch(watch_client, "missing"))

    assert (flags, rest) == (2, [])
    assert message["error"]["code"] == "not_found"
    assert "missing" in message["error"]["message"]


def test_watch_dir_of_a_file_ends_the_stream_with_invalid_argument(agent, watch_client):
    (agent.home / "f.txt").write_text("x")

    (flags, message), *_ = list(watch(watch_client, "f.txt"))

    assert flags == 2
    assert message["error"]["code"] == "invalid_argument"
    assert "not a directory" in message["error"]["message"]


def test_closing_a_watch_stream_releases_its_inotify_instance(agent, watch_client):
    (agent.home / "w").mkdir()

    def inotify_fds() -> int:
        fd_dir = f"/proc/{agent.proc.pid}/fd"
        count = 0
        for name in os.listdir(fd_dir):
            try:
                count += os.readlink(f"{fd_dir}/{name}") == "anon_inode:inotify"
            except OSError:
                pass
        return count

    stream = watch(watch_client, "w")
    next(stream)
    assert inotify_fds() == 1
    stream.close()

    deadline = time.monotonic() + 2
    while inotify_fds() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inotify_fds() == 0


# -- polling watchers (what the sync SDK uses) -----------------------------------------------


def poll(agent, watcher_id: str) -> list[tuple[str, str]]:
    r = call(agent, "GetWatcherEvents", {"watcherId": watcher_id})
    assert r.status_code == 200, r.text
    events = pb.GetWatcherEventsResponse.from_json(r.content).events
    return [(e.type.name, e.name) for e in events]


def test_a_polling_watcher_sees_an_uploaded_file_as_create_chmod_write_like_envd(agent):
    (agent.home / "w").mkdir()
    r = call(agent, "CreateWatcher", {"path": "w"})
    assert r.status_code == 200, r.text
    watcher_id = pb.CreateWatcherResponse.from_json(r.content).watcher_id
    assert watcher_id

    upload(agent, "w/up.txt", b"This file will be watched.")

    assert poll(agent, watcher_id) == [("CREATE", "up.txt"), ("CHMOD", "up.txt"), ("WRITE", "up.txt")]
    assert poll(agent, watcher_id) == []  # drained


def test_a_polling_watcher_sees_an_upload_that_replaces_a_file_as_a_write_of_that_file(agent):
    (agent.home / "w").mkdir()
    upload(agent, "w/up.txt", b"one")
    watcher_id = ok(agent, "CreateWatcher", {"path": "w"})["watcherId"]

    upload(agent, "w/up.txt", b"two")

    assert poll(agent, watcher_id) == [("WRITE", "up.txt")]


def test_a_recursive_polling_watcher_sees_writes_in_a_directory_made_just_before(agent):
    (agent.home / "w").mkdir()
    watcher_id = ok(agent, "CreateWatcher", {"path": "w", "recursive": True})["watcherId"]

    ok(agent, "MakeDir", {"path": "w/nested"})
    upload(agent, "w/nested/f.txt", b"content")

    assert ("WRITE", "nested/f.txt") in poll(agent, watcher_id)


def test_a_polling_watcher_merges_a_run_of_writes_to_one_file(agent):
    (agent.home / "w").mkdir()
    watcher_id = ok(agent, "CreateWatcher", {"path": "w"})["watcherId"]

    with open(agent.home / "w" / "log.txt", "wb", buffering=0) as f:
        for _ in range(50):
            f.write(b"line\n")

    assert poll(agent, watcher_id) == [("CREATE", "log.txt"), ("WRITE", "log.txt")]


def test_removing_a_watcher_makes_its_id_unknown(agent):
    watcher_id = ok(agent, "CreateWatcher", {"path": ""})["watcherId"]

    assert ok(agent, "RemoveWatcher", {"watcherId": watcher_id}) == {}

    assert error(agent, "GetWatcherEvents", {"watcherId": watcher_id}) == (404, "not_found")
    assert error(agent, "RemoveWatcher", {"watcherId": watcher_id}) == (404, "not_found")


def test_an_unknown_watcher_id_is_not_found(agent):
    assert error(agent, "GetWatcherEvents", {"watcherId": "w-nope"}) == (404, "not_found")


def test_create_watcher_on_a_missing_path_is_not_found_and_on_a_file_invalid(agent):
    (agent.home / "f").write_text("x")

    assert error(agent, "CreateWatcher", {"path": "missing"}) == (404, "not_found")
    assert error(agent, "CreateWatcher", {"path": "f"}) == (400, "invalid_argument")


def test_polling_watchers_can_be_used_from_several_threads_at_once(agent):
    (agent.home / "w").mkdir()
    watcher_id = ok(agent, "CreateWatcher", {"path": "w"})["watcherId"]
    seen: list = []

    def poller():
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(agent.socket_path)), base_url="http://s")
        with client:
            for _ in range(20):
                r = unary(client, FS + "GetWatcherEvents", {"watcherId": watcher_id})
                assert r.status_code == 200
                seen.extend(e["name"] for e in r.json().get("events", []))

    threads = [threading.Thread(target=poller) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(10):
        (agent.home / "w" / f"f{i}").touch()
    for t in threads:
        t.join()
    seen.extend(name for _, name in poll(agent, watcher_id))

    assert sorted(set(seen)) == sorted(f"f{i}" for i in range(10))
