"""`hutch selftest`, the same battery for an operator: a table of attack -> verdict with the
evidence, a Markdown report, and an exit status that says whether anything escaped."""

from __future__ import annotations

import shutil
import subprocess
import sys

from hutch.selftest.report import Outcome, markdown, table
from tests.conftest import TEST_TEMPLATE


def test_the_report_shows_every_attack_and_the_evidence_of_a_failure():
    outcomes = [
        Outcome("host-files", "files", "read host files", "bwrap", True, ["read-canary: ENOENT"], True, ["ok"]),
        Outcome("mount", "privilege", "mount things", "gvisor", False, ["mount-tmpfs: ok (expected EPERM)"]),
    ]
    text = table(outcomes)
    assert "host-files" in text and "contained" in text
    assert "FAILED" in text and "mount-tmpfs: ok (expected EPERM)" in text
    report = markdown(outcomes, 12.0, "skipped: template `base` is not prepared")
    assert "**1 of 2 attacks contained**, **1 FAILED**" in report
    assert "- Root cast: skipped: template `base` is not prepared" in report
    assert "### `mount` on gvisor: FAILED" in report and "- read-canary: ENOENT" in report


def test_hutch_selftest_runs_the_battery_and_exits_zero_when_everything_is_contained(tmp_path):
    report = tmp_path / "report.md"
    done = subprocess.run(
        [sys.executable, "-m", "hutch", "selftest", "--backends", "bwrap", "--only", "host-files,guessed-ids",
         "--report", str(report), "--templates", str(tmp_path / "no-store")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "contained            host-files [bwrap]" in done.stdout
    assert "2 of 2 attacks contained" in done.stdout
    assert "`guessed-ids` on server: contained" in report.read_text()
    # No template prepared: the root cast is skipped, and the operator is told.
    assert f"template 'base' is not prepared in {tmp_path / 'no-store'}" in done.stderr
    assert "the root cast (attacks as root inside a template) is skipped" in done.stderr
    assert "[root]" not in done.stdout
    assert not (tmp_path / "no-store").exists()  # only looked at, never made


def test_hutch_selftest_plays_the_root_casts_on_a_prepared_template(template_store):
    casts = ["root", *(["root-gvisor"] if shutil.which("runsc") else [])]
    only = "root-kernel,rootfs-lower-layer"
    done = subprocess.run(
        [sys.executable, "-m", "hutch", "selftest", "--backends", "bwrap,gvisor", "--only", only,
         "--templates", str(template_store.root), "--template", TEST_TEMPLATE],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for cast in casts:
        assert f"contained            root-kernel [{cast}]" in done.stdout
        assert f"contained            rootfs-lower-layer [{cast}]" in done.stdout
    assert f"{2 * len(casts)} of {2 * len(casts)} attacks contained" in done.stdout


def test_hutch_selftest_refuses_an_unknown_attack():
    done = subprocess.run(
        [sys.executable, "-m", "hutch", "selftest", "--only", "teleport"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "unknown attacks ['teleport']" in done.stderr
