"""The lease that lets one attempt at a time own a job, and how a dead holder is recognised."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from tests.conftest import HISTORY_START
from tests.factories import make_retro_test
from worker.control import holder_is_dead, this_process


def test_a_holder_is_dead_only_when_its_process_on_this_host_is_gone() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    assert holder_is_dead(f"{host}:{gone.pid}") is True
    assert holder_is_dead(this_process()) is False
    assert holder_is_dead(f"some-other-host:{gone.pid}") is False  # there only the heartbeat can tell
    assert holder_is_dead(None) is False
    assert holder_is_dead("garbage") is False


def test_a_zombie_holder_is_dead() -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(100):  # exited, not yet reaped: a zombie
        if Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        __import__("time").sleep(0.05)
    assert holder_is_dead(f"{socket.gethostname()}:{zombie.pid}") is True
    zombie.wait()


def test_a_fresh_lease_is_taken_over_at_once_when_its_holder_died_here(database_url: str) -> None:
    from app.config import get_settings
    from app.core.jobs import RetroTest
    from app.db import get_session_factory
    from worker.run import claim

    sessions = get_session_factory()
    settings = get_settings()
    with sessions() as s, s.begin():
        job_id = make_retro_test(s, start=HISTORY_START, end=HISTORY_START + timedelta(days=1))
    claimed = claim(sessions=sessions, job_id=job_id, settings=settings)
    assert claimed is not None and claimed.lease is not None
    first = claimed.lease
    # A second attempt while the first is alive (this process) and fresh: refused.
    refused = claim(sessions=sessions, job_id=job_id, settings=settings)
    assert refused is not None and refused.lease is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.lease_holder = f"{socket.gethostname()}:{gone.pid}"  # the holder was a pool process, now killed
    second = claim(sessions=sessions, job_id=job_id, settings=settings)
    assert second is not None and second.lease is not None and second.lease != first
    assert second.attempts == 2
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.lease_holder == this_process()
