"""A throwaway PostgreSQL server for tests: its own data directory, a free port, trust auth.

Uses the Debian `postgresql` package's binaries (installed by .ci/run); the server runs as the
`postgres` user because initdb refuses root. `HUTCH_TEST_POSTGRES_URL` (a server URL whose role
may create databases) replaces it with a server of your own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import asyncpg


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    """One server; `new_database()` gives each test a database of its own."""

    def __init__(self, listen: str = "127.0.0.1", trusted_networks: tuple[str, ...] = ()) -> None:
        self.listen = listen
        self.trusted_networks = trusted_networks  # beyond loopback, e.g. a test cluster's subnet
        self.port = _free_port()
        self.bindir = postgres_bindir()
        self.dir = tempfile.mkdtemp(prefix="hutch-pg-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str, **kwargs) -> subprocess.Popen:
        user = pwd.getpwnam("postgres")

        def drop() -> None:
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        return subprocess.Popen(argv, preexec_fn=drop if os.geteuid() == 0 else None, **kwargs)

    def init(self) -> None:
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        process = self._as_postgres(
            f"{self.bindir}/initdb", "-D", f"{self.dir}/data", "-A", "trust", "-U", "postgres", "--no-sync",
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = process.communicate(timeout=120)
        if process.returncode != 0:
            raise RuntimeError(f"initdb failed: {err.decode(errors='replace')}")
        with open(f"{self.dir}/data/pg_hba.conf", "a") as hba:
            for network in self.trusted_networks:
                hba.write(f"host all all {network} trust\n")

    def start(self) -> None:
        with open(f"{self.dir}/log", "ab") as log:
            self.process = self._as_postgres(
                f"{self.bindir}/postgres", "-D", f"{self.dir}/data", "-p", str(self.port), "-k", self.dir,
                "-c", f"listen_addresses={self.listen}", "-c", "fsync=off", "-c", "max_connections=200",
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(f"{self.dir}/log") as log:
                    raise RuntimeError(f"postgres exited: {log.read()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if self._ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("postgres did not start in 30 s")

    def _ready(self) -> bool:
        return subprocess.run([f"{self.bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0  # fmt: skip

    def stop(self) -> None:
        """A fast shutdown (SIGINT): clients see their connections end, as in a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)
            self.process.wait(timeout=30)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def create_database(server_url: str) -> str:
    """A fresh, empty database on the server; its URL."""
    name = "t_" + uuid.uuid4().hex[:12]
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return server_url.rsplit("/", 1)[0] + "/" + name
