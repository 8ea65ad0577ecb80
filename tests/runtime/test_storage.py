"""One suite for every workspace store."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from hutch.errors import AlreadyExists, InvalidArgument, NotFound
from hutch.selftest.file_api import SymlinkSwapper
from hutch.storage.base import chown_tree
from hutch.storage.local import DirectoryStore, ImageStore
from hutch.storage.shared import SharedStore

OWNER = 1_000_001_000


# shared-juicefs: a JuiceFS volume (tests/sharedfs.py); shared-directory: a directory an operator
# mounted (here a plain one).
@pytest.fixture(params=["directory", "image", "shared-juicefs", "shared-directory"])
def store(request):
    if os.geteuid() != 0:
        pytest.skip("stores chown to sandbox uids and mount images: root only")
    if request.param == "shared-juicefs":
        mount = request.getfixturevalue("shared_volume").a
        root = mount.mount_point / f"store-{uuid.uuid4().hex[:8]}"
        made = SharedStore(root, "node-a", mount)
    else:
        root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="hutch-store-"))
        if request.param == "image":
            if not ImageStore.available():
                pytest.skip("no loop devices here")
            made = ImageStore(root)
        elif request.param == "shared-directory":
            made = SharedStore(root / "workspaces", "node-a")
        else:
            made = DirectoryStore(root)
    yield made
    shutil.rmtree(root, ignore_errors=True)


def test_attach_creates_an_empty_workspace_owned_by_the_sandbox_uid(store):
    path = store.attach("t1/s1", OWNER, 32)
    try:
        assert path.is_dir()
        assert list(path.iterdir()) == []
        assert path.stat().st_uid == OWNER
        assert store.exists("t1/s1")
    finally:
        store.detach("t1/s1", path)


def test_data_survives_detach_and_comes_back_with_a_new_owner(store):
    path = store.attach("t1/s2", OWNER, 32)
    (path / "kept.txt").write_text("yes")
    os.chown(path / "kept.txt", OWNER, OWNER)
    store.detach("t1/s2", path)
    again = store.attach("t1/s2", OWNER + 65536, 32)
    try:
        assert (again / "kept.txt").read_text() == "yes"
        assert (again / "kept.txt").stat().st_uid == OWNER + 65536
    finally:
        store.detach("t1/s2", again)


def test_rename_while_attached_keeps_the_data_under_the_new_key(store):
    path = store.attach("_instances/i9", OWNER, 32)
    (path / "f").write_text("data")
    path = store.rename("_instances/i9", "t2/s9", path)
    assert store.exists("t2/s9") and not store.exists("_instances/i9")
    assert (path / "f").read_text() == "data"
    store.detach("t2/s9", path)
    with pytest.raises(NotFound):
        store.rename("_instances/i9", "t2/other")
    taken = store.attach("t2/s10", OWNER, 32)
    store.detach("t2/s10", taken)
    with pytest.raises(AlreadyExists):
        store.rename("t2/s9", "t2/s10")


def test_delete_removes_the_data_for_good(store):
    path = store.attach("t3/s1", OWNER, 32)
    (path / "f").write_text("gone soon")
    store.detach("t3/s1", path)
    store.delete("t3/s1")
    assert not store.exists("t3/s1")
    fresh = store.attach("t3/s1", OWNER, 32)
    try:
        assert list(fresh.iterdir()) == []
    finally:
        store.detach("t3/s1", fresh)


def test_usage_counts_what_was_written(store):
    path = store.attach("t4/s1", OWNER, 32)
    try:
        before = store.usage_bytes("t4/s1", path)
        with open(path / "blob", "wb") as f:
            f.write(os.urandom(4 << 20))
            f.flush()
            os.fsync(f.fileno())
        # A JuiceFS client writes a quota's usage to the metadata every 3 s and reads it back on its
        # own schedule: the shared store's lags (over 15 s once, on a loaded CI machine); and its
        # accounting may start a block below zero (the directory's own 4 KiB counted later).
        written = (4 << 20) - 4096
        deadline = time.monotonic() + 60
        while store.usage_bytes("t4/s1", path) - before < written and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.usage_bytes("t4/s1", path) - before >= written
    finally:
        store.detach("t4/s1", path)


@pytest.mark.parametrize("key", ["", "../escape", "a/../../b", "/abs", "a/b/c", "a b", "x" * 200, "a\x00b"])
def test_keys_that_could_escape_the_store_are_refused(store, key):
    with pytest.raises(InvalidArgument):
        store.attach(key, OWNER, 32)


def _in_thread(work, timeout: float = 60):
    """Run `work` in a thread; fail (instead of hanging) if it blocks."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(work()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the host blocked on something the sandbox made (a FIFO?)"
    return outcome[0]


@pytest.fixture
def host_dir():
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="hutch-host-"))
    (root / "big").write_bytes(os.urandom(4 << 20))
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def test_the_usage_of_a_workspace_never_counts_what_a_sandbox_made_symlink_reaches(tmp_path, host_dir):
    store = DirectoryStore(tmp_path / "store")
    workspace = store.attach("t1/s1", os.getuid(), 0)
    with SymlinkSwapper(workspace, host_dir):
        sizes = _in_thread(lambda: [store.usage_bytes("t1/s1", workspace) for _ in range(1500)])
    assert max(sizes) < 1 << 20, "the walk followed a symlink out of the workspace"


def test_chown_of_a_workspace_never_changes_anything_outside_it(host_dir):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid: root only")
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="hutch-store-"))
    try:
        store = DirectoryStore(root)
        workspace = store.attach("t1/s1", OWNER, 0)
        with SymlinkSwapper(workspace, host_dir):
            for uid in range(OWNER, OWNER + 300):
                _in_thread(lambda uid=uid: chown_tree(workspace, uid, uid))
        assert {p.stat().st_uid for p in (host_dir, host_dir / "big")} == {0}
        chown_tree(workspace, OWNER + 1000, OWNER + 1000)  # and, with nothing racing, all of it
        inside = [workspace, *workspace.rglob("*")]  # rglob does not descend through symlinks
        assert {p.lstat().st_uid for p in inside} == {OWNER + 1000}
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
