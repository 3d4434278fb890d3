"""The API encodes a job's view straight to JSON (views.job_json, views.page_json) without building the pydantic
models: these tests hold that encoding to RetroTestOut's and RetroTestPage's schemas, for jobs in every shape the
view has (queued, running with an environment and a failed check, failed with a server path, succeeded with files,
with a population and days without history), as staff and as an account manager see them."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from unittest import mock

import orjson

from tests.conftest import make_partner
from tests.factories import make_retro_test
from tests.web_helpers import succeeded_job


def _jobs_in_every_shape(db_session) -> list:  # type: ignore[no-untyped-def]
    from app.core.jobs import RetroTest, State

    now = datetime.now(UTC)
    queued = make_retro_test(db_session, start=date(2026, 1, 1), end=date(2026, 1, 31))
    running = db_session.get(RetroTest, make_retro_test(db_session, start=date(2026, 2, 1), end=date(2026, 2, 28)))
    running.state = State.scoring
    running.stage_log = [
        [state, (now - timedelta(seconds=60 - i * 10)).isoformat()]
        for i, state in enumerate(("queued", "resolving", "preparing_environment", "deploying", "scoring"))
    ]
    running.environment = {"key": "abc", "python": "3.11.7", "packages": {"mlflow": "2.9.2"}, "reused": True}
    running.validation = {
        "passed": False,
        "source": "/srv/retrotest/var/references/churn.parquet",
        "rows": 3,
        "tolerance": 1e-6,
        "max_abs_diff": 0.25,
        "mismatches": [{"row": 1, "expected": 0.5, "got": math.nan}, {"row": 2, "expected": None, "got": "x"}],
    }
    running.population = {
        "path": "/srv/results/pop.parquet",
        "rows": 12,
        "id_columns": ["customer_id"],
        "as_of_column": "as_of",
        "outcome_column": None,
        "lookback_days": 0,
        "sha256": "0" * 64,
    }
    running.rows_total, running.rows_read, running.rows_scored, running.rows_rejected = 1000, 600, 590, 3
    running.chunks_total, running.chunks_done = 4, 2
    running.days_without_history = ["2026-02-03", "2026-02-04"]
    running.deployment_warm = True
    running.score_protocol = "v2-grpc"
    failed = db_session.get(RetroTest, make_retro_test(db_session, start=date(2026, 3, 1), end=date(2026, 3, 2)))
    failed.state, failed.finished_at = State.failed, now
    failed.stage_started = {"queued": (now - timedelta(seconds=3)).isoformat(), "failed": now.isoformat()}
    failed.error_code, failed.error_message = "source_unreadable", "cannot open /data/hive/warehouse/x.parquet"
    db_session.flush()
    succeeded = succeeded_job(db_session, "acme", {"scores.parquet": b"PAR1", "report.html": b"<html>"})
    return [queued, running.id, failed.id, succeeded.id]


def test_the_encoded_view_is_the_schema_s_json_for_jobs_in_every_shape(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.core.scope import ALL_PARTNERS
    from app.retro_tests import service, views

    make_partner(client, "acme")
    ids = _jobs_in_every_shape(db_session)
    files_at = "https://retro.example/api/v1/retro-tests"
    reads = [service.read_retro_test(session=db_session, job_id=job_id, scope=ALL_PARTNERS) for job_id in ids]
    # A running job's elapsed time and time left move with the clock: both encodings must see the same moment
    # (a slow CI run crossed a tenth of a second between them).
    clock = mock.Mock(wraps=datetime)
    clock.now.return_value = datetime.now(UTC)
    with mock.patch.object(views, "datetime", clock):
        _compare_encodings(reads, files_at)
    # What the shapes were for: a server path hidden from account managers, a NaN as null, times in UTC as "Z".
    shown = orjson.loads(views.job_json(reads[1], files_at, staff=False))
    assert shown["validation"]["source"] == "<server path>" and shown["validation"]["mismatches"][0]["got"] is None
    assert shown["created_at"].endswith("Z") and shown["progress"]["rows_per_s"] is not None
    assert "path" not in shown["population"] and len(shown["warnings"]) == 1


def _compare_encodings(reads: list, files_at: str) -> None:  # type: ignore[type-arg]
    from app.retro_tests import service, views
    from app.retro_tests.schemas import RetroTestOut, RetroTestPage

    for staff in (True, False):
        for read in reads:
            expected = RetroTestOut.model_validate(views.job_view(read, files_at, staff=staff)).model_dump_json()
            assert orjson.loads(views.job_json(read, files_at, staff=staff)) == json.loads(expected)
        page = {"items": [views.job_view(r, files_at, staff=staff) for r in reads], "total": 9, "limit": 4, "offset": 0}
        expected = RetroTestPage.model_validate(page).model_dump_json()
        keys = [
            service.JobKey(r.job.id, r.job.partner_id, r.job.state, r.job.updated_at, r.job.finished_at, ())
            for r in reads
        ]
        views_by_id = {r.job.id: views.job_json(r, files_at, staff=staff) for r in reads}
        encoded = views.page_json(keys, views_by_id, total=9, limit=4, offset=0)
        assert orjson.loads(encoded) == json.loads(expected)


def test_the_api_answers_the_encoded_view(client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {"scores.parquet": b"PAR1"})
    db_session.commit()
    one = client.get(f"/api/v1/retro-tests/{job.id}")
    page = client.get("/api/v1/retro-tests", params={"partner": "acme"})
    assert one.status_code == page.status_code == 200 and one.headers["content-type"] == "application/json"
    assert page.json()["items"][0]["id"] == one.json()["id"] == str(job.id)
    assert one.json()["files"][0]["download_url"].endswith(f"/{job.id}/files/scores.parquet")


def test_an_ended_job_s_kept_view_follows_its_row_its_files_its_reader_and_the_language(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.core.jobs import ResultFile, RetroTest
    from app.core.scope import ALL_PARTNERS
    from app.i18n import use_language
    from app.retro_tests import service, views

    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {"scores.parquet": b"PAR1", "report.html": b"<html>"})
    job.days_without_history = ["2026-01-02"]  # a translated warning
    job.result_location = "/srv/retrotest/results/acme"  # staff only
    db_session.commit()
    files_at = "https://retro.example/api/v1/retro-tests"

    def shown(*, staff: bool = False, language: str = "en") -> dict:  # type: ignore[type-arg]
        read = service.read_retro_test(session=db_session, job_id=job.id, scope=ALL_PARTNERS)
        with use_language(language):
            return orjson.loads(views.job_json(read, files_at, staff=staff))

    def listed() -> dict:  # type: ignore[type-arg]
        """The job as the list answers it to an admin: its kept view found by its key (service.list_keys)."""
        page = client.get("/api/v1/retro-tests", params={"partner": "acme"}, headers={"Accept-Language": "en"})
        assert page.status_code == 200 and page.json()["total"] == 1
        return dict(page.json()["items"][0])

    first = shown()
    assert shown() == first and len(first["files"]) == 2 and first["result_location"] is None
    assert shown(staff=True)["result_location"] == "/srv/retrotest/results/acme"
    assert listed() == listed() and [f["name"] for f in listed()["files"]] == ["report.html", "scores.parquet"]
    assert (
        shown(language="ru")["warnings"] != first["warnings"]
        and shown(language="ru")["progress"]["activity"] == "готово"
    )
    # Retention deletes its files; then an update of its row (a note): each shows at once.
    db_session.query(ResultFile).filter_by(retro_test_id=job.id, name="report.html").delete()
    db_session.commit()
    assert [f["name"] for f in shown()["files"]] == ["scores.parquet"]
    assert [f["name"] for f in listed()["files"]] == ["scores.parquet"]
    db_session.get(RetroTest, job.id).note = "re-checked"
    db_session.commit()
    assert shown()["note"] == "re-checked" and shown() == {**first, "note": "re-checked", "files": shown()["files"]}
    assert listed()["note"] == "re-checked"


def test_a_running_job_s_view_is_kept_with_its_clock_worked_out_at_each_read_and_follows_its_row_at_once(  # type: ignore[no-untyped-def]
    client, db_session, monkeypatch
) -> None:
    """A running job's view is built once per row: later reads (status and list) work out only its elapsed time,
    pace and time left again, for the moment they read it; a change of its row shows at once."""
    from app.core.jobs import RetroTest
    from app.core.scope import ALL_PARTNERS
    from app.i18n import use_language
    from app.retro_tests import service, views

    make_partner(client, "acme")
    job_id = _jobs_in_every_shape(db_session)[1]
    db_session.commit()
    later = [0.0]

    started = datetime.now(UTC)
    monkeypatch.setattr(views, "_now", lambda: started + timedelta(seconds=later[0]))
    build_view = views.job_view
    built = mock.Mock(wraps=build_view)
    monkeypatch.setattr(views, "job_view", built)
    read_whole = mock.Mock(wraps=service.read_retro_test)
    monkeypatch.setattr(service, "read_retro_test", read_whole)

    def shown() -> dict:  # type: ignore[type-arg]
        """The view as the API answers the admin, in the language the requests below ask for."""
        read = service.read_retro_test(session=db_session, job_id=job_id, scope=ALL_PARTNERS)
        with use_language("en"):
            return orjson.loads(views.job_json(read, views.files_url(client), staff=True))

    first = shown()
    later[0] = 30.0
    again = shown()
    assert built.call_count == 1  # kept: not built again
    elapsed = again["progress"]["elapsed_s"] - first["progress"]["elapsed_s"]
    assert 29.9 <= elapsed <= 31.0 and again["progress"]["rows_per_s"] < first["progress"]["rows_per_s"]
    assert again["progress"]["eta_s"] > first["progress"]["eta_s"]
    assert {**again, "progress": first["progress"]} == first  # only the clock's fields moved
    read = service.read_retro_test(session=db_session, job_id=job_id, scope=ALL_PARTNERS)
    with use_language("en"):
        built_now = views.RetroTestOut.model_validate(build_view(read, views.files_url(client), staff=True))
    assert again == json.loads(built_now.model_dump_json())
    read_whole.reset_mock()
    english = {"Accept-Language": "en"}
    one = client.get(f"/api/v1/retro-tests/{job_id}", headers=english)  # a status read: its key only
    page = client.get("/api/v1/retro-tests", params={"state": "scoring"}, headers=english)
    assert one.status_code == page.status_code == 200 and built.call_count == 1 and not read_whole.called
    assert one.json()["progress"]["elapsed_s"] >= again["progress"]["elapsed_s"]
    (listed,) = [job for job in page.json()["items"] if job["id"] == str(job_id)]
    assert listed["progress"]["elapsed_s"] >= again["progress"]["elapsed_s"]
    db_session.get(RetroTest, job_id).rows_scored = 700
    db_session.commit()
    changed = client.get(f"/api/v1/retro-tests/{job_id}", headers=english).json()
    assert changed["progress"]["rows_scored"] == 700  # its row changed: at once
    assert built.call_count == 2 and read_whole.call_count == 1


def test_kept_views_stay_within_their_budget_least_recently_used_first(client, db_session, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """RETRO_API_VIEW_CACHE_MB bounds what a process keeps; past it the least recently used view goes; 0 keeps none."""
    from app.core.scope import ALL_PARTNERS
    from app.retro_tests import service, views

    make_partner(client, "acme")
    jobs = [succeeded_job(db_session, "acme", {"scores.parquet": b"PAR1"}).id for _ in range(3)]
    db_session.commit()
    kept = views.KeptViews()
    monkeypatch.setattr(views, "_ENTRY_BYTES", 400_000)  # with 1 MB: room for two views
    budget_mb = [1]
    monkeypatch.setattr(views, "get_settings", lambda: SimpleNamespace(api_view_cache_mb=budget_mb[0]))
    files_at = "https://retro.example/api/v1/retro-tests"
    keys = {job_id: service.read_key(session=db_session, job_id=job_id, scope=ALL_PARTNERS) for job_id in jobs}

    def build(job_id) -> None:  # type: ignore[no-untyped-def]
        kept.encoded(
            service.read_retro_test(session=db_session, job_id=job_id, scope=ALL_PARTNERS), files_at, staff=False
        )

    def held() -> set:  # type: ignore[type-arg]
        return set(kept.kept(list(keys.values()), files_at, staff=False))

    build(jobs[0])
    build(jobs[1])
    assert held() == {jobs[0], jobs[1]}
    assert kept.kept([keys[jobs[0]]], files_at, staff=False)  # jobs[0] used last: jobs[1] goes first
    build(jobs[2])
    assert held() == {jobs[0], jobs[2]}
    budget_mb[0] = 0
    build(jobs[1])
    assert held() == set()
