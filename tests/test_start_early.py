"""A first attempt counts and plans its period while its model server starts (issue 31, "start early"); a refusal
the count finds stops the start as soon as it is known, and the server it started is gone."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

from app.integrations.deployers.port import Deployer, Deployment
from app.integrations.history.port import HistoryQuery, HistorySource
from tests.conftest import HISTORY_START, ROWS_PER_DAY
from tests.factories import make_retro_test

END = HISTORY_START + timedelta(days=1)
WAIT_S = 60  # how long the count waits for the server's start before it goes on alone (the old, serial order)


class CountAfterStart:
    """The real source, but its count waits until the deployer was asked to start (at most WAIT_S), then answers
    `rows` if given: run serially, the count would wait out WAIT_S and finish before any start."""

    def __init__(self, source: HistorySource, started: threading.Event, rows: int | None = None) -> None:
        self._source, self._started, self._rows = source, started, rows
        self.start_seen_by_count: bool | None = None

    def count(self, query: HistoryQuery) -> int | None:
        self.start_seen_by_count = self._started.wait(WAIT_S)
        counted = self._source.count(query)
        return self._rows if self._rows is not None else counted

    def rows_by_day(self, query: HistoryQuery) -> Any:
        return {} if self._rows == 0 else self._source.rows_by_day(query)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


class StartSignals:
    """The real deployer, signalling when a start is asked for."""

    def __init__(self, deployer: Deployer, started: threading.Event) -> None:
        self._deployer, self._started = deployer, started

    def start(self, **kwargs: Any) -> Deployment:
        self._started.set()
        return self._deployer.start(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._deployer, name)


def _run(job_id: uuid.UUID, *, rows: int | None = None) -> tuple[str, CountAfterStart, Deployer]:
    from app.config import get_settings
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters, run_retro_test

    settings = get_settings().model_copy(update={"partitions": 1, "warm_ttl_s": 0})
    started = threading.Event()
    source = CountAfterStart(make_history_source(settings), started, rows)
    deployer = make_deployer(settings)
    adapters = Adapters(
        registry=make_registry(settings),
        source=source,  # type: ignore[arg-type]
        deployer=StartSignals(deployer, started),  # type: ignore[arg-type]
        store=make_result_store(settings),
    )
    state = run_retro_test(job_id=job_id, sessions=get_session_factory(), adapters=adapters, settings=settings)
    return state.value, source, deployer


def _job(job_id: uuid.UUID) -> Any:
    from app.core.jobs import RetroTest
    from app.db import get_session_factory

    with get_session_factory()() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None
        s.expunge(job)
        return job


def _queued() -> uuid.UUID:
    from app.db import get_session_factory

    with get_session_factory()() as s, s.begin():
        return make_retro_test(s, start=HISTORY_START, end=END, partner_prefix="early")


def test_the_count_runs_while_the_model_server_starts_and_every_row_is_scored(
    database_url: str, registry: dict[str, str], history: Any
) -> None:
    job_id = _queued()
    state, source, deployer = _run(job_id)
    job = _job(job_id)
    assert state == "succeeded", (job.error_code, job.error_message)
    # The deployer's start was asked for while the count was still waiting: the two overlapped.
    assert source.start_seen_by_count is True
    assert job.rows_total == job.rows_scored == 2 * ROWS_PER_DAY
    assert deployer.list_managed() == []


def test_a_period_the_count_refuses_stops_the_started_server_and_fails_with_the_counts_reason(
    database_url: str, registry: dict[str, str], history: Any
) -> None:
    job_id = _queued()
    state, source, deployer = _run(job_id, rows=0)
    job = _job(job_id)
    assert state == "failed"
    assert source.start_seen_by_count is True
    assert job.error_code == "source_unknown" and "has no rows between" in (job.error_message or ""), (
        job.error_code,
        job.error_message,
    )
    assert "deploying" in job.stage_started and "scoring" not in job.stage_started
    assert deployer.list_managed() == []  # the server started for it is stopped
