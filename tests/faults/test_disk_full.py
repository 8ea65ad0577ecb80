"""The data directory's disk fills up, then is freed, under a real `hutch serve`.

The server's data directory lives on a small ext4 file system the test makes (a loop-mounted
image), which a filler file then fills to the last block. While it is full: creates fail with a
503 that names the disk; existing sessions keep answering; an upload fails with a clear error
and is not acknowledged; a sandbox that writes into its workspace loses those writes (its
workspace turns read-only: ext4 aborts under a sparse image that cannot grow). When the filler
goes: creates work again, a workspace that failed gets its instance replaced (epoch + 1, its
file system repaired), every upload acknowledged before or after is there, byte for byte. (What
sandbox processes wrote without fsync in the seconds before the abort may be gone: ext4 had not
committed it, as on any disk that fails under a file system.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import HEADER, config, run, session, sha, wait_for

UID_BASE = 1_940_000_000
SIZE_MB = 400


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 400 MB ext4 file system (no blocks reserved for root), mounted for the test."""
    root = Path(tempfile.mkdtemp(prefix="hutch-faults-disk-", dir="/var/tmp"))
    root.chmod(0o755)
    image, mount = root / "disk.img", root / "mnt"
    mount.mkdir()
    subprocess.run(["truncate", "-s", f"{SIZE_MB}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        mount.chmod(0o755)
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _fill(path: Path) -> Path:
    """A file taking every free block of `path`'s file system."""
    filler = path / "filler"
    try:
        with open(filler, "wb", buffering=0) as f:
            st = os.statvfs(path)
            os.posix_fallocate(f.fileno(), 0, max(0, st.f_bfree * st.f_frsize - 16 * 1024 * 1024))
            f.seek(0, os.SEEK_END)
            chunk = b"\0" * 4096
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass
    except BaseException:
        filler.unlink(missing_ok=True)
        raise
    return filler


def test_a_full_data_disk_gives_clear_errors_loses_no_acknowledged_file_and_recovers(small_disk, make_server, fault):
    fault.injected(
        "disk full on the data directory",
        f"data dir on a {SIZE_MB} MB loop-mounted ext4; a filler file takes every free block; then it is removed",
    )
    server = make_server(config(UID_BASE, base_pool=1), data_dir=small_disk / "data")
    client = server.new_tenant("disk")
    headers = {HEADER: "w", "content-type": "application/octet-stream"}
    acknowledged: dict[str, str] = {}

    def upload(name: str, size: int) -> tuple[int, dict | list]:
        data = os.urandom(size)
        response = client.post(f"/functions/base/invoke/files?path={name}", content=data, headers=headers)
        if response.status_code == 200:
            acknowledged[name] = sha(data)
        return response.status_code, response.json()

    assert client.post("/functions/base/invoke/files?path=identity", content=b"w\n", headers=headers).status_code == 200
    for n in range(5):
        assert upload(f"before{n}", 200_000)[0] == 200
    before = session(client, "w")

    filler = _fill(small_disk)
    try:
        created = client.post("/v1/functions/base/sessions", json={"sessionId": "new"})
        implicit = client.get("/functions/base/invoke/health", headers={HEADER: "implicit"})
        e2b = client.post("/sandboxes", json={"templateID": "base"})
        read = client.get("/functions/base/invoke/files?path=identity", headers={HEADER: "w"})
        refused_upload = upload("during", 3_000_000)
        # A sandbox writing into its workspace: its writes cannot reach the full disk.
        run(client, "w", "for i in $(seq 1 40); do head -c 300000 /dev/urandom > lost$i; mkdir -p d$i; done; sync")
    finally:
        filler.unlink()

    assert created.status_code == 503 and created.json()["code"] == "unavailable"
    assert "disk" in created.json()["message"]  # MetaDB's or the data directory's, named as such
    assert implicit.status_code == 503 and implicit.json()["code"] == "unavailable"
    assert e2b.status_code == 503 and e2b.json()["code"] == 503
    assert read.status_code == 200 and read.text == "w\n"  # existing sessions are still served
    status, error = refused_upload
    assert status in (403, 507) and {"code", "message"} <= set(error)  # not acknowledged, and says why
    assert "during" not in acknowledged

    # The disk has room again: the session's workspace is writable again (its instance is
    # replaced if the workspace failed), creates work, nothing acknowledged is missing.
    wait_for(lambda: upload("after0", 100_000)[0] == 200, 30, "an upload to succeed after the disk was freed")
    for n in range(1, 3):
        assert upload(f"after{n}", 100_000)[0] == 200
    assert client.post("/v1/functions/base/sessions", json={"sessionId": "new"}).status_code == 201
    assert client.get("/functions/base/invoke/health", headers={HEADER: "implicit"}).status_code == 204
    for name, digest in acknowledged.items():
        response = client.get(f"/functions/base/invoke/files?path={name}", headers={HEADER: "w"})
        assert response.status_code == 200 and sha(response.content) == digest, name
    assert run(client, "w", "cat identity; touch probe && echo writable") == "w\nwritable\n"
    unsynced = run(client, "w", "ls -d lost* 2>/dev/null | wc -l").strip()
    after = session(client, "w")
    replaced = after["containerId"] != before["containerId"]
    assert after["epoch"] == before["epoch"] + (1 if replaced else 0)
    fault.observed(
        create_while_full=f"{created.status_code}: {created.json()['message']}",
        upload_while_full=f"{status}: {error['message']}",
        existing_session="reads answered while full",
        after=(
            "workspace failed while full: instance replaced, epoch "
            f"{before['epoch']} -> {after['epoch']}, file system repaired"
            if replaced
            else "workspace intact: same instance"
        ),
        acknowledged_files=len(acknowledged),
        acknowledged_lost=0,
        unsynced_writes_kept=f"{unsynced} of 40 files a command wrote while the disk was full (never fsynced)",
    )
