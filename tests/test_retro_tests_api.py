"""The REST API for retro tests: every refusal at submission, duplicates, listing, cancel."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from tests.conftest import HISTORY_DAYS, HISTORY_START, make_partner

START = HISTORY_START.isoformat()
END = (HISTORY_START + timedelta(days=HISTORY_DAYS - 1)).isoformat()


def request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "partner_code": "acme",
        "model_name": "churn",
        "model_version": "1",
        "period_start": START,
        "period_end": END,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture()
def acme(client) -> dict:  # type: ignore[no-untyped-def,type-arg]
    return make_partner(client, "acme")


def test_a_period_without_history_is_refused_at_once_naming_the_days_there_are(client, acme) -> None:  # type: ignore[no-untyped-def]
    before = HISTORY_START - timedelta(days=20)
    resp = client.post(
        "/api/v1/retro-tests",
        json=request(period_start=before.isoformat(), period_end=(before + timedelta(days=2)).isoformat()),
    )
    assert resp.status_code == 422, resp.text
    err = resp.json()
    assert err["error"] == "no_history_in_period" and err["field"] == "period_start"
    assert f"it has history from {START} to {END}" in err["detail"]
    # A period that overlaps the history by one day is accepted: the worker scores the days there are.
    overlapping = request(period_start=before.isoformat(), period_end=START)
    assert client.post("/api/v1/retro-tests", json=overlapping).status_code == 202


def test_a_period_partly_without_history_is_accepted_with_the_missing_days_named(client, acme) -> None:  # type: ignore[no-untyped-def]
    """History ends on END; a period three days longer is accepted, and says which days are not in the results."""
    last = HISTORY_START + timedelta(days=HISTORY_DAYS - 1)
    past = [(last + timedelta(days=i)).isoformat() for i in (1, 2, 3)]
    resp = client.post("/api/v1/retro-tests", json=request(period_end=past[-1]))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["days_without_history"] == past
    assert job["warnings"] == [
        f"the history has no rows on 3 day(s) of the period: {past[0]} to {past[-1]}; those days are not in the results"
    ]
    assert client.get(f"/api/v1/retro-tests/{job['id']}").json()["days_without_history"] == past
    # A full period is what the request asks for: the same period is refused, naming the days.
    full = client.post("/api/v1/retro-tests", json=request(period_end=past[-1], require_full_period=True))
    assert full.status_code == 422, full.text
    err = full.json()
    assert err["error"] == "no_history_in_period" and err["field"] == "period_start"
    assert f"has no rows on 3 of the {HISTORY_DAYS + 3} days of the period ({past[0]} to {past[-1]})" in err["detail"]
    # A period inside the history has nothing to warn about.
    inside = client.post("/api/v1/retro-tests", json=request(require_full_period=True)).json()
    assert inside["days_without_history"] == [] and inside["warnings"] == []
    assert client.post("/api/v1/retro-tests", json=request(require_full_period="yes")).status_code == 422


def test_progress_says_what_the_stage_does_and_how_long_it_has_taken(client, acme) -> None:  # type: ignore[no-untyped-def]
    progress = client.post("/api/v1/retro-tests", json=request()).json()["progress"]
    assert progress["activity"] == "waiting for a worker"
    assert progress["elapsed_s"] >= 0 and progress["rows_per_s"] is None and progress["eta_s"] is None


def test_create_returns_202_with_location(client, acme) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/retro-tests", json=request(model_version=None, model_alias="champion"))
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"].endswith(f"/api/v1/retro-tests/{job['id']}")
    assert job["state"] == "queued"
    assert job["model_version"] == "1" and job["requested_alias"] == "champion"
    assert job["source_table"] == "features.customer_daily"
    assert job["id_columns"] == ["customer_id"] and job["requested_by"] == "tester"
    assert client.get(resp.headers["location"]).json()["id"] == job["id"]


def test_identical_active_request_returns_the_existing_job(client, acme) -> None:  # type: ignore[no-untyped-def]
    first = client.post("/api/v1/retro-tests", json=request())
    # Same model version reached through its alias: the same work, so the same job.
    second = client.post("/api/v1/retro-tests", json=request(model_version=None, model_alias="champion"))
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    other = client.post("/api/v1/retro-tests", json=request(period_start=END))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


@pytest.mark.parametrize(
    ("overrides", "status", "code", "words"),
    [
        ({"period_start": END, "period_end": START}, 422, "invalid_period", "is after the last day"),
        ({"period_end": (date.today() + timedelta(days=1)).isoformat()}, 422, "invalid_period", "in the future"),
        ({"period_start": (date.today() - timedelta(days=400)).isoformat()}, 422, "period_too_long", "at most 366"),
        ({"partner_code": "nobody"}, 422, "partner_not_found", "no partner with code 'nobody'"),
        ({"model_name": "nope"}, 422, "model_not_found", "no model named 'nope'"),
        ({"model_version": "99"}, 422, "model_version_not_found", "has no version 99"),
        ({"model_version": None, "model_alias": "retired"}, 422, "model_version_not_found", "aliases: champion"),
        ({"partner_code": "acmee"}, 422, "partner_not_found", "did you mean 'acme'?"),
        (
            {"model_name": "chrun"},
            422,
            "model_not_found",
            "no model named 'chrun' in the registry; did you mean 'churn'?",
        ),
        (
            {"model_version": None, "model_alias": "champoin"},
            422,
            "model_version_not_found",
            "did you mean 'champion'?",
        ),
        ({"model_version": "99"}, 422, "model_version_not_found", "its versions: 1"),
        ({"model_alias": "champion"}, 422, "invalid_request", "exactly one of model_version or model_alias"),
        ({"model_version": None}, 422, "invalid_request", "exactly one of model_version or model_alias"),
        ({"model_version": "one"}, 422, "invalid_request", "model_version"),
        ({"model_name": "nosig"}, 422, "model_signature_missing", "without an input signature"),
        ({"model_name": "untagged"}, 422, "source_unknown", "retro.source.table"),
        ({"period_start": "2026-02-30"}, 422, "invalid_request", "period_start"),
        ({"output_formats": ["xlsx"]}, 422, "invalid_request", "output_formats"),
        ({"source": {"table": "x; DROP TABLE y"}}, 422, "invalid_request", "source.table"),
        ({"source": {"id_columns": ["a`b"]}}, 422, "invalid_request", "source.id_columns"),
        ({"surprise": 1}, 422, "invalid_request", "surprise"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_message(client, acme, overrides, status, code, words) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/retro-tests", json=request(**overrides))
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code
    assert words in body["detail"]
    assert client.get("/api/v1/retro-tests", params={"partner": "acme"}).json()["total"] == 0  # nothing was queued


def test_malformed_json_is_a_422(client, acme) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/retro-tests", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_request"


def test_untagged_model_works_with_a_source_in_the_request(client, acme) -> None:  # type: ignore[no-untyped-def]
    source = {"table": "features.customer_daily", "date_column": "snapshot_date", "id_columns": ["customer_id"]}
    resp = client.post("/api/v1/retro-tests", json=request(model_name="untagged", source=source))
    assert resp.status_code == 202, resp.text
    assert resp.json()["source_table"] == "features.customer_daily"


def test_list_filters_and_pages(client, acme) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "globex")
    for day in range(3):
        d = (HISTORY_START + timedelta(days=day)).isoformat()
        assert client.post("/api/v1/retro-tests", json=request(period_start=d, period_end=d)).status_code == 202
    assert client.post("/api/v1/retro-tests", json=request(partner_code="globex")).status_code == 202
    page = client.get("/api/v1/retro-tests", params={"partner": "acme", "limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = client.get("/api/v1/retro-tests", params={"partner": "acme", "limit": 2, "offset": 2}).json()
    assert len(rest["items"]) == 1
    ids = {j["id"] for j in page["items"]} | {j["id"] for j in rest["items"]}
    assert len(ids) == 3
    queued = {"state": "queued", "model": "churn"}
    assert client.get("/api/v1/retro-tests", params={**queued, "partner": "acme"}).json()["total"] == 3
    assert client.get("/api/v1/retro-tests", params={**queued, "partner": "globex"}).json()["total"] == 1
    assert client.get("/api/v1/retro-tests", params={"partner": "acme", "state": "succeeded"}).json()["total"] == 0
    assert client.get("/api/v1/retro-tests", params={"partner": "acme", "model": "other"}).json()["total"] == 0
    bad = client.get("/api/v1/retro-tests", params={"state": "sleeping"})
    assert bad.status_code == 422 and "state" in bad.json()["detail"]
    assert client.get("/api/v1/retro-tests", params={"limit": 0}).status_code == 422
    # Found by the fuzzer: an offset past bigint made Postgres fail with a 500.
    huge = client.get("/api/v1/retro-tests", params={"offset": 10**20})
    assert huge.status_code == 422 and "offset" in huge.json()["detail"]


def test_cancel_a_queued_job_then_cancel_again_is_a_conflict(client, acme) -> None:  # type: ignore[no-untyped-def]
    job = client.post("/api/v1/retro-tests", json=request()).json()
    resp = client.post(f"/api/v1/retro-tests/{job['id']}/cancel")
    assert resp.status_code == 202
    assert resp.json()["state"] == "cancelled"
    again = client.post(f"/api/v1/retro-tests/{job['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    # A cancelled job no longer blocks an identical new request.
    assert client.post("/api/v1/retro-tests", json=request()).status_code == 202


def test_unknown_and_malformed_ids(client) -> None:  # type: ignore[no-untyped-def]
    missing = client.get("/api/v1/retro-tests/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert client.get("/api/v1/retro-tests/not-a-uuid").status_code == 422
    assert client.post("/api/v1/retro-tests/00000000-0000-0000-0000-000000000000/cancel").status_code == 404
    assert (
        client.get("/api/v1/retro-tests/00000000-0000-0000-0000-000000000000/files/scores.parquet").status_code == 404
    )


def test_audit_trail_records_who_did_what(client, acme, db_session) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from app.audit.models import AuditEvent

    job = client.post("/api/v1/retro-tests", json=request()).json()
    client.post(f"/api/v1/retro-tests/{job['id']}/cancel")
    events = db_session.scalars(
        select(AuditEvent).where(AuditEvent.subject_id == job["id"]).order_by(AuditEvent.id)
    ).all()
    assert [(e.actor, e.action) for e in events] == [("tester", "retro_test.create"), ("tester", "retro_test.cancel")]
