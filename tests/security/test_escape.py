"""Untrusted code inside a session tries to get out (host files, other sessions' workspaces and
agents, host processes and secrets, the network, privileges, devices) and must meet the exact
error each attempt is expected to get, with the other tenant's sessions, `/health` and a host
canary file unaffected afterwards; the same as root inside a template's session (the root cast),
plus what root inside enables. The attacks and their expectations: `hutch.selftest.escape`,
`hutch.selftest.rootfs`."""

from __future__ import annotations

import pytest

from hutch.selftest import rootfs
from hutch.selftest.battery import escape_backends, run_escape
from hutch.selftest.escape import ESCAPES
from hutch.selftest.stage import BACKENDS, ROOT_NET, ROOTS

CASTS = (*BACKENDS, *ROOTS)
CASES = [pytest.param(e, b, id=f"{e.id}-{b}") for e in ESCAPES for b in escape_backends(e, CASTS)]


@pytest.mark.parametrize(("escape", "backend"), CASES, indirect=["backend"])
def test_each_escape_attempt_fails_with_its_expected_error_and_harms_nobody(stage, escape, backend):
    outcome = run_escape(stage, escape, backend)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


ROOTFS_CASES = [pytest.param(run, cast, id=f"{name}-{cast}") for cast in ROOTS for name, run in rootfs.ATTACKS]


@pytest.mark.parametrize(("attack", "backend"), ROOTFS_CASES, indirect=["backend"])
def test_root_inside_leaves_the_templates_layer_and_the_hosts_uids_alone(stage, attack, backend):
    outcome = attack(stage, backend)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


def test_the_root_casts_play_every_escape_and_root_kernel_only_there():
    for cast in ROOTS:
        played = {e.id for e in ESCAPES if cast in escape_backends(e, CASTS)}
        assert played == {e.id for e in ESCAPES} - {"networked-host-services"}
    # The networked one as root inside a session with a network (bwrap's).
    assert escape_backends(next(e for e in ESCAPES if e.id == "networked-host-services"), CASTS) == ["net", ROOT_NET]
    assert escape_backends(next(e for e in ESCAPES if e.id == "root-kernel"), BACKENDS) == []


def test_every_escape_expects_a_specific_failure_never_just_any():
    for escape in ESCAPES:
        for backend in CASTS:
            for probe, allowed in escape.expectations(backend).items():
                assert allowed, f"{escape.id}/{probe} allows nothing"
                assert len(allowed) <= 3, f"{escape.id}/{probe} allows too much: {sorted(allowed)}"
