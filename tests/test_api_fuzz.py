"""Property-based: no request the OpenAPI schema admits, or nearly admits, makes the API answer 5xx.

The requests carry an admin's API token, so they reach the real handlers instead of stopping at 401.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from app.db import get_session
from app.main import create_app
from tests.conftest import make_user

api = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", api)


@pytest.fixture()
def on_test_session(db_session, registry) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    """The app on the rolled-back test session; yields the headers of a signed-in admin."""
    api.dependency_overrides[get_session] = lambda: db_session
    token = make_user(db_session, "fuzzer", role="admin")
    yield {"Authorization": f"Bearer {token}"}
    api.dependency_overrides.clear()


# One test per operation, by its label: schemathesis' own parametrize gives its items one shared id, which
# pytest-xdist cannot schedule (it ran one of the 27).
OPERATIONS = [op for op in (r.ok() for r in schema.get_all_operations()) if op.path != "/ready"]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)  # what the schema admits, and what it nearly admits


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_input_makes_a_server_error(operation, on_test_session) -> None:  # type: ignore[no-untyped-def]
    @given(case=st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in MODES)))
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case) -> None:  # type: ignore[no-untyped-def]
        case.headers = {**(case.headers or {}), **on_test_session}  # ours wins over any generated Authorization
        response = case.call()
        assert response.status_code != 401, f"{case.method} {case.formatted_path}: the token was not accepted"
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
        )
        if response.status_code >= 400:
            body = response.json()
            assert set(body) >= {"error", "detail"}, body

    check()
