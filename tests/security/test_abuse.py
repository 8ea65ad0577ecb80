"""Resource abuse in a session of its own (fork bomb, memory hog, CPU spin, disk, inodes, /tmp,
file descriptors, threads, endless output, a cell printing without end, processes ignoring
SIGTERM; as root inside a template's session too, and filling the disk through its overlay):
each is stopped by the limit it runs into, judged on the kernel's evidence, and the other
tenant's session, `/health` and the host keep answering (their response times during the abuse
are measured and reported, never asserted). The attacks: `hutch.selftest.abuse`."""

from __future__ import annotations

import pytest

from hutch.selftest import abuse
from hutch.selftest.stage import ROOTS

CASES = [pytest.param(run, b, id=f"{name}-{b}") for name, run in abuse.ATTACKS for b in ("bwrap", "gvisor", *ROOTS)]
CASES += [pytest.param(run, cast, id=f"{name}-{cast}") for name, run in abuse.ROOT_ATTACKS for cast in ROOTS]


@pytest.mark.parametrize(("attack", "backend"), CASES, indirect=["backend"])
def test_each_resource_abuse_is_contained_to_its_own_session(stage, attack, backend):
    outcome = attack(stage, backend)
    print(outcome.attack, backend, outcome.measurements)  # shown with -s: the response times
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()
