"""schemathesis over the control plane's `/openapi.json` (valid and invalid requests for every
operation, as a tenant of its own, bounded in examples): no 5xx, no unhandled exception."""

from __future__ import annotations

import pytest

from hutch.selftest import fuzz


def test_the_openapi_fuzzer_finds_no_server_error_and_no_unhandled_exception(stage):
    if not fuzz.available():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    outcome = fuzz.fuzz(stage, examples=12)
    assert outcome.contained, outcome.failure()
    assert outcome.bystanders_ok, outcome.failure()
