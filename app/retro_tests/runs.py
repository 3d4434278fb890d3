"""A running job's row: every write a worker makes to it, and the reads a running attempt needs.

The one place that changes a job while it runs: claim the lease, enter a stage, record what was learned (the
model, the plan, the deployment, the protocol), heartbeat and progress, commit a chunk, record the result files,
give the verdict. In the worker only worker/run.py (JobRun, the one writer of a running job) calls these
functions (scripts/check_layers.py holds that); nothing sets a job's attributes itself.

Each function works in the caller's session and only flushes: JobRun owns the transaction, one short one per
call, and keeps none open across a call to an outside system (Hive, a model server, Kubernetes).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.clock import as_utc, utcnow
from app.core.jobs import ResultFile, RetroTest, RetroTestChunk, RetroTestModel, State, job_prefix
from app.core.model_types import ModelVersionInfo
from app.core.partners import Partner
from app.core.records import ChunkPlanRecord, EnvironmentRecord, ModelRecord, PopulationRecord, ValidationRecord
from app.core.transitions import advance
from app.errors import JobCancelled, NotFound


class LeaseLost(Exception):
    """Another attempt owns the job now (this one was presumed dead); this attempt stops without a verdict."""


@dataclass(frozen=True)
class ModelSlot:
    """One model of a job comparing several: its registry answer, where its columns start, and whether an earlier
    attempt left it out (allow_partial) after it failed."""

    position: int
    model_info: ModelRecord
    column_prefix: str
    left_out: bool = False


@dataclass(frozen=True)
class JobSpec:
    """What a running job is asked to do, loaded once per attempt: none of it changes while the job runs."""

    id: uuid.UUID
    partner_id: uuid.UUID
    prefix: str  # where its files go in the result store
    model_name: str
    model_version: str
    model_info: ModelRecord | None  # the registry's answer the API recorded (None for older jobs)
    source_table: str
    date_column: str
    id_columns: tuple[str, ...]
    period_start: date
    period_end: date
    output_formats: tuple[str, ...]
    requested_by: str
    created_at: datetime
    rows_total: int | None  # as a first attempt counted it; a resumed attempt keeps it
    chunk_plan: ChunkPlanRecord | None = None  # the chunks as the first attempt planned them (chunks.plan_chunks)
    population: PopulationRecord | None = (
        None  # the partner's population, as the API recorded it (RetroTest.population)
    )
    partner_name: str = ""  # as the partner's report names it
    report_language: str | None = None  # the partner's report language (None: RETRO_DEFAULT_LANGUAGE)
    require_full_period: bool = False  # refuse a period with days that have no history
    days_without_history: tuple[str, ...] | None = None  # YYYY-MM-DD, as found so far (None: not known yet)
    models: tuple[ModelSlot, ...] = ()  # a job comparing several models: each (none for a job of one model)
    allow_partial: bool = False  # with several models: go on without one that fails its deployment or check


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a job: the lease (None: not this attempt's to run), and the job as found."""

    lease: str | None
    state: State
    attempts: int
    cancel_requested: bool
    spec: JobSpec


@dataclass(frozen=True)
class Counts:
    """Rows of a chunk, or of a job so far."""

    read: int = 0
    scored: int = 0
    rejected: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.read + other.read, self.scored + other.scored, self.rejected + other.rejected)


@dataclass(frozen=True)
class ChunkRecord:
    """A finished chunk: its key, its rows and its part files (None where it has no rows of that kind)."""

    key: str
    counts: Counts
    part_path: str | None
    rejects_path: str | None
    model_counts: tuple[tuple[int, int], ...] | None = None  # a comparing job's (scored, rejected) per model


@dataclass(frozen=True)
class ResultFileRecord:
    """One published result file."""

    name: str
    kind: str  # scores, rejects or manifest
    format: str
    rows: int | None
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Beat:
    """What a heartbeat found: whether the attempt still holds the lease and whether a cancel was asked."""

    held: bool
    cancel_requested: bool


def _job(session: Session, job_id: uuid.UUID, *, lock: bool = False) -> RetroTest:
    job = session.get(RetroTest, job_id, with_for_update=lock)
    if job is None:
        raise NotFound(f"no retro test with id {job_id}")
    return job


def _models(session: Session, job_id: uuid.UUID) -> list[RetroTestModel]:
    """The models a comparing job scores with, in order (none for a job of one model)."""
    return list(
        session.scalars(
            select(RetroTestModel).where(RetroTestModel.retro_test_id == job_id).order_by(RetroTestModel.position)
        )
    )


def _spec(session: Session, job: RetroTest) -> JobSpec:
    return JobSpec(
        id=job.id,
        partner_id=job.partner_id,
        prefix=job_prefix(job),
        model_name=job.model_name,
        model_version=job.model_version,
        model_info=job.model_info,
        source_table=job.source_table,
        date_column=job.date_column,
        id_columns=tuple(job.id_columns),
        period_start=job.period_start,
        period_end=job.period_end,
        output_formats=tuple(job.output_formats),
        requested_by=job.requested_by,
        created_at=as_utc(job.created_at),
        rows_total=job.rows_total,
        chunk_plan=job.chunk_plan,
        population=job.population,
        partner_name=session.scalar(select(Partner.name).where(Partner.id == job.partner_id)) or "",
        report_language=session.scalar(select(Partner.report_language).where(Partner.id == job.partner_id)),
        require_full_period=bool(job.require_full_period),
        days_without_history=tuple(job.days_without_history) if job.days_without_history is not None else None,
        models=tuple(
            ModelSlot(
                position=m.position,
                model_info=m.model_info,
                column_prefix=m.column_prefix,
                left_out=m.error_code is not None,
            )
            for m in _models(session, job.id)
        ),
        allow_partial=bool(job.allow_partial),
    )


def load_spec(*, session: Session, job_id: uuid.UUID) -> JobSpec:
    return _spec(session, _job(session, job_id))


def claim(
    *,
    session: Session,
    job_id: uuid.UUID,
    holder: str,
    stale_after_s: float,
    holder_is_dead: Callable[[str | None], bool],
) -> Claim | None:
    """Take the job's lease for a new attempt, unless the job is finished or a live attempt holds it.

    None when there is no such job. `holder_is_dead(holder)` says whether a holder whose heartbeat is fresh
    is in fact gone (a killed process on this host).
    """
    job = session.get(RetroTest, job_id, with_for_update=True)
    if job is None:
        return None
    lease = None
    if not job.is_terminal:
        now = utcnow()
        heartbeat = job.heartbeat_at
        fresh = job.lease_token is not None and heartbeat is not None
        fresh = fresh and as_utc(heartbeat) > now - timedelta(seconds=stale_after_s)  # type: ignore[arg-type]
        if not fresh or holder_is_dead(job.lease_holder):
            lease = uuid.uuid4().hex
            job.lease_token, job.lease_holder, job.heartbeat_at = lease, holder, now
            job.attempts += 1
            session.flush()
    return Claim(
        lease=lease,
        state=job.state,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        spec=_spec(session, job),
    )


def enter_stage(*, session: Session, job_id: uuid.UUID, state: State) -> None:
    """Move the job to the next stage of its run; a cancel asked meanwhile stops it here."""
    job = _job(session, job_id)
    if job.cancel_requested:
        raise JobCancelled("cancelled on request")
    advance(job, state)
    session.flush()


def record_model(*, session: Session, job_id: uuid.UUID, model: ModelVersionInfo) -> None:
    """Keep the registry's answer on a job accepted before the API recorded it: later attempts read it back."""
    _job(session, job_id).model_info = model.to_record()
    session.flush()


def record_plan(*, session: Session, job_id: uuid.UUID, rows_total: int | None, chunks_total: int) -> None:
    job = _job(session, job_id)
    job.rows_total, job.chunks_total = rows_total, chunks_total
    session.flush()


def record_days_without_history(*, session: Session, job_id: uuid.UUID, days: list[date]) -> None:
    """The days of the period the history has no row for, as the period's per-day count found them."""
    job = _job(session, job_id)
    job.days_without_history = [d.isoformat() for d in days]
    session.flush()


def record_chunk_plan(*, session: Session, job_id: uuid.UUID, plan: ChunkPlanRecord) -> ChunkPlanRecord:
    """Keep the job's chunk plan unless one is kept already; returns the plan the job has (the first one wins).

    A chunk is known by its key in retro_test_chunks, so every attempt and helper must cut the period the same
    way, even when the source changed in between (publishing's reconciliation then fails the job).
    """
    job = _job(session, job_id, lock=True)
    if job.chunk_plan is None:
        job.chunk_plan = plan
        session.flush()
    return job.chunk_plan


def record_deployment(*, session: Session, job_id: uuid.UUID, name: str, warm: bool | None = None) -> None:
    """The deployment's name, recorded before it is created, so a reaper can find it if the worker dies; and
    whether it was a warm one from the pool (None: not known yet)."""
    job = _job(session, job_id)
    job.deployment_name = name
    job.deployment_warm = warm
    session.flush()


def record_environment(*, session: Session, job_id: uuid.UUID, environment: EnvironmentRecord) -> None:
    """The model's environment as far as it is known: the step being taken, then what was built or reused."""
    _job(session, job_id).environment = environment
    session.flush()


def record_validation(*, session: Session, job_id: uuid.UUID, validation: ValidationRecord) -> None:
    """The reference check's outcome, passed or not."""
    _job(session, job_id).validation = validation
    session.flush()


def record_protocol(*, session: Session, job_id: uuid.UUID, protocol: str) -> None:
    _job(session, job_id).score_protocol = protocol
    session.flush()


@dataclass(frozen=True)
class ModelFacts:
    """What an attempt learned of one model of a comparing job; None: nothing new of that kind."""

    deployment_name: str | None = None
    environment: EnvironmentRecord | None = None
    validation: ValidationRecord | None = None
    score_protocol: str | None = None
    error: tuple[str, str] | None = None  # (code, message): the model failed and the job goes on without it


def record_model_facts(*, session: Session, job_id: uuid.UUID, position: int, facts: ModelFacts) -> None:
    """Keep what was learned of one model of a comparing job on its row."""
    row = session.scalars(
        select(RetroTestModel).where(RetroTestModel.retro_test_id == job_id, RetroTestModel.position == position)
    ).one()
    if facts.deployment_name is not None:
        row.deployment_name = facts.deployment_name
    if facts.environment is not None:
        row.environment = facts.environment
    if facts.validation is not None:
        row.validation = facts.validation
    if facts.score_protocol is not None:
        row.score_protocol = facts.score_protocol
    if facts.error is not None:
        row.error_code, row.error_message = facts.error
    _job(session, job_id).updated_at = utcnow()  # the job's views show its models: a kept view is out of date
    session.flush()


def beat(
    *, session: Session, job_id: uuid.UUID, lease: str, progress: Counts | None = None, heartbeat: bool = True
) -> Beat:
    """Renew the heartbeat (and the live counters) while the lease is still this attempt's."""
    job = session.get(RetroTest, job_id)
    if job is None or job.lease_token != lease:
        return Beat(held=False, cancel_requested=False)
    if progress is not None:
        job.rows_read, job.rows_scored, job.rows_rejected = progress.read, progress.scored, progress.rejected
    if heartbeat:
        job.heartbeat_at = utcnow()
    session.flush()
    return Beat(held=True, cancel_requested=job.cancel_requested)


def mark_requeued(*, session: Session, job_id: uuid.UUID, at: datetime) -> None:
    """The reconciler sent the job to the workers again at `at` (so it is not sent twice within a stale period)."""
    _job(session, job_id).last_enqueued_at = at
    session.flush()


def holds_lease(*, session: Session, job_id: uuid.UUID, lease: str) -> bool:
    return bool(session.scalar(select(RetroTest.lease_token).where(RetroTest.id == job_id)) == lease)


def committed_keys(*, session: Session, job_id: uuid.UUID) -> set[str]:
    """The keys of the job's chunks already committed, by any attempt or helper."""
    return set(session.scalars(select(RetroTestChunk.chunk_key).where(RetroTestChunk.retro_test_id == job_id)))


def committed_counts(*, session: Session, job_id: uuid.UUID) -> Counts:
    """The rows of every committed chunk of the job, added up."""
    row = session.execute(
        select(
            func.coalesce(func.sum(RetroTestChunk.rows_read), 0),
            func.coalesce(func.sum(RetroTestChunk.rows_scored), 0),
            func.coalesce(func.sum(RetroTestChunk.rows_rejected), 0),
        ).where(RetroTestChunk.retro_test_id == job_id)
    ).one()
    return Counts(read=int(row[0]), scored=int(row[1]), rejected=int(row[2]))


def record_chunk(*, session: Session, job_id: uuid.UUID, lease: str, chunk: ChunkRecord) -> Tally | None:
    """Record a finished chunk and the job's totals together: the checkpoint. Returns the job's tally after it.

    None when another worker committed the same chunk first. The job row is locked, so the commits of one job
    are serialized and exactly one copy of a chunk is ever recorded. LeaseLost when the job moved on.
    """
    owner = session.scalar(select(RetroTest.lease_token).where(RetroTest.id == job_id).with_for_update())
    if owner != lease:
        raise LeaseLost(f"retro test {job_id} was taken over by another attempt; chunk {chunk.key} not recorded")
    taken = session.scalar(
        select(RetroTestChunk.id).where(RetroTestChunk.retro_test_id == job_id, RetroTestChunk.chunk_key == chunk.key)
    )
    if taken is not None:
        return None
    session.add(
        RetroTestChunk(
            retro_test_id=job_id,
            chunk_key=chunk.key,
            rows_read=chunk.counts.read,
            rows_scored=chunk.counts.scored,
            rows_rejected=chunk.counts.rejected,
            part_path=chunk.part_path,
            rejects_path=chunk.rejects_path,
            model_counts=[list(c) for c in chunk.model_counts] if chunk.model_counts is not None else None,
        )
    )
    session.flush()
    if chunk.model_counts is not None:
        _add_up_models(session, job_id)
    totals = committed_counts(session=session, job_id=job_id)
    job = _job(session, job_id)
    job.rows_read, job.rows_scored, job.rows_rejected = totals.read, totals.scored, totals.rejected
    job.chunks_done = int(
        session.scalar(select(func.count()).select_from(RetroTestChunk).where(RetroTestChunk.retro_test_id == job_id))
        or 0
    )
    session.flush()
    return tally(session=session, job_id=job_id)


def _add_up_models(session: Session, job_id: uuid.UUID) -> None:
    """Each compared model's rows over the committed chunks, on its row (the job's page shows them)."""
    per_model: dict[int, list[int]] = {}
    for counts in session.scalars(
        select(RetroTestChunk.model_counts).where(
            RetroTestChunk.retro_test_id == job_id, RetroTestChunk.model_counts.is_not(None)
        )
    ):
        for position, (scored, rejected) in enumerate(counts or []):
            total = per_model.setdefault(position, [0, 0])
            total[0] += scored
            total[1] += rejected
    for row in _models(session, job_id):
        row.rows_scored, row.rows_rejected = per_model.get(row.position, [0, 0])
    session.flush()


def committed_chunks(*, session: Session, job_id: uuid.UUID) -> list[ChunkRecord]:
    """The job's committed chunks, in the order of the period."""
    rows = session.scalars(
        select(RetroTestChunk).where(RetroTestChunk.retro_test_id == job_id).order_by(RetroTestChunk.chunk_key)
    )
    return [
        ChunkRecord(
            key=c.chunk_key,
            counts=Counts(read=c.rows_read, scored=c.rows_scored, rejected=c.rows_rejected),
            part_path=c.part_path,
            rejects_path=c.rejects_path,
            model_counts=tuple((int(a), int(b)) for a, b in c.model_counts) if c.model_counts is not None else None,
        )
        for c in rows
    ]


@dataclass(frozen=True)
class Tally:
    """The job's row counts as publishing reads them, and when each of its stages started."""

    rows_total: int | None
    counts: Counts
    stage_started: dict[str, str]
    score_protocol: str | None
    deployment_warm: bool | None = None
    environment: EnvironmentRecord | None = None
    validation: ValidationRecord | None = None
    days_without_history: list[str] | None = None
    models: tuple[ModelTally, ...] = ()  # a comparing job's models


@dataclass(frozen=True)
class ModelTally:
    """One compared model as publishing reads it."""

    position: int
    model_info: ModelRecord
    column_prefix: str
    rows_scored: int
    rows_rejected: int
    score_protocol: str | None
    environment: EnvironmentRecord | None
    validation: ValidationRecord | None
    error: tuple[str, str] | None


def tally(*, session: Session, job_id: uuid.UUID) -> Tally:
    job = _job(session, job_id)
    return Tally(
        models=tuple(
            ModelTally(
                position=m.position,
                model_info=m.model_info,
                column_prefix=m.column_prefix,
                rows_scored=m.rows_scored,
                rows_rejected=m.rows_rejected,
                score_protocol=m.score_protocol,
                environment=m.environment,
                validation=m.validation,
                error=(m.error_code, m.error_message or "") if m.error_code else None,
            )
            for m in _models(session, job_id)
        ),
        rows_total=job.rows_total,
        counts=Counts(read=job.rows_read, scored=job.rows_scored, rejected=job.rows_rejected),
        stage_started=dict(job.stage_started or {}),
        score_protocol=job.score_protocol,
        deployment_warm=job.deployment_warm,
        environment=job.environment,
        validation=job.validation,
        days_without_history=list(job.days_without_history) if job.days_without_history is not None else None,
    )


def record_results(*, session: Session, job_id: uuid.UUID, files: list[ResultFileRecord], location: str) -> None:
    """The published files and where they are, replacing any an earlier attempt recorded."""
    session.execute(delete(ResultFile).where(ResultFile.retro_test_id == job_id))
    for f in files:
        session.add(
            ResultFile(
                retro_test_id=job_id,
                name=f.name,
                kind=f.kind,
                format=f.format,
                rows=f.rows,
                bytes=f.bytes,
                sha256=f.sha256,
            )
        )
    _job(session, job_id).result_location = location
    session.flush()


def finish(
    *,
    session: Session,
    job_id: uuid.UUID,
    lease: str,
    state: State,
    error: tuple[str, str] | None = None,
) -> State:
    """Record the verdict (and its error code and message), if this attempt still holds the lease; release it."""
    job = _job(session, job_id, lock=True)
    if job.is_terminal or job.lease_token != lease:
        return job.state
    code, message = error if error else (None, None)
    advance(job, state, error_code=code, error_message=message)
    job.lease_token = None
    job.lease_holder = None
    session.flush()
    return state
