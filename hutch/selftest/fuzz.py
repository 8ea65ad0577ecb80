"""The control plane under an OpenAPI-driven fuzzer: schemathesis generates requests for every
operation of `/openapi.json`, valid ones and invalid ones, and no answer may be a 5xx, nor may
hutch log an unhandled exception.

It runs as a tenant of its own with a small quota (it may create functions, sessions and
sandboxes: the quota bounds them), bounded in examples per operation, and without shrinking,
so that it takes seconds. Needs the `test` extra (schemathesis); `available()` says whether it
is installed.
"""

from __future__ import annotations

import time

from hutch.selftest.api_abuse import Checks
from hutch.selftest.report import Outcome
from hutch.selftest.stage import Stage

UNHANDLED = "Traceback (most recent call last)"  # in hutch's log: an exception no handler expected


def available() -> bool:
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        return False
    return True


def fuzz(stage: Stage, examples: int = 12) -> Outcome:
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from hypothesis import HealthCheck, Phase

    started = time.monotonic()
    checks = Checks()
    target = stage.target
    tenant = target.tenant("fuzzer", max_sessions=2)
    log_start = target.log_path.stat().st_size if target.log_path.exists() else 0
    schema = schemathesis.openapi.from_url(f"{target.url}/openapi.json")
    headers = {"X-API-Key": tenant.api_key}
    server_errors: list[str] = []
    calls = 0
    operations = 0
    settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        operations += 1
        for mode in schemathesis.GenerationMode:

            @settings
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                nonlocal calls
                try:
                    response = case.call(base_url=target.url, headers=headers, timeout=60)
                except Exception as exc:  # the server cut the connection: as bad as a 5xx
                    server_errors.append(f"{case.method} {case.formatted_path}: {type(exc).__name__}")
                    return
                calls += 1
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.method} {case.formatted_path} -> {response.status_code} {response.text[:120]!r}"
                    )

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                pass  # nothing invalid can be made for this operation (no parameters, no body)
    log = target.log_path.read_text(errors="replace")[log_start:] if target.log_path.exists() else ""
    lines = log.splitlines()
    unhandled = [lines[i - 1] if i else line for i, line in enumerate(lines) if UNHANDLED in line]
    checks.note(f"{calls} requests over {operations} operations, valid and invalid, as a tenant of its own")
    checks.expect("answers that were 5xx (or a cut connection)", len(server_errors), 0)
    for error in sorted(set(server_errors))[:10]:
        checks.note(error)
    checks.expect("unhandled exceptions in hutch's log", len(unhandled), 0)
    for line in unhandled[:5]:
        checks.note(line.strip()[:200])
    for made in tenant.http.get("/v1/sessions", params={"status": "Active"}).json().get("sessions", []):
        tenant.http.delete(f"/v1/functions/{made['functionName']}/sessions/{made['sessionId']}")
    ok, bystanders = stage.bystanders()
    title = "an OpenAPI-driven fuzzer (schemathesis) over the control plane"
    return Outcome("openapi-fuzz", "api", title, "server", checks.ok, checks.evidence, ok, bystanders,
                   {}, time.monotonic() - started)  # fmt: skip


def plan() -> list:
    from hutch.selftest.battery import Attack

    return [Attack("openapi-fuzz", "server", fuzz)] if available() else []
