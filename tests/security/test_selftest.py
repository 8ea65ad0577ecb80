"""`hutch selftest`, the same battery for an operator: a table of attack -> verdict with the
evidence, a Markdown report, and an exit status that says whether anything escaped."""

from __future__ import annotations

import subprocess
import sys

from hutch.selftest.report import Outcome, markdown, table


def test_the_report_shows_every_attack_and_the_evidence_of_a_failure():
    outcomes = [
        Outcome("host-files", "files", "read host files", "bwrap", True, ["read-canary: ENOENT"], True, ["ok"]),
        Outcome("mount", "privilege", "mount things", "gvisor", False, ["mount-tmpfs: ok (expected EPERM)"]),
    ]
    text = table(outcomes)
    assert "host-files" in text and "contained" in text
    assert "FAILED" in text and "mount-tmpfs: ok (expected EPERM)" in text
    report = markdown(outcomes, 12.0)
    assert "**1 of 2 attacks contained**, **1 FAILED**" in report
    assert "### `mount` on gvisor: FAILED" in report and "- read-canary: ENOENT" in report


def test_hutch_selftest_runs_the_battery_and_exits_zero_when_everything_is_contained(tmp_path):
    report = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, "-m", "hutch", "selftest", "--backends", "bwrap", "--only", "host-files,guessed-ids",
         "--report", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "contained            host-files [bwrap]" in done.stdout
    assert "2 of 2 attacks contained" in done.stdout
    assert "`guessed-ids` on server: contained" in report.read_text()


def test_hutch_selftest_refuses_an_unknown_attack():
    done = subprocess.run(
        [sys.executable, "-m", "hutch", "selftest", "--only", "teleport"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "unknown attacks ['teleport']" in done.stderr
