"""Property-based fuzzing of the whole API from its own OpenAPI document (schemathesis), bounded: no
request may produce a 5xx, and every documented response must match its schema."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import AUTH, Stack

EXAMPLES_PER_OPERATION = 8


def test_no_server_errors_and_responses_match_the_schema(stack: Stack) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    failures: dict[str, str] = {}
    operations = 0
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call_and_validate(base_url=stack.base_url, headers=AUTH,
                                              checks=[not_a_server_error, response_schema_conformance])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures[operation.label] = str(exc)[:1500]
    print(f"{operations} operations, responses by status: {dict(sorted(statuses.items()))}")
    assert operations >= 20 and sum(statuses.values()) >= operations * 2
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
