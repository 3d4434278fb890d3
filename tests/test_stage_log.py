"""A resumed job's stage timeline (app/core/transitions.py, app/retro_tests/views.py): each pass of its stages
is kept, numbered, with its own duration, instead of the last pass alone (issue 32). No database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

from app.core.jobs import RetroTest, State
from app.core.transitions import advance
from app.retro_tests.views import _stages, _starts


def test_a_resumed_job_shows_both_passes_with_their_own_durations() -> None:
    t0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    job = RetroTest(id=uuid.uuid4(), state=State.queued, stage_started={"queued": t0.isoformat()})
    job.stage_log = [["queued", t0.isoformat()]]
    moves = [
        (State.resolving, 5),
        (State.extracting, 6),
        (State.deploying, 10),  # the worker is killed while the server starts ...
        (State.resolving, 300),  # ... and the redelivered job starts its stages again
        (State.extracting, 301),
        (State.deploying, 303),
        (State.validating, 320),
        (State.scoring, 321),
        (State.publishing, 340),
        (State.succeeded, 345),
    ]
    for state, second in moves:
        with mock.patch("app.core.transitions.utcnow", return_value=t0 + timedelta(seconds=second)):
            advance(job, state)
    stages = _stages(job, _starts(job))
    assert [(s["state"], s["attempt"]) for s in stages] == [
        ("queued", 1),
        ("resolving", 1),
        ("extracting", 1),
        ("deploying", 1),
        ("resolving", 2),
        ("extracting", 2),
        ("deploying", 2),
        ("validating", 2),
        ("scoring", 2),
        ("publishing", 2),
        ("succeeded", 2),
    ]
    # The queue took 5 s and the first deploy ran until the redelivery, not the whole first attempt.
    assert stages[0]["seconds"] == 5 and stages[3]["seconds"] == 290 and stages[6]["seconds"] == 17
    assert job.stage_started["resolving"] == (t0 + timedelta(seconds=300)).isoformat()


def test_a_job_from_before_the_log_shows_the_latest_start_of_each_stage() -> None:
    t0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    job = RetroTest(
        id=uuid.uuid4(),
        state=State.extracting,
        stage_started={"queued": t0.isoformat(), "resolving": (t0 + timedelta(seconds=2)).isoformat()},
    )
    with mock.patch("app.core.transitions.utcnow", return_value=t0 + timedelta(seconds=4)):
        advance(job, State.deploying)
    assert [s["state"] for s in _stages(job, _starts(job))] == ["queued", "resolving", "deploying"]
