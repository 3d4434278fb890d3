"""The read path of the API's hot endpoints: the same answers as before, cheaper; token use still recorded."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from tests.conftest import make_partner, make_user
from tests.web_helpers import succeeded_job


def test_a_job_s_download_links_are_under_the_public_base_url_not_the_host(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from starlette.requests import Request

    from app.core.scope import ALL_PARTNERS
    from app.retro_tests import service, views
    from app.retro_tests.schemas import JobFilters

    make_partner(client, "acme")
    job = succeeded_job(db_session, "acme", {"scores.parquet": b"PAR1", "manifest.json": b"{}"})
    request = Request({"type": "http", "app": client.app, "router": client.app.router, "scheme": "https",
                       "server": ("retro.example", 443), "root_path": "", "path": "/", "query_string": b"",
                       "headers": [(b"host", b"retro.example")]})  # fmt: skip
    read = service.read_retro_test(session=db_session, job_id=job.id, scope=ALL_PARTNERS)
    listed, total = service.list_retro_tests(session=db_session, scope=ALL_PARTNERS, filters=JobFilters(partner="acme"))
    assert total == 1 and views.job_out(listed[0], views.files_url(request)) == views.job_out(
        read, views.files_url(request)
    )
    # The download links are the route url_for names, under RETRO_PUBLIC_BASE_URL: never the request's Host.
    from app.config import get_settings

    urls = [f.download_url for f in views.job_out(read, views.files_url(request)).files]
    route = request.url_for("download_result_file", job_id=job.id, name="manifest.json")
    assert route.netloc == "retro.example" and get_settings().public_base_url.rstrip("/") != "https://retro.example"
    assert urls == [
        f"{get_settings().public_base_url.rstrip('/')}{route.path.rsplit('/', 1)[0]}/{name}"
        for name in ("manifest.json", "scores.parquet")
    ]


def test_the_list_total_is_counted_only_when_the_page_is_full(client, db_session) -> None:  # type: ignore[no-untyped-def]
    make_partner(client, "acme")
    for _ in range(3):
        succeeded_job(db_session, "acme", {})
    pages = [
        client.get("/api/v1/retro-tests", params={"partner": "acme", "limit": limit, "offset": offset}).json()
        for limit, offset in ((2, 0), (2, 2), (5, 0), (2, 4), (3, 0))
    ]
    assert [(len(p["items"]), p["total"]) for p in pages] == [(2, 3), (1, 3), (3, 3), (0, 3), (3, 3)]


def test_a_token_s_last_use_is_recorded_at_most_once_a_minute(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from app.auth import service
    from app.auth.models import ApiToken

    secret = make_user(db_session, "watcher", role="account_manager")
    token = db_session.query(ApiToken).filter_by(token_hash=service.secret_digest(secret)).one()
    assert token.last_used_at is None

    assert service.user_for_api_token(session=db_session, secret=secret) is not None
    db_session.refresh(token)
    first = token.last_used_at
    assert first is not None and datetime.now(UTC) - first < timedelta(minutes=1)

    # Within the minute: no write (every API request would otherwise update the same row).
    assert service.user_for_api_token(session=db_session, secret=secret) is not None
    db_session.refresh(token)
    assert token.last_used_at == first

    # Older than a minute: written again.
    db_session.execute(
        text("UPDATE api_tokens SET last_used_at = :at WHERE id = :id"),
        {"at": first - timedelta(minutes=2), "id": token.id},
    )
    assert service.user_for_api_token(session=db_session, secret=secret) is not None
    db_session.refresh(token)
    assert token.last_used_at > first - timedelta(minutes=1)


def test_a_request_records_the_token_s_last_use(client, db_session) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from app.auth import service
    from app.auth.models import ApiToken

    secret = make_user(db_session, "caller", role="admin")
    with TestClient(client.app, headers={"Authorization": f"Bearer {secret}"}) as caller:
        assert caller.get(f"/api/v1/retro-tests/{uuid.uuid4()}").status_code == 404
    token = db_session.query(ApiToken).filter_by(token_hash=service.secret_digest(secret)).one()
    db_session.refresh(token)
    assert token.last_used_at is not None


def test_a_pooled_connection_the_server_closed_is_replaced_before_use(database_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app import db

    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # every checkout counts as after a long idle
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with db.get_engine().connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            gone = text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :pid")
            deadline = time.monotonic() + 10
            while not admin.execute(gone, {"pid": pid}).scalar_one() and time.monotonic() < deadline:
                time.sleep(0.05)
        with engine.connect() as conn:  # the dead connection is pinged, dropped, and a new one opened
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()
