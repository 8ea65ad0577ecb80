"""Traversal through the file APIs (`..`, absolute host paths, symlinks out, NUL bytes, long
names) and a path component swapped for a symlink while uploads and downloads run: exact
refusals, never a 5xx, never a host byte (`hutch.selftest.file_api`)."""

from __future__ import annotations

import pytest

from hutch.selftest import file_api
from hutch.selftest.stage import ROOTS


@pytest.mark.parametrize("backend", ["bwrap", "gvisor"], indirect=True)
def test_traversal_through_the_file_apis_meets_exact_refusals(stage, backend):
    outcome = file_api.traversal(stage, backend)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


@pytest.mark.parametrize("backend", ROOTS, indirect=True)
def test_as_root_the_file_apis_read_the_templates_files_and_write_only_the_sessions_own(stage, backend):
    outcome = file_api.traversal_as_root(stage, backend)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


@pytest.mark.parametrize("backend", ["bwrap", "gvisor", *ROOTS], indirect=True)
def test_swapping_a_path_component_for_a_symlink_during_transfers_leaks_nothing(stage, backend):
    outcome = file_api.race(stage, backend)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


def test_hutch_walking_a_workspace_never_follows_what_the_sandbox_swaps_in(stage):
    outcome = file_api.host_walks(stage)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()
