"""The life of one retro test, stage by stage, as plain functions over the adapters.

resolving  -> the exact model version and its signature, from the registry
extracting -> the source schema is checked and the period's rows counted, before anything is deployed
deploying  -> a temporary model server for exactly that version; stopped on every path
scoring    -> the period, chunk by chunk (chunk_days), streamed in batches to the model server; a chunk's
              part file and its row in retro_test_chunks are the checkpoint, so a redelivered job skips
              finished chunks and never writes a row twice
publishing -> parts merged into the result files, a manifest, row counts reconciled
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.errors import (
    AppError,
    DeadlineExceeded,
    DeploymentFailed,
    JobCancelled,
    ModelServerDown,
    ReconciliationFailed,
    SourceUnknown,
    TooManyAttempts,
    TooManyRejectedRows,
)
from app.integrations.deployers import Deployer, deployment_name
from app.integrations.history import HistoryQuery, HistorySource
from app.integrations.registry import MlflowRegistry, ModelVersionInfo
from app.integrations.results import ResultStore
from app.integrations.scoring import SCORERS, ScoredBatch, V2Scorer
from app.metrics import DEPLOYMENTS_ALIVE
from app.retro_tests.models import ResultFile, RetroTest, RetroTestChunk, State
from app.retro_tests.service import advance, job_prefix, utcnow

log = logging.getLogger(__name__)


@dataclass
class Adapters:
    """The outside systems one job talks to."""

    registry: MlflowRegistry
    source: HistorySource
    deployer: Deployer
    store: ResultStore


@dataclass(frozen=True)
class Chunk:
    key: str
    start: date
    end: date


class LeaseLost(Exception):
    """Another attempt owns the job now (this one was presumed dead); this attempt stops without a verdict."""


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time stored here is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class JobControl:
    """The running attempt's link to its job row: heartbeat, lease, cancel, deadline and progress.

    A background thread renews the heartbeat every heartbeat_interval_s while the attempt holds the lease,
    so a job in a long call (a model server starting, a COUNT over a quarter) is not taken for dead.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        job_id: uuid.UUID,
        lease: str,
        deadline: datetime,
        heartbeat_s: float,
        interval_s: float = 1.0,
    ) -> None:
        self._sessions = sessions
        self._job_id = job_id
        self.lease = lease
        self._deadline = deadline
        self._heartbeat_s = heartbeat_s
        self._interval_s = interval_s
        self._last = 0.0
        self._cancelled = False
        self._lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> JobControl:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._write({})
            except Exception:
                log.warning("heartbeat of retro test %s failed; will try again", self._job_id, exc_info=True)

    def cancel_requested(self) -> bool:
        self._sync({}, force=False)
        return self._cancelled or self._lost

    def check(self) -> None:
        """Raise if the attempt must stop: lease lost, cancel asked, deadline passed."""
        self._sync({}, force=False)
        self._raise_if_stopped()

    def progress(self, *, force: bool = False, **counters: int) -> None:
        self._sync(counters, force=force)
        self._raise_if_stopped()

    def _raise_if_stopped(self) -> None:
        if self._lost:
            raise LeaseLost(f"retro test {self._job_id} was taken over by another attempt")
        if self._cancelled:
            raise JobCancelled("cancelled on request")
        if utcnow() > self._deadline:
            raise DeadlineExceeded(
                f"the job passed its deadline of {self._deadline:%Y-%m-%d %H:%M} UTC (RETRO_JOB_DEADLINE_S)"
            )

    def _sync(self, counters: dict[str, int], *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval_s:
            return
        self._last = now
        self._write(counters)

    def _write(self, counters: dict[str, int]) -> None:
        with self._sessions() as s, s.begin():
            job = s.get(RetroTest, self._job_id)
            if job is None or job.lease_token != self.lease:
                self._lost = True
                return
            for key, value in counters.items():
                setattr(job, key, value)
            job.heartbeat_at = utcnow()
            self._cancelled = job.cancel_requested


def claim(
    *, sessions: sessionmaker[Session], job_id: uuid.UUID, settings: Settings
) -> tuple[str | None, RetroTest | None]:
    """Take the job's lease for this attempt, unless it is finished or another live attempt holds it."""
    lease = uuid.uuid4().hex
    now = utcnow()
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id, with_for_update=True)
        if job is None or job.is_terminal:
            return None, job
        held = job.lease_token is not None and job.heartbeat_at is not None
        if held and aware(job.heartbeat_at) > now - timedelta(seconds=settings.stale_after_s):  # type: ignore[arg-type]
            return None, job
        job.lease_token = lease
        job.heartbeat_at = now
        job.attempts += 1
        s.flush()
        s.expunge(job)
        return lease, job


def plan_chunks(start: date, end: date, days: int) -> list[Chunk]:
    """Consecutive, non-overlapping slices of [start, end] of at most `days` days each."""
    chunks = []
    day = start
    while day <= end:
        last = min(end, day + timedelta(days=days - 1))
        chunks.append(Chunk(key=day.isoformat(), start=day, end=last))
        day = last + timedelta(days=1)
    return chunks


def run_retro_test(
    *, job_id: uuid.UUID, sessions: sessionmaker[Session], adapters: Adapters, settings: Settings
) -> State:
    """Run a job to a terminal state; safe to call again for a redelivered or re-enqueued job."""
    lease, job = claim(sessions=sessions, job_id=job_id, settings=settings)
    if job is None:
        log.warning("retro test %s does not exist; nothing to do", job_id)
        return State.failed
    if lease is None:
        log.info("retro test %s is %s or held by a live attempt; this delivery does nothing", job_id, job.state.value)
        return job.state
    if job.cancel_requested:
        return _finish(
            sessions,
            job_id,
            lease,
            State.cancelled,
            error_code="cancelled",
            error_message="cancelled before it started",
        )
    if job.attempts > settings.max_attempts:
        return _finish(
            sessions,
            job_id,
            lease,
            State.failed,
            error_code=TooManyAttempts.code,
            error_message=f"gave up after {job.attempts - 1} attempts: each was interrupted before the job finished "
            "(worker lost, killed or timed out); see the worker logs",
        )
    deadline = aware(job.created_at) + timedelta(seconds=settings.job_deadline_s)
    try:
        with JobControl(
            sessions=sessions, job_id=job_id, lease=lease, deadline=deadline, heartbeat_s=settings.heartbeat_interval_s
        ) as control:
            _run_stages(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings, control=control)
        return _finish(sessions, job_id, lease, State.succeeded)
    except LeaseLost:
        log.warning("retro test %s: another attempt took over; this one stops", job_id)
        return State.failed
    except JobCancelled as exc:
        return _finish(sessions, job_id, lease, State.cancelled, error_code=exc.code, error_message=exc.detail)
    except AppError as exc:
        log.warning("retro test %s failed: %s", job_id, exc.detail)
        return _finish(sessions, job_id, lease, State.failed, error_code=exc.code, error_message=exc.detail)
    except Exception as exc:
        log.exception("retro test %s failed unexpectedly", job_id)
        return _finish(
            sessions,
            job_id,
            lease,
            State.failed,
            error_code="internal_error",
            error_message=f"{type(exc).__name__}: {exc}",
        )


def _run_stages(
    *, job_id: uuid.UUID, sessions: sessionmaker[Session], adapters: Adapters, settings: Settings, control: JobControl
) -> None:
    model = _stage(sessions, job_id, State.resolving, lambda job: resolve(job=job, registry=adapters.registry))
    query, total = _stage(
        sessions, job_id, State.extracting, lambda job: extract(job=job, model=model, source=adapters.source)
    )
    control.check()
    chunks = plan_chunks(query.start, query.end, settings.chunk_days)
    _set_counters(sessions, job_id, rows_total=total, chunks_total=len(chunks))
    redeploys = 0
    while True:
        try:
            with deployed(
                sessions=sessions,
                job_id=job_id,
                model=model,
                deployer=adapters.deployer,
                settings=settings,
                control=control,
            ) as scorer:
                _stage(sessions, job_id, State.scoring, lambda job: None)
                score_chunks(
                    job_id=job_id,
                    query=query,
                    chunks=chunks,
                    scorer=scorer,
                    adapters=adapters,
                    settings=settings,
                    sessions=sessions,
                    control=control,
                )
            break
        except ModelServerDown as exc:
            if redeploys >= settings.max_redeploys:
                raise ModelServerDown(
                    f"{exc.detail}; the model server was re-created {redeploys} time(s) without help"
                ) from exc
            redeploys += 1
            log.warning(
                "retro test %s: model server down (%s); re-creating it (%d of %d)",
                job_id,
                exc.detail,
                redeploys,
                settings.max_redeploys,
            )
    _stage(sessions, job_id, State.publishing, lambda job: None)
    publish(job_id=job_id, model=model, query=query, adapters=adapters, sessions=sessions, control=control)


def _stage(sessions: sessionmaker[Session], job_id: uuid.UUID, state: State, work: Callable[[RetroTest], Any]) -> Any:
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None
        if job.cancel_requested:
            raise JobCancelled("cancelled on request")
        advance(job, state)
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None
        return work(job)


def _set_counters(sessions: sessionmaker[Session], job_id: uuid.UUID, **values: Any) -> None:
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None
        for key, value in values.items():
            setattr(job, key, value)


def _finish(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    lease: str,
    state: State,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
) -> State:
    """Record the verdict, if this attempt still holds the lease; release the lease."""
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id, with_for_update=True)
        assert job is not None
        if job.is_terminal or job.lease_token != lease:
            return job.state
        advance(job, state, error_code=error_code, error_message=error_message)
        job.lease_token = None
        return state


def resolve(*, job: RetroTest, registry: MlflowRegistry) -> ModelVersionInfo:
    """The exact version the job was created for; never an alias that may have moved since."""
    return registry.resolve(name=job.model_name, version=job.model_version)


def extract(*, job: RetroTest, model: ModelVersionInfo, source: HistorySource) -> tuple[HistoryQuery, int | None]:
    """Check the source schema and count the period's rows, before any model is deployed."""
    query = HistoryQuery(
        table=job.source_table,
        date_column=job.date_column,
        id_columns=tuple(job.id_columns),
        features=model.inputs,
        start=job.period_start,
        end=job.period_end,
    )
    source.check_schema(query)
    total = source.count(query)
    if total == 0:
        raise SourceUnknown(
            f"history table {job.source_table!r} has no rows between {job.period_start} and {job.period_end}",
            field="period_start",
        )
    return query, total


@contextlib.contextmanager
def deployed(
    *,
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    model: ModelVersionInfo,
    deployer: Deployer,
    settings: Settings,
    control: JobControl,
) -> Iterator[V2Scorer]:
    """A ready model server for the job's model version, torn down when the block exits, however it exits.

    The scorer speaks the deployment's protocol: V2 (Open Inference Protocol) or Seldon's.
    """
    name = deployment_name(job_id)
    _stage(sessions, job_id, State.deploying, lambda job: None)
    # Record the name before creating anything, so a reaper can find it if this process dies.
    _set_counters(sessions, job_id, deployment_name=name)
    alive = DEPLOYMENTS_ALIVE.labels(settings.deployer)
    alive.inc()
    try:
        deployment = deployer.start(name=name, job_id=str(job_id), model=model)
        deployer.wait_ready(deployment, timeout_s=settings.deploy_ready_timeout_s, should_stop=control.cancel_requested)
        scorer_class = SCORERS.get(deployment.protocol)
        if scorer_class is None:
            raise DeploymentFailed(f"no client for the inference protocol {deployment.protocol!r}")
        with scorer_class(
            deployment=deployment,
            features=model.inputs,
            output_names=model.outputs,
            timeout_s=settings.score_timeout_s,
            retries=settings.score_retries,
            backoff_s=settings.score_backoff_s,
            max_connections=settings.score_concurrency,
        ) as scorer:
            yield scorer
    finally:
        alive.dec()
        try:
            deployer.stop(name)
        except Exception:
            # The job's outcome stands; the reaper deletes the deployment once the job is terminal.
            log.exception("could not stop deployment %s of retro test %s; the reaper will", name, job_id)


@dataclass
class ChunkCounts:
    read: int = 0
    scored: int = 0
    rejected: int = 0


def score_chunks(
    *,
    job_id: uuid.UUID,
    query: HistoryQuery,
    chunks: list[Chunk],
    scorer: V2Scorer,
    adapters: Adapters,
    settings: Settings,
    sessions: sessionmaker[Session],
    control: JobControl,
) -> None:
    """Score every chunk not yet finished, as one stream; each chunk is committed with its part files.

    Reading (a background thread), scoring (`score_concurrency` requests in flight) and writing (this thread,
    in source order) overlap, and the stream does not drain at chunk boundaries.
    """
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None
        prefix = job_prefix(job)
        done = set(s.scalars(select(RetroTestChunk.chunk_key).where(RetroTestChunk.retro_test_id == job_id)))
    pending = [c for c in chunks if c.key not in done]
    base = _committed_totals(sessions, job_id)
    window: deque[tuple[Chunk, Future[ScoredBatch] | _ChunkEnd]] = deque()
    current: _ChunkOutput | None = None

    def handle(chunk: Chunk, item: Future[ScoredBatch] | _ChunkEnd) -> None:
        nonlocal current, base
        if current is None:
            current = _ChunkOutput(adapters.store, prefix, chunk, query)
        if isinstance(item, _ChunkEnd):
            counts = current.close(read=item.read)
            current = None
            _commit_chunk(
                sessions, job_id, chunk=chunk, counts=counts, prefix=prefix, settings=settings, lease=control.lease
            )
            base = ChunkCounts(base.read + counts.read, base.scored + counts.scored, base.rejected + counts.rejected)
            return
        current.write(item.result())
        c = current.counts
        control.progress(
            rows_read=base.read + c.read, rows_scored=base.scored + c.scored, rows_rejected=base.rejected + c.rejected
        )

    def in_flight() -> int:
        return sum(1 for _, item in window if not isinstance(item, _ChunkEnd))

    with (
        ThreadPoolExecutor(max_workers=settings.score_concurrency, thread_name_prefix="score") as pool,
        _read_ahead(adapters.source, query, pending, settings, depth=2 * settings.score_concurrency) as items,
    ):
        try:
            for chunk, item in items:
                if not isinstance(item, _ChunkEnd):  # the scoring thread logs with this job's id
                    item = pool.submit(contextvars.copy_context().run, scorer.score, item)
                window.append((chunk, item))
                while in_flight() >= settings.score_concurrency:
                    handle(*window.popleft())
            while window:
                handle(*window.popleft())
        finally:
            for _, item in window:
                if isinstance(item, Future):
                    item.cancel()
            if current is not None:
                current.abort()


@dataclass(frozen=True)
class _ChunkEnd:
    """Marks the end of a chunk in the stream, with how many rows the source gave for it."""

    read: int


@contextlib.contextmanager
def _read_ahead(
    source: HistorySource, query: HistoryQuery, chunks: list[Chunk], settings: Settings, *, depth: int
) -> Iterator[Iterator[tuple[Chunk, pa.RecordBatch | _ChunkEnd]]]:
    """Slices of score_batch_rows rows, chunk after chunk, read on a background thread at most `depth` ahead."""
    items: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for chunk in chunks:
                read = 0
                for batch in source.batches(query.between(chunk.start, chunk.end), batch_rows=settings.read_batch_rows):
                    read += batch.num_rows
                    for offset in range(0, batch.num_rows, settings.score_batch_rows):
                        put((chunk, batch.slice(offset, settings.score_batch_rows)))
                    if stop.is_set():
                        return
                put((chunk, _ChunkEnd(read)))
        except BaseException as exc:  # raised again in the consuming thread
            put(exc)
        finally:
            put(finished)

    def consume() -> Iterator[tuple[Chunk, pa.RecordBatch | _ChunkEnd]]:
        while True:
            item = items.get()
            if item is finished:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    reader = threading.Thread(target=produce, name="history-reader", daemon=True)
    reader.start()
    try:
        yield consume()
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                items.get_nowait()
        reader.join(timeout=60)


class _ChunkOutput:
    """The part files of the chunk being written, and its running counts."""

    def __init__(self, store: ResultStore, prefix: str, chunk: Chunk, query: HistoryQuery) -> None:
        self._query = query
        self._parts = _PartWriter(store, f"{prefix}/parts/{chunk.key}.parquet")
        self._rejects = _PartWriter(store, f"{prefix}/parts/{chunk.key}.rejects.parquet")
        self.counts = ChunkCounts()

    def write(self, result: ScoredBatch) -> None:
        if result.scored_rows.num_rows:
            self._parts.write(_output_table(result.scored_rows, self._query, result.scores))
        if result.rejected_rows.num_rows:
            reasons = pa.table({"reason": pa.array(result.reject_reasons, pa.string())})
            self._rejects.write(_output_table(result.rejected_rows, self._query, reasons))
        self.counts.scored += result.scored_rows.num_rows
        self.counts.rejected += result.rejected_rows.num_rows

    def close(self, *, read: int) -> ChunkCounts:
        """Finish both files; every row the source gave must be scored or rejected."""
        self._parts.__exit__(None, None, None)
        self._rejects.__exit__(None, None, None)
        self.counts.read = read
        if self.counts.scored + self.counts.rejected != read:
            raise ReconciliationFailed(
                f"the source gave {read} rows for a chunk but {self.counts.scored + self.counts.rejected} were accounted for"
            )
        return self.counts

    def abort(self) -> None:
        """Drop unfinished files; the chunk is read and scored again on the next attempt."""
        error = RuntimeError("chunk aborted")
        self._parts.__exit__(RuntimeError, error, None)
        self._rejects.__exit__(RuntimeError, error, None)


def _committed_totals(sessions: sessionmaker[Session], job_id: uuid.UUID) -> ChunkCounts:
    with sessions() as s:
        row = s.execute(
            select(
                func.coalesce(func.sum(RetroTestChunk.rows_read), 0),
                func.coalesce(func.sum(RetroTestChunk.rows_scored), 0),
                func.coalesce(func.sum(RetroTestChunk.rows_rejected), 0),
            ).where(RetroTestChunk.retro_test_id == job_id)
        ).one()
    return ChunkCounts(read=int(row[0]), scored=int(row[1]), rejected=int(row[2]))


def _commit_chunk(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    *,
    chunk: Chunk,
    counts: ChunkCounts,
    prefix: str,
    settings: Settings,
    lease: str,
) -> None:
    """Record a finished chunk and the job's totals in one transaction: the checkpoint."""
    with sessions() as s, s.begin():
        owner = s.scalar(select(RetroTest.lease_token).where(RetroTest.id == job_id).with_for_update())
        if owner != lease:
            raise LeaseLost(f"retro test {job_id} was taken over by another attempt; chunk {chunk.key} not recorded")
        s.add(
            RetroTestChunk(
                retro_test_id=job_id,
                chunk_key=chunk.key,
                rows_read=counts.read,
                rows_scored=counts.scored,
                rows_rejected=counts.rejected,
                part_path=f"{prefix}/parts/{chunk.key}.parquet" if counts.scored else None,
                rejects_path=f"{prefix}/parts/{chunk.key}.rejects.parquet" if counts.rejected else None,
            )
        )
        s.flush()
        totals = s.execute(
            select(
                func.sum(RetroTestChunk.rows_read),
                func.sum(RetroTestChunk.rows_scored),
                func.sum(RetroTestChunk.rows_rejected),
                func.count(),
            ).where(RetroTestChunk.retro_test_id == job_id)
        ).one()
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.rows_read, job.rows_scored, job.rows_rejected, job.chunks_done = (int(v or 0) for v in totals)
        job.heartbeat_at = utcnow()
        rejected, read_total = job.rows_rejected, job.rows_total or job.rows_read
    if rejected > max(settings.max_rejected_rows, int(settings.max_rejected_ratio * read_total)):
        raise TooManyRejectedRows(
            f"{rejected} row(s) could not be scored (for example a null in a model input), more than the "
            f"allowed (RETRO_MAX_REJECTED_ROWS={settings.max_rejected_rows}, RETRO_MAX_REJECTED_RATIO={settings.max_rejected_ratio}); "
            "fix those rows at the source, or raise the budget if scoring the rest is what the partner needs"
        )


class _PartWriter:
    """A Parquet part written through the result store, opened on the first batch."""

    def __init__(self, store: ResultStore, rel: str) -> None:
        self._stack = contextlib.ExitStack()
        self._store = store
        self._rel = rel
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            fh = self._stack.enter_context(self._store.open_write(self._rel))
            self._writer = self._stack.enter_context(pq.ParquetWriter(fh, table.schema))
        self._writer.write_table(table)

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._stack.__exit__(*exc)


def _output_table(batch: pa.RecordBatch, query: HistoryQuery, extra: pa.Table) -> pa.Table:
    keys = [*query.id_columns, query.date_column]
    columns = {k: batch.column(k) for k in dict.fromkeys(keys)}
    for name in extra.column_names:
        columns[name] = extra.column(name)
    return pa.table(columns)


def publish(
    *,
    job_id: uuid.UUID,
    model: ModelVersionInfo,
    query: HistoryQuery,
    adapters: Adapters,
    sessions: sessionmaker[Session],
    control: JobControl,
) -> None:
    """Merge the parts into the result files, write the manifest, reconcile, and record the files."""
    store = adapters.store
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None
        prefix = job_prefix(job)
        chunks = list(
            s.scalars(
                select(RetroTestChunk).where(RetroTestChunk.retro_test_id == job_id).order_by(RetroTestChunk.chunk_key)
            )
        )
        formats = list(job.output_formats)
        rows_total, rows_read, rows_scored, rows_rejected = (
            job.rows_total,
            job.rows_read,
            job.rows_scored,
            job.rows_rejected,
        )
        manifest_job = {
            "id": str(job.id),
            "partner_id": str(job.partner_id),
            "requested_by": job.requested_by,
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "stage_started": dict(job.stage_started or {}),
        }
    if rows_total is not None and rows_read != rows_total:
        raise ReconciliationFailed(
            f"read {rows_read} rows but the source counted {rows_total} for the period; the source changed while "
            "the job ran, or rows were lost"
        )
    files: list[dict[str, Any]] = []
    scored_parts = [c.part_path for c in chunks if c.part_path]
    reject_parts = [c.rejects_path for c in chunks if c.rejects_path]
    control.check()
    written = _merge(store, scored_parts, {fmt: f"{prefix}/scores.{fmt}" for fmt in formats})
    for fmt, rows in written.items():
        if rows != rows_scored:
            raise ReconciliationFailed(f"wrote {rows} rows to scores.{fmt} but scored {rows_scored}")
        files.append({"name": f"scores.{fmt}", "kind": "scores", "format": fmt, "rows": rows})
    if reject_parts:
        rej = _merge(store, reject_parts, {"csv.gz": f"{prefix}/rejects.csv.gz"})
        files.append({"name": "rejects.csv.gz", "kind": "rejects", "format": "csv.gz", "rows": rej["csv.gz"]})
    if rows_scored + rows_rejected != rows_read:
        raise ReconciliationFailed(f"read {rows_read} rows but scored {rows_scored} and rejected {rows_rejected}")
    for f in files:
        rel = f"{prefix}/{f['name']}"
        f["bytes"] = store.size(rel)
        f["sha256"] = store.sha256(rel)
    manifest = {
        "retro_test": manifest_job,
        "model": {
            "name": model.name,
            "version": model.version,
            "run_id": model.run_id,
            "source": model.source,
            "artifact_uri": model.artifact_uri,
            "inputs": [{"name": f.name, "type": f.type} for f in model.inputs],
        },
        "source": {
            "table": query.table,
            "date_column": query.date_column,
            "id_columns": list(query.id_columns),
            "query": adapters.source.describe(query),
            "parameters": {"start": query.start.isoformat(), "end": query.end.isoformat()},
        },
        "period": {"start": query.start.isoformat(), "end": query.end.isoformat()},
        "rows": {"total": rows_total, "read": rows_read, "scored": rows_scored, "rejected": rows_rejected},
        "files": files,
        "published_at": utcnow().isoformat(),
    }
    with store.open_write(f"{prefix}/manifest.json") as fh:
        fh.write(json.dumps(manifest, indent=2).encode())
    mrel = f"{prefix}/manifest.json"
    files.append(
        {
            "name": "manifest.json",
            "kind": "manifest",
            "format": "json",
            "rows": None,
            "bytes": store.size(mrel),
            "sha256": store.sha256(mrel),
        }
    )
    with sessions() as s, s.begin():
        s.execute(delete(ResultFile).where(ResultFile.retro_test_id == job_id))
        for f in files:
            s.add(ResultFile(retro_test_id=job_id, **f))
        job = s.get(RetroTest, job_id)
        assert job is not None
        job.result_location = store.location(prefix)
    store.remove_tree(f"{prefix}/parts")


def _merge(store: ResultStore, parts: list[str], targets: dict[str, str]) -> dict[str, int]:
    """Stream Parquet parts, in order, into one file per format; returns rows written per format."""
    rows = dict.fromkeys(targets, 0)
    if not parts:
        return rows
    schema = pq.read_schema(store.open_read(parts[0]))
    with contextlib.ExitStack() as stack:
        writers: dict[str, Any] = {}
        for fmt, rel in targets.items():
            fh: IO[bytes] = stack.enter_context(store.open_write(rel))
            if fmt == "parquet":
                writers[fmt] = stack.enter_context(pq.ParquetWriter(fh, schema, compression="zstd"))
            else:
                gz = stack.enter_context(gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=6))
                writers[fmt] = stack.enter_context(pacsv.CSVWriter(gz, schema))
        for rel in parts:
            with store.open_read(rel) as fh:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=65_536):
                    for fmt, writer in writers.items():
                        writer.write_batch(batch)
                        rows[fmt] += batch.num_rows
    return rows
