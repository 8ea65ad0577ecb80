"""One suite for every workspace store."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from hutch.errors import AlreadyExists, InvalidArgument, NotFound
from hutch.storage.local import DirectoryStore, ImageStore

OWNER = 1_000_001_000


@pytest.fixture(params=["directory", "image"])
def store(request):
    if os.geteuid() != 0:
        pytest.skip("stores chown to sandbox uids and mount images: root only")
    root = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="hutch-store-"))
    if request.param == "image":
        if not ImageStore.available():
            pytest.skip("no loop devices here")
        made = ImageStore(root)
    else:
        made = DirectoryStore(root)
    yield made
    import shutil

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
        assert store.usage_bytes("t4/s1", path) - before >= 4 << 20
    finally:
        store.detach("t4/s1", path)


@pytest.mark.parametrize("key", ["", "../escape", "a/../../b", "/abs", "a/b/c", "a b", "x" * 200, "a\x00b"])
def test_keys_that_could_escape_the_store_are_refused(store, key):
    with pytest.raises(InvalidArgument):
        store.attach(key, OWNER, 32)
