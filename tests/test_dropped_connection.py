"""A job's write whose connection the database drops under it (a restart beginning between the checkout's ping and
the statement) is written again on a new connection, instead of failing the job as database_unavailable.

Found by the chaos run: PostgreSQL restarted while a job scored, and the job failed at once with "the job database
stayed unreachable for more than RETRO_DB_OUTAGE_BUDGET_S (120 s): OperationalError: consuming input failed: server
closed the connection unexpectedly". Here the backend of the write's connection is terminated just before its first
statement, as a restart terminates it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import event, text

from tests.conftest import HISTORY_START
from tests.factories import make_retro_test


def _job_run(job_id: uuid.UUID) -> Any:
    from app.config import get_settings
    from app.db import get_session_factory
    from app.retro_tests import runs
    from worker.run import JobRun

    sessions = get_session_factory()
    with sessions() as s:
        spec = runs.load_spec(session=s, job_id=job_id)
    # Recording a fact asks nothing of the lease or the adapters.
    return JobRun(spec=spec, control=None, adapters=None, settings=get_settings(), sessions=sessions)  # type: ignore[arg-type]


def _terminate(backend_pid: int) -> None:
    """pg_terminate_backend from a connection of its own, then wait until that backend is gone."""
    from app.config import get_settings
    from app.db import make_engine

    admin = make_engine(get_settings().resolved_database_url())
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend_pid})
            for _ in range(100):
                gone = conn.execute(
                    text("SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = :pid"), {"pid": backend_pid}
                ).scalar()
                if gone:
                    return
                time.sleep(0.05)
    finally:
        admin.dispose()


def test_a_write_whose_connection_is_dropped_under_it_is_written_again_on_a_new_one(database_url: str) -> None:
    from app.core.jobs import RetroTest
    from app.db import get_engine, get_session_factory

    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=HISTORY_START, end=HISTORY_START, partner_prefix="dropped")
    run = _job_run(job_id)
    dropped: list[int] = []

    def drop_first_statement(conn: Any, _cursor: Any, _statement: str, *_: Any) -> None:
        if not dropped:
            pid = conn.connection.dbapi_connection.info.backend_pid
            dropped.append(pid)
            _terminate(pid)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", drop_first_statement)
    try:
        run.record_plan(rows_total=12_345, chunks_total=3)
    finally:
        event.remove(engine, "before_cursor_execute", drop_first_statement)

    assert dropped, "the first statement's connection should have been terminated"
    with get_session_factory()() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and (job.rows_total, job.chunks_total) == (12_345, 3)
