"""schemathesis fuzzes every route of /openapi.json on a live server: never a 5xx, and every
answer matches its documented status, content type and schema (a few dozen cases per route)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from cogvlm.pipeline import Pipeline
from cogvlm.serve import ServeSettings, create_app, running

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(reference_model, reference_tokenizer):
    # default_max_tokens keeps the many fuzzed answers short
    app = create_app(
        Pipeline(reference_model, reference_tokenizer), ServeSettings(model_names=("tiny",), default_max_tokens=2)
    )
    with running(app) as url:
        api = schemathesis.openapi.from_url(url + "/openapi.json")

        @api.hook
        def map_body(context, body):
            """Name the served model where the fuzzer wrote some string, so requests get past 404."""
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                body["model"] = "tiny"
            return body

        yield api


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_documented_answers(case):
    case.call_and_validate(checks=CHECKS)
