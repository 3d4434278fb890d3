"""The job database going away under running jobs: restarted mid-scoring and while deploying, down for 20 s.

These faults stop a PostgreSQL server, so they run on a cluster of their own (initdb'd by the fixture on another
port), with an API and a Celery worker of their own: the session's database is never disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.demo import stop_process, wait_until_ready
from tests import own_postgres as own_pg
from tests.conftest import HISTORY_DAYS, HISTORY_START, ROOT, Stack, free_port, start_process
from tests.own_postgres import OwnPostgres
from tests.test_end_to_end import END, mlserver_processes_for


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    if not own_pg.available():
        pytest.skip("needs PostgreSQL's initdb and runuser to start a cluster of the test's own")
    with own_pg.own_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def outage_stack(own_postgres: OwnPostgres, registry: dict[str, str], big_history: str) -> Iterator[Stack]:
    """The API and a worker on the module's own database and queue."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RETRO_DATABASE_URL": own_postgres.url,
        "RETRO_QUEUE_NAME": f"outage-{uuid.uuid4().hex[:8]}",
        "RETRO_HEARTBEAT_INTERVAL_S": "1",
    }
    exe = [sys.executable, "-m", "app.cli"]
    subprocess.run([*exe, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    subprocess.run(
        [*exe, "create-admin", "--username", "outage", "--password-stdin"],
        env=env,
        input=b"outage-password-123\n",
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    token = (
        subprocess.run(
            [*exe, "create-token", "--username", "outage"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    port = free_port()
    logs = Path(tempfile.mkdtemp(prefix="retro-outage-logs-"))
    env["RETRO_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    procs = [
        start_process([*exe, "serve", "--port", str(port), "--skip-migrations"], env=env, log=logs / "api.log"),
        start_process([*exe, "worker", "--name", "outage"], env=env, log=logs / "worker.log"),
    ]
    stack = Stack(f"http://127.0.0.1:{port}", procs, logs, token)
    wait_until_ready(f"{stack.base_url}/ready", procs=procs, timeout_s=90, logs=stack.tail)
    deadline = time.monotonic() + 90
    while " ready." not in (logs / "worker.log").read_text(errors="replace"):
        assert time.monotonic() < deadline, stack.tail()
        time.sleep(0.3)
    yield stack
    for p in procs:
        stop_process(p)


def _submit(stack: Stack, partner: str, table: str) -> str:
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": partner, "name": partner})
        resp = c.post(
            "/api/v1/retro-tests",
            json={
                "partner_code": partner,
                "model_name": "churn",
                "model_alias": "champion",
                "period_start": HISTORY_START.isoformat(),
                "period_end": END.isoformat(),
                "source": {"table": table},
            },
        )
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])


def _job(stack: Stack, job_id: str) -> dict[str, Any] | None:
    """The job, or None while the API answers 503 (the database is down)."""
    with stack.client() as c:
        resp = c.get(f"/api/v1/retro-tests/{job_id}")
    if resp.status_code == 503:
        return None
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _wait(stack: Stack, job_id: str, until: Any, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = _job(stack, job_id)
        if job is not None and until(job):
            return job
        assert time.monotonic() < deadline, f"{job}\n{stack.tail()}"
        time.sleep(0.1)


def _done(stack: Stack, job_id: str) -> dict[str, Any]:
    return _wait(stack, job_id, lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout_s=600)


def _assert_every_row_once(job: dict[str, Any], rows: int) -> None:
    assert job["state"] == "succeeded", job["error"]
    progress = job["progress"]
    assert progress["rows_total"] == progress["rows_read"] == progress["rows_scored"] == rows
    assert {f["name"] for f in job["files"]} >= {"scores.parquet", "manifest.json"}
    assert next(f["rows"] for f in job["files"] if f["name"] == "scores.parquet") == rows
    assert mlserver_processes_for(job["id"]) == []


BIG_ROWS = HISTORY_DAYS * 150_000


def test_postgres_restarted_while_deploying_mid_scoring_and_publishing_loses_no_job(
    outage_stack: Stack, own_postgres: OwnPostgres, big_history: str
) -> None:
    job_id = _submit(outage_stack, "outage-restarts", big_history)
    _wait(outage_stack, job_id, lambda j: j["state"] == "deploying")
    own_postgres.restart()
    for at in (0.2, 0.5, 0.8):  # three more, at different moments of the scoring
        _wait(outage_stack, job_id, lambda j, at=at: j["progress"]["rows_scored"] >= at * BIG_ROWS)
        own_postgres.restart()
    # And once while it publishes (merging 600,000 rows into two files takes a few seconds).
    seen = _wait(outage_stack, job_id, lambda j: j["state"] in ("publishing", "succeeded", "failed"), timeout_s=300)
    assert seen["state"] == "publishing", seen["state"]
    own_postgres.restart()
    _assert_every_row_once(_done(outage_stack, job_id), BIG_ROWS)


def test_postgres_down_for_20_s_mid_scoring_the_job_waits_and_the_api_answers_503(
    outage_stack: Stack, own_postgres: OwnPostgres, big_history: str
) -> None:
    job_id = _submit(outage_stack, "outage-down", big_history)
    _wait(outage_stack, job_id, lambda j: j["progress"]["rows_scored"] >= 0.3 * BIG_ROWS)
    own_postgres.stop()
    try:
        time.sleep(2)
        with outage_stack.client() as c:
            down = c.get(f"/api/v1/retro-tests/{job_id}")
            listed = c.get("/api/v1/retro-tests")
        for resp in (down, listed):
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "5"
            body = resp.json()
            assert body["error"] == "database_unavailable" and "try again" in body["detail"]
            assert "SELECT" not in resp.text and "retro_tests" not in resp.text  # no SQL, no table names
        page = httpx.get(f"{outage_stack.base_url}/jobs", cookies={}, follow_redirects=False, timeout=10)
        assert page.status_code in (303, 503)  # signed out: the sign-in page; never a 500
        time.sleep(18)
    finally:
        own_postgres.start()
    _assert_every_row_once(_done(outage_stack, job_id), BIG_ROWS)
