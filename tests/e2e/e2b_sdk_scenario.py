"""One E2B scenario, run by any SDK version in its own virtualenv (`tests/e2e/old_sdk.py`).

It imports only the SDKs (not hutch, not pytest), reads `E2B_API_URL`, `E2B_SANDBOX_URL`,
`E2B_API_KEY` like any user program, plus `OTHER_E2B_API_KEY` (another tenant) and
`SCENARIO_TAG` (a metadata value unique to the run). Every step is recorded, failures
included, and the whole record is printed as one JSON line for the test to judge.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from importlib.metadata import version

from e2b import Sandbox, SandboxQuery
from e2b_code_interpreter import Sandbox as CodeSandbox

steps: dict[str, dict] = {}


def step(name: str, action) -> object:
    try:
        value = action()
    except Exception as exc:
        steps[name] = {"ok": False, "error": type(exc).__name__, "message": str(exc)[:500]}
        traceback.print_exc(file=sys.stderr)
        return None
    steps[name] = {"ok": True, "value": value}
    return value


def seconds_left(info) -> float:
    return (info.end_at - info.started_at).total_seconds()


def main() -> None:
    other = os.environ["OTHER_E2B_API_KEY"]
    tag = os.environ["SCENARIO_TAG"]
    steps["versions"] = {"ok": True, "value": [version("e2b"), version("e2b-code-interpreter")]}

    box = step("create", lambda: Sandbox.create(timeout=120, metadata={"suite": tag}))
    if box is None:
        return
    sid = box.sandbox_id
    step("info", lambda: (lambda i: [i.template_id, i.state.value, i.metadata, seconds_left(i)])(box.get_info()))
    step("list", lambda: [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()])
    step("set_timeout", lambda: (box.set_timeout(60), seconds_left(box.get_info()))[1])
    step("connect", lambda: Sandbox.connect(sid).sandbox_id)
    step("other_tenant_info", lambda: Sandbox.get_info(sid, api_key=other).sandbox_id)
    step("other_tenant_kill", lambda: Sandbox.kill(sid, api_key=other))

    step("commands", lambda: box.commands.run("echo hi from $(whoami)").stdout)
    step("files", lambda: (box.files.write("/home/user/old-sdk.txt", "written"), box.files.read("old-sdk.txt"))[1])
    step("connected_sees_files", lambda: Sandbox.connect(sid).files.read("/home/user/old-sdk.txt"))
    step("is_running", lambda: box.is_running())

    step("kill", lambda: box.kill())
    step("kill_again", lambda: Sandbox.kill(sid))
    step("info_after_kill", lambda: Sandbox.get_info(sid).sandbox_id)
    step("is_running_after_kill", lambda: box.is_running())

    code = step("code_create", lambda: CodeSandbox.create(timeout=120))
    if code is not None:
        step("run_code", lambda: (code.run_code("x = 41"), code.run_code("x + 1").text)[1])
        step("code_kill", lambda: code.kill())


if __name__ == "__main__":
    try:
        main()
    finally:
        print(json.dumps(steps, default=repr))
