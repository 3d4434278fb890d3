"""Task messages of jobs that have ended (Redis gives an unacknowledged message back after its visibility timeout,
hours later): a real worker acknowledges and drops each with one log line, leaving the job as it was, and every
message expires with the job's deadline (issue 32)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import REDIS_URL, Stack
from tests.factories import make_retro_test


def _ended_job(state: str) -> uuid.UUID:
    from app.clock import utcnow
    from app.core.jobs import RetroTest, State
    from app.db import get_session_factory

    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=date(2025, 1, 1), end=date(2025, 1, 2), partner_prefix="stale")
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.state, job.attempts, job.finished_at = State(state), 1, utcnow()
    return job_id


def _row(job_id: uuid.UUID) -> dict[str, Any]:
    from sqlalchemy import text

    from app.db import get_session_factory

    with get_session_factory()() as s:
        row = s.execute(text("SELECT * FROM retro_tests WHERE id = :id"), {"id": job_id}).mappings().one()
    return dict(row)


def _unacked_job_ids() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    return " ".join(v.decode(errors="replace") for v in client.hvals("unacked"))


def test_a_message_for_an_ended_job_is_acknowledged_and_dropped_with_one_line(stack: Stack) -> None:
    from app.queue import send_retro_test

    jobs = {state: _ended_job(state) for state in ("succeeded", "failed", "cancelled")}
    before = {state: _row(job_id) for state, job_id in jobs.items()}
    for job_id in jobs.values():
        send_retro_test(job_id)  # as Redis gives it back, a day after the job ended
    log = stack.logs / "worker.log"
    deadline = time.monotonic() + 30
    while not all(f"{job_id} has already ended" in log.read_text(errors="replace") for job_id in jobs.values()):
        assert time.monotonic() < deadline, stack.tail()
        time.sleep(0.2)
    time.sleep(1)  # anything the delivery would log after the line
    lines = log.read_text(errors="replace").splitlines()
    for state, job_id in jobs.items():
        about = [line for line in lines if str(job_id) in line]
        assert len(about) == 1, about
        assert f"has already ended ({state}); dropping a stale message" in about[0]
        assert _row(job_id) == before[state]  # no lock taken, no attempt counted, nothing written
    assert not any(str(job_id) in _unacked_job_ids() for job_id in jobs.values())  # acknowledged


@pytest.mark.usefixtures("database_url")
def test_every_task_message_expires_with_the_job_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from app.config import get_settings
    from app.queue import celery_client, send_partition, send_retro_test

    queue = f"stale-{uuid.uuid4().hex[:8]}"  # a queue no worker reads: the messages stay there to be looked at
    monkeypatch.setenv("RETRO_QUEUE_NAME", queue)
    monkeypatch.setenv("RETRO_JOB_DEADLINE_S", "7200")
    get_settings.cache_clear()
    celery_client.cache_clear()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        sent = datetime.now(UTC)
        send_retro_test(uuid.uuid4())
        send_partition({"job_id": str(uuid.uuid4())})
        messages = [json.loads(m) for m in client.lrange(queue, 0, -1)]
    finally:
        client.delete(queue)
        monkeypatch.undo()
        get_settings.cache_clear()
        celery_client.cache_clear()
    assert len(messages) == 2
    for message in messages:
        expires = datetime.fromisoformat(message["headers"]["expires"])
        assert abs(expires - (sent + timedelta(seconds=7200))) < timedelta(seconds=30), message["headers"]
