"""Helpers for tests that drive the web pages the way a browser does: cookies, CSRF tokens, forms."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import HISTORY_START

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    match = _CSRF.search(html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def sign_in(client: Any, username: str, password: str) -> None:
    """Sign a TestClient in through the sign-in form; it keeps the session cookie."""
    page = client.get("/login")
    assert page.status_code == 200, page.text
    resp = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert resp.status_code == 303, resp.text


def succeeded_job(session: Any, partner_code: str, files: dict[str, bytes]) -> Any:
    """A succeeded retro test of this partner whose result files really are in the result store."""
    from app.config import get_settings
    from app.core.jobs import ResultFile, RetroTest, State, job_prefix
    from app.integrations.storage.results import ResultStore
    from app.partners.service import find_by_code

    partner = find_by_code(session=session, code=partner_code)
    assert partner is not None
    now = datetime.now(UTC)
    job = RetroTest(
        partner_id=partner.id,
        model_name="churn",
        model_version="1",
        model_uri="models:/churn/1",
        requested_by="tester",
        period_start=HISTORY_START,
        period_end=HISTORY_START + timedelta(days=1),
        output_formats=["parquet"],
        source_override={},
        request_key=uuid.uuid4().hex,
        source_table="features.customer_daily",
        date_column="snapshot_date",
        id_columns=["customer_id"],
        state=State.succeeded,
        stage_started={"queued": (now - timedelta(seconds=5)).isoformat(), "succeeded": now.isoformat()},
        finished_at=now,
    )
    session.add(job)
    session.flush()
    store = ResultStore(get_settings().resolved_results_url())
    for name, blob in files.items():
        with store.open_write(f"{job_prefix(job)}/{name}") as fh:
            fh.write(blob)
        session.add(
            ResultFile(
                retro_test_id=job.id,
                name=name,
                kind="report" if name.startswith("report.") else "scores",
                format=name.split(".", 1)[1],
                rows=10,
                bytes=len(blob),
                sha256=hashlib.sha256(blob).hexdigest(),
            )
        )
    session.flush()
    return job
