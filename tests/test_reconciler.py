"""The reconciler: which running jobs it sends to the workers again, and which it leaves to their attempt."""

from __future__ import annotations

import socket
import subprocess
import uuid
from datetime import date, timedelta

import pytest

from tests.factories import make_retro_test


def _running_job(*, holder: str, heartbeat_age_s: float) -> uuid.UUID:
    from app.clock import utcnow
    from app.core.jobs import RetroTest, State
    from app.db import get_session_factory

    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=date(2025, 1, 1), end=date(2025, 1, 2), partner_prefix="reconcile")
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.state = State.scoring
        job.lease_token = uuid.uuid4().hex
        job.lease_holder = holder
        job.heartbeat_at = utcnow() - timedelta(seconds=heartbeat_age_s)
    return job_id


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.usefixtures("database_url")
def test_jobs_of_dead_or_silent_holders_are_sent_again_and_live_ones_are_left_alone() -> None:
    from app.db import get_session_factory
    from worker.control import this_process
    from worker.reconciler import reconcile_jobs

    here = socket.gethostname()
    live = _running_job(holder=this_process(), heartbeat_age_s=0)
    dead_here = _running_job(holder=f"{here}:{_dead_pid()}", heartbeat_age_s=0)  # killed a moment ago
    silent_elsewhere = _running_job(holder="other-host:1234", heartbeat_age_s=120)
    fresh_elsewhere = _running_job(holder="other-host:1234", heartbeat_age_s=0)

    sent: list[uuid.UUID] = []
    args = {
        "sessions": get_session_factory(),
        "enqueue": sent.append,
        "stale_after_s": 60,
        "requeue_queued_after_s": 60,
    }
    reconcile_jobs(**args)  # type: ignore[arg-type]
    assert dead_here in sent and silent_elsewhere in sent
    assert live not in sent and fresh_elsewhere not in sent
    sent.clear()
    reconcile_jobs(**args)  # type: ignore[arg-type]
    assert dead_here not in sent and silent_elsewhere not in sent  # sent once per stale_after_s, not every tick
