"""The template service's limits: a tenant's unfinished builds, builds at once on the host."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hutch.config import TemplatesConfig
from hutch.errors import QuotaExceeded
from hutch.templates.model import Template
from hutch.templates.service import TemplateService
from hutch.templates.store import TemplateStore

LAYER = "b" * 64


def _service(tmp_path: Path, **limits) -> TemplateService:
    store = TemplateStore(tmp_path / "templates")
    scratch = store.scratch()
    (scratch / "marker").write_text("x")
    store.commit(scratch, LAYER)
    return TemplateService(store, TemplatesConfig(prepare=[], **limits), in_use=set)


def test_a_tenant_has_at_most_its_limit_of_unfinished_builds(tmp_path):
    service = _service(tmp_path, max_builds_per_tenant=2)
    service.new_build("one", owner="t1", waiting=True)
    service.new_build("two", owner="t1", waiting=True)
    with pytest.raises(QuotaExceeded, match="max_builds_per_tenant"):
        service.new_build("three", owner="t1", waiting=True)
    service.new_build("three", owner="t2", waiting=True)  # another tenant has its own


def test_builds_beyond_the_hosts_limit_wait_their_turn_and_say_so(tmp_path):
    service = _service(tmp_path, max_concurrent_builds=1)
    running = 0
    most = 0

    def maker(name: str):
        async def make() -> Template:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.05)
            running -= 1
            return Template(name=name, layers=(LAYER,))

        return make

    async def go() -> list:
        builds = [service.new_build(name) for name in ("a", "b", "c")]
        for build in builds:
            service._run(build, maker(build.template))
        while any(b.finished_at is None for b in builds):
            await asyncio.sleep(0.01)
        return builds

    builds = asyncio.run(go())
    assert most == 1 and [b.status for b in builds] == ["ready"] * 3
    assert any("waiting: 1 builds already run" in line for _, _, line in builds[2].lines)
    assert service.store.exists("c")


def test_a_prepared_built_in_whose_recipe_changed_is_rebuilt_and_an_unchanged_one_is_not(tmp_path):
    from hutch.templates import debian
    from hutch.templates.service import BUILTIN, BUILTIN_SETUP

    store = TemplateStore(tmp_path / "templates")
    config = TemplatesConfig(prepare=["base"], max_concurrent_builds=1)
    service = TemplateService(store, config, in_use=set)
    setup = BUILTIN_SETUP["base"]() if "base" in BUILTIN_SETUP else ""
    current = debian.layer_id(config.debian_suite, BUILTIN["base"], config.debian_mirror, config.ca_files(), setup)
    for layer in (current, LAYER):
        scratch = store.scratch()
        store.commit(scratch, layer)

    async def prepared_with(layer: str) -> bool:
        store.put(Template(name="base", layers=(layer,)))
        async with service._slots:  # the build waits for the slot: nothing runs mmdebstrap here
            service.prepare_builtins()
            started = "base" in service._building
            await service.close()
            service._building.clear()
        return started

    assert asyncio.run(prepared_with(current)) is False
    assert asyncio.run(prepared_with(LAYER)) is True  # an older recipe's layer
