"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), against a
real uvicorn: no 5xx, every response's status and body match the schema. Bounded in examples."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from .conftest import start_server

EXAMPLES = 40  # per operation


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("fuzz"))
    yield s
    assert s.stop() == 0


def test_api_conforms_to_its_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/attend", "/healthz", "/readyz", "/v1/model", "/metrics"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case):
            # The schema cannot say everything (E must equal emb_size, lengths <= T, ...), so a
            # schema-valid request may rightly get a 422: positive_data_acceptance does not apply.
            case.call_and_validate(base_url=fuzz_server.url, excluded_checks=[checks.positive_data_acceptance])

        fuzz()
    assert httpx.get(fuzz_server.url + "/readyz").status_code == 200  # and it is still serving
