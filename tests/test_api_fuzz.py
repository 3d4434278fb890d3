"""Property-based: no request the OpenAPI schema admits, or nearly admits, makes the API answer 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.db import get_session
from app.main import create_app

api = create_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", api)


@pytest.fixture()
def on_test_session(db_session, registry) -> Iterator[None]:  # type: ignore[no-untyped-def]
    api.dependency_overrides[get_session] = lambda: db_session
    yield
    api.dependency_overrides.clear()


@schema.exclude(path="/ready").parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case, on_test_session) -> None:  # type: ignore[no-untyped-def]
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )
    if response.status_code >= 400:
        body = response.json()
        assert set(body) >= {"error", "detail"}, body
