"""The life of one retro test, stage by stage, as plain functions over the adapters.

resolving  -> the exact model version and its signature, from the registry
extracting -> the source schema is checked and the period's rows counted, before anything is deployed
deploying  -> a temporary model server for exactly that version; stopped on every path
scoring    -> the period, chunk by chunk (chunk_days), streamed in batches to the model server; a chunk's
              part file and its row in retro_test_chunks are the checkpoint, so a redelivered job skips
              finished chunks and never writes a row twice (worker/chunks.py). With RETRO_PARTITIONS > 1,
              helper workers score date ranges of the period against the same deployment (score_partition)
publishing -> parts merged into the result files, a manifest, row counts reconciled

The attempt that runs the stages holds the job's lease (worker/control.py) and is the only one to give a verdict.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import IO, Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.errors import (
    AppError,
    JobCancelled,
    ModelServerDown,
    ReconciliationFailed,
    SourceUnknown,
    TooManyAttempts,
)
from app.integrations.deployers import Deployer, Deployment, deployment_name
from app.integrations.history import HistoryQuery, HistorySource
from app.integrations.registry import MlflowRegistry, ModelVersionInfo
from app.integrations.results import ResultStore
from app.integrations.scoring import SCORERS, BatchScorer, choose_protocol
from app.metrics import DEPLOYMENTS_ALIVE
from app.retro_tests.models import ResultFile, RetroTest, RetroTestChunk, State
from app.retro_tests.service import advance, job_prefix, utcnow
from worker.chunks import Chunk, ChunkCounts, committed_keys, enforce_reject_budget, plan_chunks, score_chunks
from worker.control import JobControl, LeaseLost, aware, claim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionOrder:
    """A helper's share of a job: the chunks from `first` to `last` (chunk keys), against `deployment`."""

    job_id: uuid.UUID
    lease: str
    deployment: Deployment
    first: str
    last: str

    def to_message(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "lease": self.lease,
            "deployment": asdict(self.deployment),
            "first": self.first,
            "last": self.last,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PartitionOrder:
        return cls(
            job_id=uuid.UUID(message["job_id"]),
            lease=message["lease"],
            deployment=Deployment(**message["deployment"]),
            first=message["first"],
            last=message["last"],
        )


@dataclass
class Adapters:
    """The outside systems one job talks to."""

    registry: MlflowRegistry
    source: HistorySource
    deployer: Deployer
    store: ResultStore
    # Sends a partition of a job to another worker; None: this job's worker scores every chunk itself.
    send_partition: Callable[[PartitionOrder], None] | None = None


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
    model, recorded = _stage(
        sessions,
        job_id,
        State.resolving,
        lambda job: (resolve(job=job, registry=adapters.registry), job.model_info is not None),
    )
    if not recorded:  # accepted before the API kept the model on the job: keep the registry's answer now
        _set_counters(sessions, job_id, model_info=model.to_record())
    query, total = _stage(
        sessions, job_id, State.extracting, lambda job: extract(job=job, model=model, source=adapters.source)
    )
    control.check()
    chunks = plan_chunks(query.start, query.end, settings.chunk_days)
    _set_counters(sessions, job_id, rows_total=total, chunks_total=len(chunks))
    redeploys = 0
    # An attempt that finds every chunk committed (its predecessor died before publishing) deploys nothing.
    while not {c.key for c in chunks} <= committed_keys(sessions, job_id):
        try:
            with deployed(
                sessions=sessions,
                job_id=job_id,
                model=model,
                deployer=adapters.deployer,
                settings=settings,
                control=control,
            ) as (deployment, scorer):
                _stage(sessions, job_id, State.scoring, lambda job: None)
                score_period(
                    job_id=job_id,
                    query=query,
                    chunks=chunks,
                    deployment=deployment,
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
    log.info("retro test %s: %s", job_id, state.value)  # the log's timestamps show each stage's time
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
        job.lease_holder = None
        return state


def resolve(*, job: RetroTest, registry: MlflowRegistry) -> ModelVersionInfo:
    """The exact version the job was created for; never an alias that may have moved since.

    The API records the registry's answer on the job when it accepts the request, and every attempt and helper
    reads that record: a job scores the version its requester was shown, starts at once, and still runs while
    the registry is down. A version's signature and artifacts do not change. A job without the record (accepted
    before it was kept) asks the registry; _run_stages then records the answer, so only its first attempt asks.
    """
    if job.model_info:
        return ModelVersionInfo.from_record(job.model_info)
    return registry.resolve(name=job.model_name, version=job.model_version)


def history_query(*, job: RetroTest, model: ModelVersionInfo) -> HistoryQuery:
    """The job's period of history: its id and date columns and the model's inputs."""
    return HistoryQuery(
        table=job.source_table,
        date_column=job.date_column,
        id_columns=tuple(job.id_columns),
        features=model.inputs,
        start=job.period_start,
        end=job.period_end,
    )


def extract(*, job: RetroTest, model: ModelVersionInfo, source: HistorySource) -> tuple[HistoryQuery, int | None]:
    """Check the source schema and count the period's rows, before any model is deployed.

    A resumed attempt keeps the first attempt's count (a COUNT over a long period can take minutes in Hive);
    publishing compares it with the rows read, so a source that changed in between still fails the job.
    """
    query = history_query(job=job, model=model)
    source.check_schema(query)
    total = job.rows_total if job.rows_total is not None else source.count(query)
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
) -> Iterator[tuple[Deployment, BatchScorer]]:
    """A ready model server for the job's model version, torn down when the block exits, however it exits."""
    name = deployment_name(job_id)
    _stage(sessions, job_id, State.deploying, lambda job: None)
    # Record the name before creating anything, so a reaper can find it if this process dies.
    _set_counters(sessions, job_id, deployment_name=name)
    alive = DEPLOYMENTS_ALIVE.labels(settings.deployer)
    alive.inc()
    try:
        deployment = deployer.start(name=name, job_id=str(job_id), model=model)
        deployer.wait_ready(deployment, timeout_s=settings.deploy_ready_timeout_s, should_stop=control.cancel_requested)
        with open_scorer(deployment=deployment, model=model, settings=settings, control=control) as scorer:
            _set_counters(sessions, job_id, score_protocol=scorer.protocol)
            yield deployment, scorer
    finally:
        alive.dec()
        try:
            deployer.stop(name)
        except Exception:
            # The job's outcome stands; the reaper deletes the deployment once the job is terminal.
            log.exception("could not stop deployment %s of retro test %s; the reaper will", name, job_id)


def open_scorer(
    *, deployment: Deployment, model: ModelVersionInfo, settings: Settings, control: JobControl
) -> BatchScorer:
    """A client for the deployment in RETRO_SCORE_PROTOCOL, or the fastest protocol it serves (auto)."""
    return SCORERS[choose_protocol(deployment, settings.score_protocol)](
        deployment=deployment,
        features=model.inputs,
        output_names=model.outputs,
        timeout_s=settings.score_timeout_s,
        retries=settings.score_retries,
        backoff_s=settings.score_backoff_s,
        max_connections=settings.score_concurrency,
        should_stop=control.stop_now,
        timeout_floor_s=settings.score_timeout_floor_s,
    )


def split_ranges(chunks: list[Chunk], parts: int) -> list[list[Chunk]]:
    """Contiguous runs of chunks, as even as can be, at most `parts` of them."""
    parts = max(1, min(parts, len(chunks)))
    size, extra = divmod(len(chunks), parts)
    ranges, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        ranges.append(chunks[at : at + n])
        at += n
    return [r for r in ranges if r]


def score_period(
    *,
    job_id: uuid.UUID,
    query: HistoryQuery,
    chunks: list[Chunk],
    deployment: Deployment,
    scorer: BatchScorer,
    adapters: Adapters,
    settings: Settings,
    sessions: sessionmaker[Session],
    control: JobControl,
) -> None:
    """Score every chunk of the period not yet committed, alone or with RETRO_PARTITIONS - 1 helper workers.

    Helpers each get a date range; this attempt scores the first range, then every chunk still open from the
    end of the period backwards. A helper that never starts or dies costs nothing but its share of the time, and
    a live one meets this attempt inside its range, where at most the chunk both are on is scored twice (the
    first commit wins). When this returns, every chunk is committed.
    """
    done = committed_keys(sessions, job_id)
    pending = [c for c in chunks if c.key not in done]
    ranges = split_ranges(pending, settings.partitions if adapters.send_partition else 1)
    order = ranges[0] if ranges else []
    for part in ranges[1:]:
        assert adapters.send_partition is not None
        adapters.send_partition(
            PartitionOrder(
                job_id=job_id, lease=control.lease, deployment=deployment, first=part[0].key, last=part[-1].key
            )
        )
        log.info("retro test %s: chunks %s to %s sent to a helper worker", job_id, part[0].key, part[-1].key)
    for part in reversed(ranges[1:]):
        order += list(reversed(part))
    score_chunks(
        job_id=job_id,
        query=query,
        chunks=order,
        scorer=scorer,
        source=adapters.source,
        store=adapters.store,
        settings=settings,
        sessions=sessions,
        control=control,
        live_progress=len(ranges) <= 1,
    )
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None
        # A helper's commit may have passed the reject budget; its own error went only to its log.
        enforce_reject_budget(rejected=job.rows_rejected, read_total=job.rows_total or job.rows_read, settings=settings)


def score_partition(
    *, order: PartitionOrder, sessions: sessionmaker[Session], adapters: Adapters, settings: Settings
) -> str:
    """A helper worker's share of a job: score its range while the coordinating attempt holds the lease.

    The helper gives no verdict. Whatever stops it (the lease moved on, a cancel, the model server gone, a
    scoring failure) only ends its share early: the coordinator scores every chunk left open. Returns what
    happened, for the log.
    """
    with sessions() as s:
        job = s.get(RetroTest, order.job_id)
        if job is None or job.is_terminal or job.lease_token != order.lease:
            return "stale: the job ended or another attempt owns it"
        s.expunge(job)
    model = resolve(job=job, registry=adapters.registry)
    query = history_query(job=job, model=model)
    chunks = [c for c in plan_chunks(query.start, query.end, settings.chunk_days) if order.first <= c.key <= order.last]
    deadline = aware(job.created_at) + timedelta(seconds=settings.job_deadline_s)
    own = ChunkCounts()
    try:
        with (
            JobControl(
                sessions=sessions, job_id=order.job_id, lease=order.lease, deadline=deadline, heartbeat_s=None
            ) as control,
            open_scorer(deployment=order.deployment, model=model, settings=settings, control=control) as scorer,
        ):
            score_chunks(
                job_id=order.job_id,
                query=query,
                chunks=chunks,
                scorer=scorer,
                source=adapters.source,
                store=adapters.store,
                settings=settings,
                sessions=sessions,
                control=control,
                live_progress=False,
                tally=own,
            )
    except (LeaseLost, JobCancelled) as exc:
        return f"this helper scored {own.read} rows, then stopped: {exc}"
    except AppError as exc:
        if not _holds_lease(sessions, order):  # the job ended or moved on while this helper was scoring
            return f"this helper scored {own.read} rows, then the job moved on ({exc.detail})"
        log.warning(
            "partition %s..%s of retro test %s stopped: %s; its coordinator scores the rest",
            order.first,
            order.last,
            order.job_id,
            exc.detail,
        )
        return f"this helper scored {own.read} rows, then stopped: {exc.detail}"
    return f"this helper scored {own.read} rows, its whole range"


def _holds_lease(sessions: sessionmaker[Session], order: PartitionOrder) -> bool:
    with sessions() as s:
        return s.scalar(select(RetroTest.lease_token).where(RetroTest.id == order.job_id)) == order.lease


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
        score_protocol = job.score_protocol
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
        "scoring": {"protocol": score_protocol},
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
