"""The oldest E2B SDKs hutch supports, in a virtualenv of their own under /var/tmp.

The main virtualenv keeps the newest SDKs; this one is made once (pip from PyPI, a few
seconds) and reused while its pins stay the same, so `.ci/run` on a fresh machine needs
nothing else. `run_scenario` runs `e2b_sdk_scenario.py` in it and returns its record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

OLDEST = ("e2b==2.31.0", "e2b-code-interpreter==2.9.0")  # 2.9.0: the newest release that runs on e2b 2.31
VENV = Path("/var/tmp/e2b-old-venv")
SCENARIO = Path(__file__).with_name("e2b_sdk_scenario.py")


def ensure_venv(venv: Path = VENV, pins: tuple[str, ...] = OLDEST) -> Path:
    """The virtualenv's python, made or remade if its pins differ."""
    marker = venv / "hutch-pins.txt"
    python = venv / "bin" / "python"
    wanted = "\n".join(pins)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(pins)} failed:\n{install.stderr[-3000:]}")
    marker.write_text(wanted)
    return python


def run_scenario(python: Path, url: str, key: str, other_key: str, tag: str, timeout: float = 300) -> dict:
    """Run the scenario against a hutch server; `{step: {"ok", "value"|"error", ...}}`."""
    env = {
        **os.environ,
        "E2B_API_URL": url,
        "E2B_SANDBOX_URL": url,
        "E2B_API_KEY": key,
        "OTHER_E2B_API_KEY": other_key,
        "SCENARIO_TAG": tag,
    }
    done = subprocess.run([str(python), str(SCENARIO)], env=env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"the scenario printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(lines[-1])
    record["_stderr"] = done.stderr[-3000:]
    return record
