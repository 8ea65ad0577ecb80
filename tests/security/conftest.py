"""One throwaway `hutch serve` for the whole security battery, with an attacker and a victim
tenant and victim sessions on every backend (`hutch.selftest.stage`): the attacks are the ones
`hutch selftest` plays, and each test asserts its exact outcome and that the bystanders were fine.

The root casts boot the test template (`template_store`'s `mini`) on bwrap and gVisor, as root inside;
where no template can be built here (no mmdebstrap), its tests are skipped, saying why."""

from __future__ import annotations

import os
import shutil

import pytest

from hutch.selftest.stage import BACKENDS, ROOT_NET, ROOTS, Stage, runtime_of
from hutch.selftest.target import Target
from tests.conftest import TEST_TEMPLATE

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
def root_templates(request):
    """The template store the root cast boots from, or why there is none."""
    try:
        return request.getfixturevalue("template_store")
    except pytest.skip.Exception as exc:
        return str(exc)


@pytest.fixture(scope="session")
def stage(root_templates):
    store = None if isinstance(root_templates, str) else root_templates
    target = Target(templates_dir=store.root if store is not None else None)
    made = Stage(target)
    try:
        target.start()
        made.setup(backends=installed_backends(), template=TEST_TEMPLATE if store is not None else None)
        yield made
    finally:
        made.close()
        target.close()


@pytest.fixture
def backend(request, stage) -> str:
    """The backend a parametrized test runs on, skipped where it is not installed."""
    name = request.param
    if name in (*ROOTS, ROOT_NET):
        if runtime_of(name) not in installed_backends():
            pytest.skip(f"{runtime_of(name)} is not installed here")
        if name not in stage.victims:
            pytest.skip(f"the root cast needs a template: {request.getfixturevalue('root_templates')}")
        return name
    if name != "net" and name not in installed_backends():
        pytest.skip(f"{name} is not installed here")
    return name
