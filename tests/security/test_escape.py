"""Untrusted code inside a session tries to get out (host files, other sessions' workspaces and
agents, host processes and secrets, the network, privileges, devices) and must meet the exact
error each attempt is expected to get, with the other tenant's sessions, `/health` and a host
canary file unaffected afterwards. The attacks and their expectations: `hutch.selftest.escape`."""

from __future__ import annotations

import pytest

from hutch.selftest.battery import escape_backends, run_escape
from hutch.selftest.escape import ESCAPES

CASES = [pytest.param(e, b, id=f"{e.id}-{b}") for e in ESCAPES for b in escape_backends(e)]


@pytest.mark.parametrize(("escape", "backend"), CASES, indirect=["backend"])
def test_each_escape_attempt_fails_with_its_expected_error_and_harms_nobody(stage, escape, backend):
    outcome = run_escape(stage, escape, backend)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()


def test_every_escape_expects_a_specific_failure_never_just_any():
    for escape in ESCAPES:
        for backend in ("bwrap", "gvisor"):
            for probe, allowed in escape.expectations(backend).items():
                assert allowed, f"{escape.id}/{probe} allows nothing"
                assert len(allowed) <= 3, f"{escape.id}/{probe} allows too much: {sorted(allowed)}"
