"""Chunks planned by rows: a period of small daily partitions read from HiveServer2 in a few large queries."""

from __future__ import annotations

import gc
import itertools
import math
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import HISTORY_START
from tests.factories import make_retro_test
from tests.hive_latency_proxy import HiveLatencyProxy
from tests.hive_server import HiveServer, run_sql
from worker.chunks import Chunk, chunks_of, plan_record, plan_rows

DAYS = 30  # six chunks of five days; the day-per-query comparison sends one statement a day
ROWS_PER_DAY = 200
CHUNK_ROWS = 1_000
TABLE = "features.small_days"
START = HISTORY_START - timedelta(days=DAYS + 10)
END = START + timedelta(days=DAYS - 1)
TOTAL = DAYS * ROWS_PER_DAY


# --- the plan alone ---


@given(
    rows=st.lists(st.integers(0, 5_000), min_size=1, max_size=400),
    chunk_rows=st.integers(1, 20_000),
)
def test_a_plan_covers_the_period_once_in_at_most_ceil_rows_over_chunk_rows_chunks(
    rows: list[int], chunk_rows: int
) -> None:
    start = date(2025, 1, 1)
    end = start + timedelta(days=len(rows) - 1)
    by_day = {start + timedelta(days=i): n for i, n in enumerate(rows) if n}
    chunks = plan_rows(start, end, by_day, rows=chunk_rows)
    assert chunks[0].start == start and chunks[-1].end == end
    for before, after in itertools.pairwise(chunks):
        assert after.start == before.end + timedelta(days=1)  # no gap, no overlap: a day is never split
    assert [c.key for c in chunks] == sorted(c.key for c in chunks) == [c.start.isoformat() for c in chunks]
    total = sum(rows)
    assert len(chunks) <= max(1, math.ceil(total / chunk_rows))
    for c in chunks:
        days = [n for d, n in by_day.items() if c.start <= d <= c.end]
        assert c.rows == sum(days)
        assert c.rows < chunk_rows + max(days, default=0)  # about chunk_rows: overshot by less than one day
    assert chunks_of(plan_record(chunks)) == chunks


def test_small_days_are_merged_and_a_day_larger_than_a_chunk_ends_one() -> None:
    start = date(2026, 1, 1)
    days = [start + timedelta(days=i) for i in range(6)]
    by_day = {days[0]: 300, days[1]: 300, days[2]: 5_000, days[3]: 300, days[5]: 300}  # days[4] has no rows
    chunks = plan_rows(start, days[5], by_day, rows=1_000)
    assert [(c.start, c.end, c.rows) for c in chunks] == [(days[0], days[2], 5_600), (days[3], days[5], 600)]
    # Empty days at either end belong to the chunks next to them: the plan covers the whole period.
    chunks = plan_rows(start - timedelta(days=3), days[5] + timedelta(days=3), {days[2]: 10}, rows=1_000)
    assert [(c.start, c.end, c.rows) for c in chunks] == [(start - timedelta(days=3), days[5] + timedelta(days=3), 10)]


# --- a job's plan: recorded once, used by every attempt ---


def _run(job_id: uuid.UUID, source: Any, **settings_update: Any) -> Any:
    from app.config import get_settings
    from app.db import get_session_factory
    from app.retro_tests import runs
    from worker.run import Adapters, JobRun

    sessions = get_session_factory()
    with sessions() as s:
        spec = runs.load_spec(session=s, job_id=job_id)
    adapters = Adapters(registry=None, source=source, deployer=None, store=None)  # type: ignore[arg-type]
    settings = get_settings().model_copy(update=settings_update)
    # Planning asks nothing of the lease, the registry, a deployer or the result store.
    return JobRun(spec=spec, control=None, adapters=adapters, settings=settings, sessions=sessions)  # type: ignore[arg-type]


class CountedSource:
    """A source whose rows of each day are given, and which says how often it was asked."""

    def __init__(self, by_day: dict[date, int] | None) -> None:
        self.by_day = by_day
        self.asked = 0

    def rows_by_day(self, query: Any) -> dict[date, int] | None:
        self.asked += 1
        return self.by_day


def _query(start: date, end: date) -> Any:
    from app.core.model_types import Feature
    from app.integrations.history.port import HistoryQuery

    return HistoryQuery(
        table=TABLE,
        date_column="snapshot_date",
        id_columns=("customer_id",),
        features=(Feature("tenure_months", "long"),),
        start=start,
        end=end,
    )


def test_the_first_plan_is_recorded_and_every_later_attempt_uses_it(database_url: str) -> None:
    from app.db import get_session_factory
    from worker.chunks import plan_chunks

    start, end = date(2026, 1, 1), date(2026, 1, 10)
    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=start, end=end, partner_prefix="plan")
    first = CountedSource({start + timedelta(days=i): 400 for i in range(10)})
    planned = plan_chunks(_run(job_id, first, chunk_rows=1_000), _query(start, end))
    assert [(c.key, c.rows) for c in planned] == [
        ("2026-01-01", 1_200),
        ("2026-01-04", 800),
        ("2026-01-06", 1_200),
        ("2026-01-09", 800),
    ]
    # The source changed since, and RETRO_CHUNK_ROWS too: a resumed attempt or a helper still cuts the same way.
    later = CountedSource({start: 10_000})
    assert plan_chunks(_run(job_id, later, chunk_rows=50), _query(start, end)) == planned
    assert later.asked == 0


def test_the_count_names_the_days_without_history_and_a_full_period_request_fails_on_them(database_url: str) -> None:
    """Where the API could not tell (Hive), the period's per-day count is where the missing days are found."""
    from app.core.jobs import RetroTest
    from app.db import get_session_factory
    from app.errors import NoHistoryInPeriod
    from worker.chunks import plan_chunks

    start, end = date(2026, 2, 1), date(2026, 2, 7)
    counted = {start + timedelta(days=i): 100 for i in (0, 1, 2, 5)}  # no rows on the 4th, 5th and 7th
    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=start, end=end, partner_prefix="coverage")
    plan_chunks(_run(job_id, CountedSource(counted)), _query(start, end))
    with get_session_factory()() as s:
        assert s.get(RetroTest, job_id).days_without_history == ["2026-02-04", "2026-02-05", "2026-02-07"]  # type: ignore[union-attr]

    with get_session_factory()() as s, s.begin():
        strict = make_retro_test(s, start=start, end=end, partner_prefix="coverage-strict")
        s.get(RetroTest, strict).require_full_period = True  # type: ignore[union-attr]
    with pytest.raises(
        NoHistoryInPeriod, match=r"no rows on 3 of the 7 days of the period \(2026-02-04 to 2026-02-05, 2026-02-07\)"
    ):
        plan_chunks(_run(strict, CountedSource(counted)), _query(start, end))


def test_a_first_query_opened_early_is_closed_when_its_attempt_ends_without_reading_it(database_url: str) -> None:
    from app.db import get_session_factory
    from worker.chunks import plan_chunks

    start, end = date(2026, 1, 1), date(2026, 1, 3)
    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=start, end=end, partner_prefix="plan-early")
    opened, closed = threading.Event(), threading.Event()

    class EndlessSource(CountedSource):
        def batches(self, query: Any, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
            opened.set()
            try:
                while True:
                    yield pa.record_batch({"x": [1]})
            finally:
                closed.set()

    run = _run(job_id, EndlessSource({start: 10}), chunk_rows=1_000)
    plan_chunks(run, _query(start, end))
    assert opened.wait(10)  # the first chunk's query runs while the model server would start
    del run  # the attempt ends (a deployment failed, say) before any reader took it
    gc.collect()
    assert closed.wait(10)


def test_a_job_that_committed_day_chunks_before_plans_were_recorded_keeps_its_days(database_url: str) -> None:
    from app.core.jobs import RetroTestChunk
    from app.db import get_session_factory
    from worker.chunks import plan_chunks

    start, end = date(2026, 1, 1), date(2026, 1, 4)
    with get_session_factory()() as s, s.begin():
        job_id = make_retro_test(s, start=start, end=end, partner_prefix="plan-old")
        s.add(
            RetroTestChunk(
                retro_test_id=job_id, chunk_key=start.isoformat(), rows_read=5, rows_scored=5, rows_rejected=0
            )
        )
    source = CountedSource({start + timedelta(days=i): 5 for i in range(4)})
    planned = plan_chunks(_run(job_id, source, chunk_rows=1_000, chunk_days=1), _query(start, end))
    assert planned == [Chunk(key=d.isoformat(), start=d, end=d) for d in (start + timedelta(days=i) for i in range(4))]
    assert source.asked == 0


# --- a whole job against HiveServer2, counting every statement it sends ---


@pytest.fixture(scope="module")
def small_days(hive: HiveServer, history: Path) -> str:
    """Small daily partitions (30 of 200 rows), a partner request's usual shape: many days of few rows each."""
    from app.demo_data import write_history

    write_history(root=history, table=TABLE, start=START, days=DAYS, rows_per_day=ROWS_PER_DAY)
    cols = (
        "customer_id BIGINT, tenure_months BIGINT, monthly_spend DOUBLE, data_gb DOUBLE, voice_minutes BIGINT, "
        "sms_count BIGINT, support_calls BIGINT, late_payments BIGINT, roaming BOOLEAN, plan STRING"
    )
    run_sql(
        hive,
        f"CREATE TABLE IF NOT EXISTS {TABLE} ({cols}, snapshot_date DATE) USING parquet "
        f"PARTITIONED BY (snapshot_date) LOCATION '{history / 'features' / 'small_days'}'",
        f"ALTER TABLE {TABLE} RECOVER PARTITIONS",
    )
    return TABLE


@pytest.fixture(scope="module")
def proxy(hive: HiveServer) -> Iterator[HiveLatencyProxy]:
    """The session's HiveServer2 behind a proxy that records every statement (no added latency here)."""
    with HiveLatencyProxy(upstream_host=hive.host, upstream_port=hive.port) as p:
        yield p


def _in_process(proxy: HiveLatencyProxy, **update: Any) -> tuple[Any, Any, Any]:
    from app.config import get_settings
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters

    settings = get_settings().model_copy(
        update={
            "history_source": "hive",
            "hive_host": proxy.host,
            "hive_port": proxy.port,
            "partitions": 1,
            **update,
        }
    )
    adapters = Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )
    return settings, get_session_factory(), adapters


def _new_job(prefix: str) -> uuid.UUID:
    from app.db import get_session_factory

    with get_session_factory()() as s, s.begin():
        return make_retro_test(s, start=START, end=END, table=TABLE, partner_prefix=prefix)


def _scores(sessions: Any, adapters: Any, job_id: uuid.UUID) -> pa.Table:
    from app.core.jobs import RetroTest, State, job_prefix

    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.state == State.succeeded, (job and job.state, job and job.error_message)
        assert job.rows_total == job.rows_read == job.rows_scored == TOTAL
        prefix = job_prefix(job)
    with adapters.store.open_read(f"{prefix}/scores.parquet") as fh:
        return pq.read_table(fh).sort_by([("snapshot_date", "ascending"), ("customer_id", "ascending")])


def _kinds(statements: list[str]) -> list[str]:
    return [s.split()[0].upper() + (" GROUP BY" if "GROUP BY" in s else "") for s in statements]


def test_a_period_of_small_daily_partitions_is_read_in_a_few_queries_with_the_same_results(
    small_days: str, proxy: HiveLatencyProxy, registry: dict[str, str], database_url: str
) -> None:
    from app.core.jobs import RetroTest
    from worker.pipeline import run_retro_test

    results: dict[str, pa.Table] = {}
    sent: dict[str, list[str]] = {}
    calls: dict[str, list[str]] = {}
    for plan, chunk_rows in (("a day per query", 1), ("by rows", CHUNK_ROWS)):
        settings, sessions, adapters = _in_process(proxy, chunk_rows=chunk_rows)
        job_id = _new_job("plan-rows")
        proxy.clear()
        assert (
            run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings).value == "succeeded"
        )
        sent[plan], calls[plan] = proxy.statements, proxy.calls
        results[plan] = _scores(sessions, adapters, job_id)
        with sessions() as s:
            job = s.get(RetroTest, job_id)
            assert (
                job is not None
                and job.chunk_plan is not None
                and job.chunks_done == job.chunks_total == len(job.chunk_plan.chunks)
            )

    # Every statement the job sent to HiveServer2: one GROUP BY of the days, then a SELECT per chunk. The schema
    # check is one GetColumns metadata call, and no session sends a USE or SET.
    assert _kinds(sent["by rows"]) == ["SELECT GROUP BY", *["SELECT"] * (TOTAL // CHUNK_ROWS)]
    assert len(sent["by rows"]) <= math.ceil(TOTAL / CHUNK_ROWS) + 2
    assert calls["by rows"].count("ExecuteStatement") == len(sent["by rows"])
    assert calls["by rows"].count("GetColumns") == 1
    assert _kinds(sent["a day per query"]) == ["SELECT GROUP BY", *["SELECT"] * DAYS]
    by_rows, by_days = results["by rows"], results["a day per query"]
    assert by_rows.num_rows == TOTAL and by_rows.schema == by_days.schema
    for key in ("customer_id", "snapshot_date"):
        assert by_rows.column(key).equals(by_days.column(key))
    for score in ("p_stay", "p_churn"):  # the model server's batches differ, so its sums may round differently
        assert np.abs(by_rows.column(score).to_numpy() - by_days.column(score).to_numpy()).max() <= 1e-12


class WorkerDied(BaseException):
    """A worker process killed mid-chunk: nothing after it runs, no except clause catches it."""


def test_a_worker_killed_mid_chunk_resumes_at_the_last_committed_chunk(
    small_days: str, proxy: HiveLatencyProxy, registry: dict[str, str], database_url: str
) -> None:
    from app.core.jobs import RetroTest, State
    from worker.pipeline import run_retro_test

    settings, sessions, adapters = _in_process(proxy, chunk_rows=CHUNK_ROWS)
    real = adapters.source
    third = START + timedelta(days=2 * CHUNK_ROWS // ROWS_PER_DAY)
    reads: list[date] = []

    class DiesInTheThirdChunk:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def batches(self, query: Any, *, batch_rows: int) -> Any:
            reads.append(query.start)
            if query.start == third:
                # Rows of it are read and scored (in small batches, so that the writer, a window of batches
                # behind the reader, commits the two chunks before it) ...
                yield from real.batches(query, batch_rows=50)
                raise WorkerDied()  # ... then the process dies before the chunk is committed
            yield from real.batches(query, batch_rows=batch_rows)

    adapters.source = DiesInTheThirdChunk()
    job_id = _new_job("plan-killed")
    with pytest.raises(WorkerDied):
        run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings)
    with sessions() as s, s.begin():
        crashed = s.get(RetroTest, job_id)
        assert crashed is not None and crashed.state == State.scoring and crashed.chunks_done == 2
        crashed.heartbeat_at = None  # the dead attempt's heartbeat goes stale

    # A new worker process: a fresh source, no cached schema or counts.
    settings, sessions, adapters = _in_process(proxy, chunk_rows=CHUNK_ROWS)
    real = adapters.source
    reads.clear()
    proxy.clear()
    adapters.source = DiesInTheThirdChunk()
    third = date.max  # this time nothing dies
    assert run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings).value == "succeeded"
    step = timedelta(days=CHUNK_ROWS // ROWS_PER_DAY)
    assert reads == [START + 2 * step, START + 3 * step, START + 4 * step, START + 5 * step]
    # The plan is on the job: no second GROUP BY, only the schema check and the four chunks left.
    assert _kinds(proxy.statements) == ["SELECT"] * 4 and proxy.calls.count("GetColumns") == 1
    scores = _scores(sessions, adapters, job_id)
    keys = list(zip(scores.column("customer_id").to_pylist(), scores.column("snapshot_date").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == TOTAL


def test_a_server_that_never_answers_a_close_does_not_hold_the_read(small_days: str, proxy: HiveLatencyProxy) -> None:
    """Seen once with the Spark Thrift Server on a loaded machine: CloseSession unanswered for 600 s."""
    from app.integrations.history.hive import HiveSource, settings_from

    settings, _, _ = _in_process(proxy, hive_connect_timeout_s=2.0, hive_query_timeout_s=120.0)
    source = HiveSource(settings_from(settings))
    query = _query(START, START + timedelta(days=9))
    proxy.unanswered = {"CloseOperation", "CloseSession"}
    try:
        started = time.monotonic()
        rows = sum(b.num_rows for b in source.batches(query, batch_rows=1_000))
        assert source.count(query) == rows == 10 * ROWS_PER_DAY
        # Each read closes a cursor and a session, every close waiting at most the connect timeout.
        assert time.monotonic() - started < 4 * 2.0 + 30
    finally:
        proxy.unanswered = set()
    assert proxy.calls.count("CloseSession") >= 2
