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
import gzip
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from functools import partial
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.errors import AppError, JobCancelled, ReconciliationFailed, ScoringFailed, SourceUnknown
from app.integrations.deployers import Deployer, deployment_name
from app.integrations.history import HistoryQuery, HistorySource
from app.integrations.registry import MlflowRegistry, ModelVersionInfo
from app.integrations.results import ResultStore
from app.integrations.scoring import ScoredBatch, V2Scorer
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


class JobControl:
    """Progress, heartbeat and cancel checks for one running job, written at most once per interval."""

    def __init__(self, *, sessions: sessionmaker[Session], job_id: uuid.UUID, interval_s: float = 1.0) -> None:
        self._sessions = sessions
        self._job_id = job_id
        self._interval_s = interval_s
        self._last = 0.0
        self._cancelled = False

    def cancel_requested(self) -> bool:
        self._sync({}, force=False)
        return self._cancelled

    def check(self) -> None:
        """Raise JobCancelled once someone has asked to cancel the job."""
        if self.cancel_requested():
            raise JobCancelled("cancelled on request")

    def progress(self, *, force: bool = False, **counters: int) -> None:
        self._sync(counters, force=force)
        if self._cancelled:
            raise JobCancelled("cancelled on request")

    def _sync(self, counters: dict[str, int], *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._interval_s:
            return
        self._last = now
        with self._sessions() as s, s.begin():
            job = s.get(RetroTest, self._job_id, with_for_update=False)
            if job is None:
                raise JobCancelled("the job was deleted")
            for key, value in counters.items():
                setattr(job, key, value)
            job.heartbeat_at = utcnow()
            self._cancelled = job.cancel_requested


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
    """Run a job to a terminal state; safe to call again for a redelivered job."""
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        if job is None:
            log.warning("retro test %s does not exist; nothing to do", job_id)
            return State.failed
        if job.is_terminal:
            return job.state
        if job.cancel_requested:
            advance(job, State.cancelled, error_code="cancelled", error_message="cancelled before it started")
            return State.cancelled
        job.attempts += 1
    control = JobControl(sessions=sessions, job_id=job_id)
    try:
        model = _stage(sessions, job_id, State.resolving, lambda job: resolve(job=job, registry=adapters.registry))
        query, total = _stage(
            sessions, job_id, State.extracting, lambda job: extract(job=job, model=model, source=adapters.source)
        )
        chunks = plan_chunks(query.start, query.end, settings.chunk_days)
        _set_counters(sessions, job_id, rows_total=total, chunks_total=len(chunks))
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
        _stage(sessions, job_id, State.publishing, lambda job: None)
        publish(job_id=job_id, model=model, query=query, adapters=adapters, sessions=sessions, control=control)
        return _finish(sessions, job_id, State.succeeded)
    except JobCancelled as exc:
        return _finish(sessions, job_id, State.cancelled, error_code=exc.code, error_message=exc.detail)
    except AppError as exc:
        log.warning("retro test %s failed: %s", job_id, exc.detail)
        return _finish(sessions, job_id, State.failed, error_code=exc.code, error_message=exc.detail)
    except Exception as exc:
        log.exception("retro test %s failed unexpectedly", job_id)
        return _finish(
            sessions, job_id, State.failed, error_code="internal_error", error_message=f"{type(exc).__name__}: {exc}"
        )


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
    state: State,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
) -> State:
    with sessions() as s, s.begin():
        job = s.get(RetroTest, job_id)
        assert job is not None
        if job.is_terminal:
            return job.state
        advance(job, state, error_code=error_code, error_message=error_message)
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
    """A ready model server for the job's model version, torn down when the block exits, however it exits."""
    name = deployment_name(job_id)
    _stage(sessions, job_id, State.deploying, lambda job: None)
    # Record the name before creating anything, so a reaper can find it if this process dies.
    _set_counters(sessions, job_id, deployment_name=name)
    try:
        deployment = deployer.start(name=name, model=model)
        deployer.wait_ready(deployment, timeout_s=settings.deploy_ready_timeout_s, should_stop=control.cancel_requested)
        with V2Scorer(
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
        deployer.stop(name)


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
    """Score every chunk not yet finished; each finished chunk is committed with its part files."""
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None
        prefix = job_prefix(job)
        done = set(s.scalars(select(RetroTestChunk.chunk_key).where(RetroTestChunk.retro_test_id == job_id)))
    with ThreadPoolExecutor(max_workers=settings.score_concurrency, thread_name_prefix="score") as pool:
        for chunk in chunks:
            if chunk.key in done:
                continue
            base = _committed_totals(sessions, job_id)
            counts = score_chunk(
                query=query.between(chunk.start, chunk.end),
                part_rel=f"{prefix}/parts/{chunk.key}.parquet",
                rejects_rel=f"{prefix}/parts/{chunk.key}.rejects.parquet",
                scorer=scorer,
                pool=pool,
                adapters=adapters,
                settings=settings,
                on_progress=partial(_report, control=control, base=base),
            )
            _commit_chunk(sessions, job_id, chunk=chunk, counts=counts, prefix=prefix, settings=settings)


def _report(counts: ChunkCounts, *, control: JobControl, base: ChunkCounts) -> None:
    control.progress(
        rows_read=base.read + counts.read,
        rows_scored=base.scored + counts.scored,
        rows_rejected=base.rejected + counts.rejected,
    )


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
) -> None:
    """Record a finished chunk and the job's totals in one transaction: the checkpoint."""
    with sessions() as s, s.begin():
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
        rejected = job.rows_rejected
    if rejected > settings.max_rejected_rows:
        raise ScoringFailed(
            f"{rejected} row(s) could not be scored (for example a null in a model input), more than the "
            f"allowed {settings.max_rejected_rows} (RETRO_MAX_REJECTED_ROWS)"
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


def score_chunk(
    *,
    query: HistoryQuery,
    part_rel: str,
    rejects_rel: str,
    scorer: V2Scorer,
    pool: ThreadPoolExecutor,
    adapters: Adapters,
    settings: Settings,
    on_progress: Callable[[ChunkCounts], None],
) -> ChunkCounts:
    """Stream one chunk through the model: read, score with bounded concurrency, write in source order."""
    counts = ChunkCounts()
    window: deque[Future[ScoredBatch]] = deque()
    with _PartWriter(adapters.store, part_rel) as parts, _PartWriter(adapters.store, rejects_rel) as rejects:

        def drain_one() -> None:
            result = window.popleft().result()
            if result.scored_rows.num_rows:
                parts.write(_output_table(result.scored_rows, query, result.scores))
            if result.rejected_rows.num_rows:
                reasons = pa.table({"reason": pa.array(result.reject_reasons, pa.string())})
                rejects.write(_output_table(result.rejected_rows, query, reasons))
            counts.scored += result.scored_rows.num_rows
            counts.rejected += result.rejected_rows.num_rows
            on_progress(counts)

        try:
            for batch in adapters.source.batches(query, batch_rows=settings.read_batch_rows):
                counts.read += batch.num_rows
                for offset in range(0, batch.num_rows, settings.score_batch_rows):
                    window.append(pool.submit(scorer.score, batch.slice(offset, settings.score_batch_rows)))
                    if len(window) >= settings.score_concurrency:
                        drain_one()
            while window:
                drain_one()
        finally:
            for fut in window:
                fut.cancel()
    if counts.scored + counts.rejected != counts.read:
        raise ReconciliationFailed(f"chunk read {counts.read} rows but accounted for {counts.scored + counts.rejected}")
    return counts


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
