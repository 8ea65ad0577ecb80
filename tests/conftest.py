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
