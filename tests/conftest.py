"""Fixtures shared by every test directory, and the guard that the run leaves the host as found.

The guard (`pytest_sessionfinish`) fails the run if anything hutch makes on a host outlived the
tests that made it: processes, mounts, loop devices, cgroups, network namespaces, links and
nftables tables, counted only where they belong to this run's own directories
(`tests/hostleaks.py` says how they are found). Set HUTCH_TEST_NO_LEAK_CHECK=1 to skip it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import hostleaks

hostleaks.record_mkdtemp()

# No `hutch serve` a test starts prepares the built-in templates (minutes of mmdebstrap each);
# tests that need a template use `template_store`'s small one.
os.environ.setdefault("HUTCH_TEMPLATES_PREPARE", "")

TEST_TEMPLATE = "mini"
TEST_TEMPLATE_PACKAGES = ["python3", "python3-pip", "python3-ipykernel"]
# The recipe's setup script, as the code-interpreter template's installs its kernels: one kernel
# from PyPI (pip inside the tree, through the host's DNS and CA) with its kernelspec.
TEST_TEMPLATE_SETUP = "pip install -q bash_kernel\npython3 -m bash_kernel.install --prefix /usr/local"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    hostleaks.find_data_dirs()  # before fixtures remove them
    yield


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("HUTCH_TEST_NO_LEAK_CHECK") or os.geteuid() != 0:
        return
    basetemp = getattr(session.config, "_tmp_path_factory", None)
    if basetemp is not None and basetemp._basetemp is not None:
        hostleaks.roots.add(os.path.realpath(basetemp._basetemp))
    deadline = time.monotonic() + 10  # a keeper or a lazy unmount may take a moment
    while (found := hostleaks.leaks()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = ["the tests left these on the host:", *(f"  {item}" for item in found)]
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@contextlib.contextmanager
def throwaway_data_dir(prefix: str) -> Iterator[Path]:
    """A data directory under /var/tmp, removed afterwards with its deadline keeper: the keeper
    goes first, since one still starting would write its lock into the directory being removed."""
    from hutch.runtime.keeper import stop_keeper

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        stop_keeper(path)
        shutil.rmtree(path, ignore_errors=True)
        deadline = time.monotonic() + 10
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
            stop_keeper(path)
            shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture(scope="session")
def template_store():
    """A template store holding `mini` (TEST_TEMPLATE): Debian with Python, pip and bash_kernel,
    built once per test session with mmdebstrap from the host's apt sources (about a minute),
    removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("building a root file system needs root")
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (scripts/install-system-deps.sh installs it)")
    from hutch.config import TemplatesConfig
    from hutch.runtime.rootfs import CA_ENV
    from hutch.templates import debian
    from hutch.templates.model import Template
    from hutch.templates.store import TemplateStore

    root = Path(tempfile.mkdtemp(prefix="hutch-templates-", dir="/var/tmp"))
    try:
        store = TemplateStore(root)
        config = TemplatesConfig()
        layer = debian.build(
            store, config.debian_suite, TEST_TEMPLATE_PACKAGES, "", config.ca_files(),
            setup=TEST_TEMPLATE_SETUP, setup_env={**CA_ENV, **config.env},
        )  # fmt: skip
        store.put(Template(name=TEST_TEMPLATE, layers=(layer,), source="debian", env={"FROM_TEMPLATE": "mini"}))
        yield store
    finally:
        shutil.rmtree(root, ignore_errors=True)
