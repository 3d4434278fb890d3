"""Partners CRUD, registry listing, health and the OpenAPI docs."""

from __future__ import annotations

from tests.conftest import make_partner


def test_partner_crud(client) -> None:  # type: ignore[no-untyped-def]
    created = make_partner(client, "acme")
    assert client.get(f"/api/v1/partners/{created['id']}").json()["code"] == "acme"
    patched = client.patch(f"/api/v1/partners/{created['id']}", json={"name": "Acme Corp"})
    assert patched.status_code == 200 and patched.json()["name"] == "Acme Corp"
    assert "acme" in [p["code"] for p in client.get("/api/v1/partners").json()]
    assert client.delete(f"/api/v1/partners/{created['id']}").status_code == 204
    assert client.get(f"/api/v1/partners/{created['id']}").status_code == 404
    assert "acme" not in [p["code"] for p in client.get("/api/v1/partners").json()]


def test_partner_refusals(client) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    dup = client.post("/api/v1/partners", json={"code": "acme", "name": "Again"})
    assert dup.status_code == 409 and "already exists" in dup.json()["detail"]
    bad = client.post("/api/v1/partners", json={"code": "Has Spaces", "name": "x"})
    assert bad.status_code == 422 and bad.json()["field"] == "code"
    assert client.post("/api/v1/partners", json={"code": "ok", "name": "x", "contact_email": "nope"}).status_code == 422
    assert client.patch("/api/v1/partners/00000000-0000-0000-0000-000000000000", json={"name": "x"}).status_code == 404


def test_partner_with_jobs_cannot_be_deleted(client) -> None:  # type: ignore[no-untyped-def]
    from tests.test_retro_tests_api import request

    partner = make_partner(client, "acme")
    assert client.post("/api/v1/retro-tests", json=request()).status_code == 202
    resp = client.delete(f"/api/v1/partners/{partner['id']}")
    assert resp.status_code == 409 and "1 retro test" in resp.json()["detail"]


def test_registry_models_and_versions(client) -> None:  # type: ignore[no-untyped-def]
    models = {m["name"]: m for m in client.get("/api/v1/models").json()}
    assert models["churn"]["aliases"] == {"champion": 1} and models["churn"]["latest_version"] == 1
    versions = client.get("/api/v1/models/churn/versions").json()
    assert versions[0]["version"] == "1" and versions[0]["aliases"] == ["champion"]
    assert versions[0]["tags"]["retro.source.table"] == "features.customer_daily"
    missing = client.get("/api/v1/models/nope/versions")
    assert missing.status_code == 404 and "no model named 'nope'" in missing.json()["detail"]


def test_health_and_readiness(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "registry": "ok"}


def test_docs_list_every_endpoint_with_examples(client) -> None:  # type: ignore[no-untyped-def]
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/api/v1/retro-tests",
        "/api/v1/retro-tests/{job_id}",
        "/api/v1/retro-tests/{job_id}/cancel",
        "/api/v1/retro-tests/{job_id}/files/{name}",
        "/api/v1/partners",
        "/api/v1/partners/{partner_id}",
        "/api/v1/models",
        "/api/v1/models/{name}/versions",
        "/health",
        "/ready",
    ):
        assert path in paths, path
    assert spec["components"]["schemas"]["RetroTestCreate"]["examples"][0]["model_alias"] == "champion"
    assert client.get("/docs").status_code == 200


def test_unknown_route_is_a_json_404(client) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/api/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"
