"""One throwaway `hutch serve` for the whole security battery, with an attacker and a victim
tenant and victim sessions on every backend (`hutch.selftest.stage`): the attacks are the ones
`hutch selftest` plays, and each test asserts its exact outcome and that the bystanders were fine."""

from __future__ import annotations

import os
import shutil

import pytest

from hutch.selftest.stage import BACKENDS, Stage
from hutch.selftest.target import Target

pytestmark = pytest.mark.sandbox


def installed_backends() -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b != "gvisor" or shutil.which("runsc") is not None)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="the battery starts hutch serve and sandboxes: root only")
        for item in items:
            if "/security/" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def stage():
    target = Target()
    made = Stage(target)
    try:
        target.start()
        made.setup(backends=installed_backends())
        yield made
    finally:
        made.close()
        target.close()


@pytest.fixture
def backend(request, stage) -> str:
    """The backend a parametrized test runs on, skipped where it is not installed."""
    name = request.param
    if name != "net" and name not in installed_backends():
        pytest.skip(f"{name} is not installed here")
    return name
