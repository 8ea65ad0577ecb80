"""Fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def internet():
    """A namespace playing the internet (tests/runtime/internet.py); its address."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    from tests.runtime.internet import INTERNET, Internet

    world = Internet()
    world.start()
    yield INTERNET
    world.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server URL (tests/postgres.py): HUTCH_TEST_POSTGRES_URL, or one started here."""
    if os.environ.get("HUTCH_TEST_POSTGRES_URL"):
        yield os.environ["HUTCH_TEST_POSTGRES_URL"]
        return
    from tests.postgres import PostgresServer, postgres_bindir

    if postgres_bindir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    server = PostgresServer()
    server.init()
    server.start()
    yield server.url
    server.remove()


@pytest.fixture(scope="session")
def shared_volume(postgres_server):
    """A JuiceFS volume (data in SeaweedFS, metadata in PostgreSQL) mounted twice on this host, as
    two nodes mount it (tests/sharedfs.py); unmounted and stopped at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a FUSE file system needs root")
    from tests.sharedfs import SharedVolume, missing

    if reason := missing():
        pytest.skip(reason)
    volume = SharedVolume(postgres_server)
    try:
        volume.start()
        yield volume
    finally:
        volume.stop()
