"""schemathesis against the OpenAPI schema: no 5xx, responses conform to the documented schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import Api

pytestmark = pytest.mark.postgres
EXAMPLES_PER_OPERATION = 15
# Schema-valid bodies can still be bad input (a file that is no model answers 422), so the
# "positive data accepted" check does not apply; these do.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_operation_answers_per_its_schema(api: Api) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def exercise(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {api.key}"}, checks=CHECKS)

        try:
            exercise()
        except Exception as error:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(error)[:400]}")
    assert not failures, "\n".join(failures)
