"""No API request holds a database connection (so no transaction) while it waits on an outside system: the model
registry, the history source's partition listing, the result store (issue 28).

Measured, not assumed: SQLAlchemy's pool events count the connections checked out of the app's own engine, and the
outside systems' real adapters note that count each time they are called. A Session holds a connection exactly
while it is in a transaction, so a count of 0 means no transaction is open during the call.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import delete, event

from tests.conftest import HISTORY_START, make_user

PERIOD_END = HISTORY_START + timedelta(days=1)


class PoolWatch:
    """How many connections of the engine are checked out now, and what that count was at each outside call."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.checked_out = 0
        self.calls: list[tuple[str, int]] = []
        event.listen(engine, "checkout", self._out)
        event.listen(engine, "checkin", self._in)

    def _out(self, *_: Any) -> None:
        self.checked_out += 1

    def _in(self, *_: Any) -> None:
        self.checked_out -= 1

    def close(self) -> None:
        event.remove(self.engine, "checkout", self._out)
        event.remove(self.engine, "checkin", self._in)

    def spy(self, obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Note the checked-out count whenever obj.name (an outside system's adapter method) is called."""
        real: Callable[..., Any] = getattr(obj, name)

        def noted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, self.checked_out))
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, noted)

    def held_during(self, name: str) -> list[int]:
        return [count for called, count in self.calls if called == name]


@pytest.fixture()
def committed_api(engine, registry, history, monkeypatch) -> Iterator[tuple[Any, PoolWatch, str]]:  # type: ignore[no-untyped-def]
    """The API in-process on its real session factory (no shared test transaction: requests commit for real), a
    partner and an admin committed for it, the registry, history source and result store watched; all removed
    afterwards."""
    from fastapi.testclient import TestClient

    from app.audit.models import AuditEvent
    from app.auth.models import ApiToken, User
    from app.config import get_settings
    from app.core.jobs import ResultFile, RetroTest
    from app.core.partners import Partner
    from app.db import get_session_factory
    from app.downloads.models import DownloadLink
    from app.integrations.wiring import (
        get_registry,
        get_result_store,
        make_history_source,
        make_registry,
        make_result_store,
    )
    from app.main import create_app

    code, username = f"tx-{uuid.uuid4().hex[:8]}", f"tx-admin-{uuid.uuid4().hex[:8]}"
    with get_session_factory()() as s, s.begin():
        s.add(Partner(code=code, name=code))
        s.flush()
        token = make_user(s, username, role="admin")
    watch = PoolWatch(engine)
    settings = get_settings()
    models, source, store = make_registry(settings), make_history_source(settings), make_result_store(settings)
    watch.spy(models, "resolve", monkeypatch)
    watch.spy(source, "history_days", monkeypatch)
    watch.spy(source, "known_schema", monkeypatch)
    for name in ("open_read", "open_write"):
        watch.spy(store, name, monkeypatch)
    monkeypatch.setattr("app.retro_tests.router.get_history_source", lambda: source)
    api = create_app()
    api.dependency_overrides[get_registry] = lambda: models
    api.dependency_overrides[get_result_store] = lambda: store
    try:
        with TestClient(api, headers={"Authorization": f"Bearer {token}"}) as c:
            yield c, watch, code
    finally:
        watch.close()
        with get_session_factory()() as s, s.begin():
            partner_id = s.query(Partner.id).filter_by(code=code).scalar()
            job_ids = [j for (j,) in s.query(RetroTest.id).filter_by(partner_id=partner_id)]
            s.execute(delete(AuditEvent).where(AuditEvent.subject_id.in_([str(j) for j in job_ids])))
            s.execute(delete(DownloadLink).where(DownloadLink.retro_test_id.in_(job_ids)))
            s.execute(delete(ResultFile).where(ResultFile.retro_test_id.in_(job_ids)))
            s.execute(delete(RetroTest).where(RetroTest.id.in_(job_ids)))
            s.execute(delete(Partner).where(Partner.id == partner_id))
            user_id = s.query(User.id).filter_by(username=username).scalar()
            s.execute(delete(AuditEvent).where(AuditEvent.actor == username))
            s.execute(delete(ApiToken).where(ApiToken.user_id == user_id))
            s.execute(delete(User).where(User.id == user_id))


def test_a_submission_holds_no_connection_while_it_asks_the_registry_and_the_history(committed_api) -> None:  # type: ignore[no-untyped-def]
    client, watch, code = committed_api
    request = {
        "partner_code": code,
        "model_name": "churn",
        "model_alias": "champion",
        "period_start": HISTORY_START.isoformat(),
        "period_end": PERIOD_END.isoformat(),
    }
    resp = client.post("/api/v1/retro-tests", json=request)
    assert resp.status_code == 202, resp.text
    again = client.post("/api/v1/retro-tests", json=request)
    assert again.status_code == 200 and again.json()["id"] == resp.json()["id"]  # the identical active job
    population = f"customer_id,as_of\n1,{HISTORY_START}\n2,{PERIOD_END}\n".encode()
    as_json = {**request, "model_version": "1", "model_alias": None}
    with_population = client.post(
        "/api/v1/retro-tests/with-population",
        data={"request": json.dumps(as_json)},
        files={"population": ("customers.csv", population, "text/csv")},
    )
    assert with_population.status_code == 202, with_population.text

    assert len(watch.held_during("resolve")) >= 3 and len(watch.held_during("history_days")) >= 2
    assert watch.held_during("open_write") == [0]  # the checked population, stored after the commit
    assert {name: max(watch.held_during(name)) for name, _ in watch.calls} == {name: 0 for name, _ in watch.calls}, (
        watch.calls
    )
    assert watch.checked_out == 0


def test_a_download_holds_no_connection_while_it_opens_the_file(committed_api) -> None:  # type: ignore[no-untyped-def]
    from app.db import get_session_factory
    from tests.web_helpers import succeeded_job

    client, watch, code = committed_api
    with get_session_factory()() as s, s.begin():
        job_id = succeeded_job(s, code, {"scores.parquet": b"PAR1 scores"}).id
    resp = client.get(f"/api/v1/retro-tests/{job_id}/files/scores.parquet", headers={"Range": "bytes=5-"})
    assert resp.status_code == 206 and resp.content == b"scores"
    assert watch.held_during("open_read") == [0]

    link = client.post(f"/api/v1/retro-tests/{job_id}/links", json={"expires_in_days": 1})
    assert link.status_code == 201, link.text
    path = link.json()["url"].split("://", 1)[1].split("/", 1)[1]
    partner = client.get(f"/{path}/scores.parquet")
    assert partner.status_code == 200 and partner.content == b"PAR1 scores"
    assert watch.held_during("open_read") == [0, 0]
    # Both downloads are in the audit trail, written after the file was opened.
    history = client.get(f"/api/v1/retro-tests/{job_id}/downloads").json()
    assert [d["bytes"] for d in history] == [11]
    assert watch.checked_out == 0
