"""Scale-out: one job's period split into date ranges that several workers score against one deployment."""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import HISTORY_DAYS, HISTORY_START, ROWS_PER_DAY, Stack, start_stack
from tests.factories import make_retro_test
from tests.test_end_to_end import END, submit
from worker.chunks import plan_days
from worker.pipeline import split_ranges


@given(days=st.integers(1, 60), parts=st.integers(1, 10))
def test_ranges_cover_every_chunk_once_in_order_and_evenly(days: int, parts: int) -> None:
    chunks = plan_days(date(2025, 1, 1), date(2025, 1, 1) + timedelta(days=days - 1), 1)
    ranges = split_ranges(chunks, parts)
    assert [c for r in ranges for c in r] == chunks
    assert len(ranges) == min(parts, days)
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1


def _in_process(send: Any) -> tuple[Any, Any, Any]:
    from app.config import get_settings
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters

    settings = get_settings().model_copy(update={"partitions": 2})
    adapters = Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
        send_partition=send,
    )
    return settings, get_session_factory(), adapters


@pytest.fixture()
def job_id(database_url: str, registry: dict[str, str], history: Path) -> Iterator[uuid.UUID]:
    from app.db import get_session_factory

    with get_session_factory()() as s, s.begin():
        new = make_retro_test(s, start=HISTORY_START, end=END, partner_prefix="partition")
    yield new


def _result_keys(sessions: Any, adapters: Any, job_id: uuid.UUID) -> list[tuple[int, date]]:
    from app.core.jobs import RetroTest, State, job_prefix

    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.state == State.succeeded, (job.state, job.error_message)
        assert job.rows_read == job.rows_scored == job.rows_total == HISTORY_DAYS * ROWS_PER_DAY
        prefix = job_prefix(job)
    with adapters.store.open_read(f"{prefix}/scores.parquet") as fh:
        table = pq.read_table(fh, columns=["customer_id", "snapshot_date"])
    return list(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


def test_a_job_whose_helpers_never_start_is_finished_by_its_own_worker(job_id: uuid.UUID) -> None:
    from worker.pipeline import PartitionOrder, run_retro_test, score_partition

    orders: list[PartitionOrder] = []
    settings, sessions, adapters = _in_process(orders.append)
    assert run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings).value == "succeeded"
    # The helper got the second half of the period and was never run: the coordinator scored it, backwards.
    assert [(o.first, o.last) for o in orders] == [
        ((HISTORY_START + timedelta(days=2)).isoformat(), (HISTORY_START + timedelta(days=3)).isoformat())
    ]
    keys = _result_keys(sessions, adapters, job_id)
    assert len(keys) == len(set(keys)) == HISTORY_DAYS * ROWS_PER_DAY
    # Delivered late, the order finds the job finished and does nothing.
    assert score_partition(order=orders[0], sessions=sessions, adapters=adapters, settings=settings).startswith("stale")


def test_chunks_a_helper_committed_are_used_and_not_scored_again(job_id: uuid.UUID) -> None:
    from worker.pipeline import PartitionOrder, run_retro_test, score_partition

    outcomes: list[str] = []
    reads: list[str] = []

    def run_helper_now(order: PartitionOrder) -> None:  # the helper finishes its range before the coordinator starts
        outcomes.append(score_partition(order=order, sessions=sessions, adapters=adapters, settings=settings))

    settings, sessions, adapters = _in_process(run_helper_now)
    real_batches = adapters.source.batches

    def counting_batches(query: Any, *, batch_rows: int) -> Any:
        reads.append(query.start.isoformat())
        return real_batches(query, batch_rows=batch_rows)

    adapters.source.batches = counting_batches  # type: ignore[method-assign]
    assert run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings).value == "succeeded"
    assert outcomes == [f"this helper scored {2 * ROWS_PER_DAY} rows, its whole range"]
    days = [(HISTORY_START + timedelta(days=i)).isoformat() for i in range(HISTORY_DAYS)]
    assert sorted(reads) == days  # each day read once: the helper's two, then the coordinator's two
    keys = _result_keys(sessions, adapters, job_id)
    assert len(keys) == len(set(keys)) == HISTORY_DAYS * ROWS_PER_DAY


def test_an_attempt_that_finds_every_chunk_committed_publishes_without_deploying(
    job_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    """...and, reading the model the first attempt recorded, without asking the registry either."""
    from app.core.jobs import RetroTest
    from app.core.model_types import ModelVersionInfo

    settings, sessions, adapters = _in_process(None)
    settings = settings.model_copy(update={"partitions": 1})
    die_before_publishing(job_id, sessions, adapters, settings, monkeypatch)
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.state.value == "publishing" and job.chunks_done == HISTORY_DAYS
        assert job.model_info is not None
        recorded = ModelVersionInfo.from_record(job.model_info)
    assert recorded == adapters.registry.resolve(name=recorded.name, version=recorded.version)

    monkeypatch.setattr(adapters.deployer, "start", die)  # nothing is left to score: no model server
    monkeypatch.setattr(adapters.registry, "resolve", die)  # and no registry: the model is on the job
    monkeypatch.setattr(adapters.source, "count", die)  # nor a second count of the period: it is on the job too
    assert run_retro_test_now(job_id, sessions, adapters, settings) == "succeeded"
    keys = _result_keys(sessions, adapters, job_id)
    assert len(keys) == len(set(keys)) == HISTORY_DAYS * ROWS_PER_DAY


def test_a_job_runs_on_the_model_recorded_when_it_was_accepted_even_with_the_registry_down(
    database_url: str, registry: dict[str, str], history: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API records the registry's answer at submission: no attempt asks the registry again."""
    from app.core.jobs import RetroTest
    from app.core.partners import Partner
    from app.core.scope import ALL_PARTNERS
    from app.retro_tests.schemas import RetroTestCreate
    from app.retro_tests.service import RetroTestRequest, submit_request

    settings, sessions, adapters = _in_process(None)
    settings = settings.model_copy(update={"partitions": 1})
    code = f"accepted-{uuid.uuid4().hex[:8]}"
    with sessions() as s, s.begin():
        s.add(Partner(code=code, name=code))
        s.flush()
        data = RetroTestCreate(
            partner_code=code,
            model_name="churn",
            model_alias="champion",
            period_start=HISTORY_START,
            period_end=END,
        )
        request = RetroTestRequest(data=data, actor="test", scope=ALL_PARTNERS)
        job, _, _ = submit_request(session=s, registry=adapters.registry, settings=settings, request=request)
        job_id = job.id
        assert job.model_info == adapters.registry.resolve(name="churn", alias="champion").to_record()

    monkeypatch.setattr(adapters.registry, "resolve", die)
    assert run_retro_test_now(job_id, sessions, adapters, settings) == "succeeded"
    with sessions() as s:
        finished = s.get(RetroTest, job_id)
        assert finished is not None and finished.attempts == 1
    keys = _result_keys(sessions, adapters, job_id)
    assert len(keys) == len(set(keys)) == HISTORY_DAYS * ROWS_PER_DAY


def test_a_source_that_changed_between_attempts_fails_the_job_at_publishing(
    job_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed attempt keeps the first attempt's count; the rows it reads must still add up to it."""
    from app.core.jobs import RetroTest

    settings, sessions, adapters = _in_process(None)
    settings = settings.model_copy(update={"partitions": 1})
    real_count = adapters.source.count
    monkeypatch.setattr(adapters.source, "count", lambda query: real_count(query) + 1)  # a row since deleted
    die_before_publishing(job_id, sessions, adapters, settings, monkeypatch)
    monkeypatch.setattr(adapters.source, "count", real_count)
    assert run_retro_test_now(job_id, sessions, adapters, settings) == "failed"
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.error_code == "reconciliation_failed"
        assert f"read {HISTORY_DAYS * ROWS_PER_DAY} rows but the source counted" in (job.error_message or "")
        assert job.result_location is None  # nothing is offered for download


class Killed(BaseException):
    """The process dies: nothing in the pipeline handles it."""


def die(*_: Any, **__: Any) -> None:
    raise Killed


def die_before_publishing(
    job_id: uuid.UUID, sessions: Any, adapters: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt that commits every chunk and dies before publishing; its heartbeat is then left to go stale."""
    import worker.pipeline
    from app.core.jobs import RetroTest

    with monkeypatch.context() as patch:
        patch.setattr(worker.pipeline, "publish", die)
        with pytest.raises(Killed):
            run_retro_test_now(job_id, sessions, adapters, settings)
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.heartbeat_at = None


def run_retro_test_now(job_id: uuid.UUID, sessions: Any, adapters: Any, settings: Any) -> str:
    from worker.pipeline import run_retro_test

    return run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings).value


def test_a_worker_killed_after_publishing_leaves_a_succeeded_job_with_its_files(
    job_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed once the files and the verdict are recorded, before the parts are removed: nothing is lost."""
    import hashlib

    from app.core.jobs import ResultFile, RetroTest, State, job_prefix

    settings, sessions, adapters = _in_process(None)
    settings = settings.model_copy(update={"partitions": 1})
    with monkeypatch.context() as patch:
        patch.setattr(adapters.store, "remove_tree", die)
        with pytest.raises(Killed):
            run_retro_test_now(job_id, sessions, adapters, settings)
    keys = _result_keys(sessions, adapters, job_id)  # succeeded, every row once
    assert len(keys) == len(set(keys)) == HISTORY_DAYS * ROWS_PER_DAY
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.state == State.succeeded and job.lease_token is None
        files = {f.name: f.sha256 for f in s.query(ResultFile).filter_by(retro_test_id=job_id)}
        prefix = job_prefix(job)
    assert set(files) == {"scores.parquet", "manifest.json", "manifest.internal.json", "report.html", "report.json"}
    for name, sha256 in files.items():
        with adapters.store.open_read(f"{prefix}/{name}") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == sha256
    # A redelivery of the message finds the job finished and does nothing.
    assert run_retro_test_now(job_id, sessions, adapters, settings) == "succeeded"


def test_a_worker_killed_while_recording_the_files_publishes_again_from_the_parts(
    job_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the result files are written but before they are recorded: the next attempt publishes again."""
    from app.core.jobs import RetroTest, State
    from app.retro_tests import runs

    settings, sessions, adapters = _in_process(None)
    settings = settings.model_copy(update={"partitions": 1})
    with monkeypatch.context() as patch:
        patch.setattr(runs, "record_results", die)  # JobRun.succeed records the files through it
        with pytest.raises(Killed):
            run_retro_test_now(job_id, sessions, adapters, settings)
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None and job.state == State.publishing and job.result_location is None
        job.heartbeat_at = None  # the killed attempt's heartbeat goes stale
    monkeypatch.setattr(adapters.deployer, "start", die)  # every chunk is committed: nothing to deploy
    assert run_retro_test_now(job_id, sessions, adapters, settings) == "succeeded"
    keys = _result_keys(sessions, adapters, job_id)
    assert len(keys) == len(set(keys)) == HISTORY_DAYS * ROWS_PER_DAY


def test_the_first_commit_of_a_chunk_wins_and_a_second_copy_is_dropped(job_id: uuid.UUID) -> None:
    from app.core.jobs import RetroTest, RetroTestChunk
    from app.db import get_session_factory
    from app.retro_tests import runs
    from app.retro_tests.runs import ChunkRecord, Counts

    sessions = get_session_factory()
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.lease_token = "lease-of-the-test"

    def copy(tag: str) -> ChunkRecord:  # a finished chunk's files, as a stream leaves them
        return ChunkRecord(
            key=HISTORY_START.isoformat(),
            counts=Counts(read=10, scored=10, rejected=0),
            part_path=f"p/{tag}.parquet",
            rejects_path=None,
        )

    for tag, wins in (("first", True), ("second", False)):
        with sessions() as s, s.begin():
            recorded = runs.record_chunk(session=s, job_id=job_id, lease="lease-of-the-test", chunk=copy(tag))
        assert (recorded is not None) is wins
    with sessions() as s:
        rows = s.query(RetroTestChunk).filter_by(retro_test_id=job_id).all()
        assert [(r.part_path, r.rows_scored) for r in rows] == [("p/first.parquet", 10)]
        job = s.get(RetroTest, job_id)
        assert job is not None and job.rows_scored == 10 and job.chunks_done == 1


@pytest.fixture(scope="module")
def two_workers(database_url: str, registry: dict[str, str], history: Path) -> Iterator[Stack]:
    """The API and two Celery workers on a queue of their own, each job split in two."""
    s = start_stack(
        "partitions", workers=2, RETRO_PARTITIONS="2", RETRO_QUEUE_NAME=f"partitions-{uuid.uuid4().hex[:8]}"
    )
    yield s
    s.stop()


def test_two_workers_share_a_job_and_every_row_is_scored_once(two_workers: Stack, big_history: str) -> None:
    job = submit(two_workers, "partitions-two", source={"table": big_history})
    done = two_workers.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=300)
    assert done["state"] == "succeeded", done
    total = HISTORY_DAYS * 150_000
    assert done["progress"]["rows_scored"] == done["progress"]["rows_total"] == total
    files = {f["name"]: f for f in done["files"]}
    with two_workers.client() as c:
        blob = c.get(files["scores.parquet"]["download_url"]).content
    scores = pq.read_table(io.BytesIO(blob), columns=["customer_id", "snapshot_date"]).to_pandas()
    assert len(scores) == total and not scores.duplicated().any()

    def helper_outcome() -> list[int]:  # logged when the helper's task ends, which may be after the job's
        logs = "".join(p.read_text(errors="replace") for p in two_workers.logs.glob("worker*.log"))
        return [int(n) for n in re.findall(r"this helper scored (\d+) rows", logs)]

    deadline = time.monotonic() + 60
    while not helper_outcome() and time.monotonic() < deadline:
        time.sleep(0.5)
    helped = helper_outcome()
    assert helped and helped[0] > 0, f"the helper worker scored nothing:\n{two_workers.tail()}"
