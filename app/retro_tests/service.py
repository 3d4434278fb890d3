"""Retro tests: validate and create requests, read them, cancel them, move them through their states."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from app.audit.service import record
from app.auth.scope import ALL_PARTNERS, PartnerScope
from app.config import Settings
from app.errors import Conflict, InvalidPeriod, NotFound, PartnerNotFound, PeriodTooLong
from app.integrations.registry import ModelVersionInfo
from app.metrics import STAGE_SECONDS
from app.partners.models import Partner
from app.partners.service import find_by_code
from app.retro_tests.models import (
    ACTIVE_STATES,
    RUNNING_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    RetroTest,
    State,
)
from app.retro_tests.schemas import RetroTestCreate


class ModelResolver(Protocol):
    def resolve(self, *, name: str, version: str | None = None, alias: str | None = None) -> ModelVersionInfo: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_period(*, start: date, end: date, max_days: int, today: date | None = None) -> None:
    """Refuse periods that are reversed, reach into the future, or are longer than allowed."""
    today = today or utcnow().date()
    if start > end:
        raise InvalidPeriod(f"period_start {start} is after period_end {end}", field="period_start")
    if end > today:
        raise InvalidPeriod(f"period_end {end} is in the future (today is {today})", field="period_end")
    days = (end - start).days + 1
    if days > max_days:
        raise PeriodTooLong(
            f"the period covers {days} days; at most {max_days} are allowed in one retro test", field="period_end"
        )


def request_key(
    *,
    partner_id: uuid.UUID,
    model: ModelVersionInfo,
    data: RetroTestCreate,
    source: Mapping[str, object],
    formats: Sequence[str],
) -> str:
    """A fingerprint of what the job would compute, so an identical active request is not run twice."""
    canonical = json.dumps(
        {
            "partner": str(partner_id),
            "model": model.name,
            "version": model.version,
            "start": data.period_start.isoformat(),
            "end": data.period_end.isoformat(),
            "source": source,
            "formats": sorted(formats),
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _active_with_key(session: Session, key: str) -> RetroTest | None:
    return session.scalars(
        select(RetroTest).where(RetroTest.request_key == key, RetroTest.state.in_(ACTIVE_STATES))
    ).first()


def _unknown_partner(code: str, scope: PartnerScope) -> PartnerNotFound:
    # An account manager hears the same thing for a partner that exists but is not theirs: nothing leaks.
    if scope.everything:
        return PartnerNotFound(f"no partner with code {code!r}; create it first", field="partner_code")
    return PartnerNotFound(
        f"no partner with code {code!r} is assigned to you; an admin can assign it", field="partner_code"
    )


def create_retro_test(
    *,
    session: Session,
    registry: ModelResolver,
    settings: Settings,
    data: RetroTestCreate,
    actor: str,
    scope: PartnerScope,
) -> tuple[RetroTest, bool]:
    """Validate a request and add it as a queued job; returns (job, created). An identical active job is reused."""
    check_period(start=data.period_start, end=data.period_end, max_days=settings.max_period_days)
    partner = find_by_code(session=session, code=data.partner_code)
    if partner is None or not scope.allows(partner.id):
        raise _unknown_partner(data.partner_code, scope)
    model = registry.resolve(name=data.model_name, version=data.model_version, alias=data.model_alias)
    override = data.source.model_dump(exclude_none=True) if data.source else {}
    spec = model.source_spec(override)
    formats = list(data.output_formats or settings.output_formats)
    source = {"table": spec.table, "date_column": spec.date_column, "id_columns": list(spec.id_columns)}
    key = request_key(partner_id=partner.id, model=model, data=data, source=source, formats=formats)
    existing = _active_with_key(session, key)
    if existing is not None:
        return existing, False
    job = RetroTest(
        partner_id=partner.id,
        model_name=model.name,
        requested_version=data.model_version,
        requested_alias=data.model_alias,
        period_start=data.period_start,
        period_end=data.period_end,
        output_formats=formats,
        source_override=override,
        note=data.note,
        requested_by=actor,
        request_key=key,
        model_version=model.version,
        model_run_id=model.run_id,
        model_uri=model.artifact_uri,
        source_table=spec.table,
        date_column=spec.date_column,
        id_columns=list(spec.id_columns),
        state=State.queued,
        stage_started={State.queued.value: utcnow().isoformat()},
    )
    session.add(job)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        # Another request with the same key won the race: hand back that one.
        session.expunge(job)
        existing = _active_with_key(session, key)
        if existing is None:
            raise
        return existing, False
    record(
        session=session,
        actor=actor,
        action="retro_test.create",
        subject_type="retro_test",
        subject_id=job.id,
        partner=partner.code,
        model=f"{model.name}/{model.version}",
        period=[data.period_start.isoformat(), data.period_end.isoformat()],
    )
    return job, True


def get_retro_test(*, session: Session, job_id: uuid.UUID, scope: PartnerScope) -> RetroTest:
    """The job with its partner and files loaded, or NotFound (also when it is another account manager's)."""
    job = session.scalars(
        select(RetroTest)
        .where(RetroTest.id == job_id)
        .options(selectinload(RetroTest.partner), selectinload(RetroTest.files))
        .execution_options(populate_existing=True)
    ).one_or_none()
    if job is None or not scope.allows(job.partner_id):
        raise NotFound(f"no retro test with id {job_id}")
    return job


def list_retro_tests(
    *,
    session: Session,
    scope: PartnerScope,
    partner_code: str | None = None,
    state: State | None = None,
    model_name: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[RetroTest], int]:
    """A page of jobs, newest first, with the total that match the filters."""
    query = select(RetroTest)
    if scope.partner_ids is not None:
        query = query.where(RetroTest.partner_id.in_(list(scope.partner_ids)))
    if partner_code is not None:
        query = query.join(Partner).where(Partner.code == partner_code)
    if state is not None:
        query = query.where(RetroTest.state == state)
    if model_name is not None:
        query = query.where(RetroTest.model_name == model_name)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.options(selectinload(RetroTest.partner), selectinload(RetroTest.files))
        .order_by(RetroTest.created_at.desc(), RetroTest.id)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def request_cancel(*, session: Session, job_id: uuid.UUID, actor: str, scope: PartnerScope) -> RetroTest:
    """Cancel a job: a queued one at once, a running one by flagging it for its worker."""
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    if job.state in TERMINAL_STATES:
        raise Conflict(f"retro test {job_id} is already {job.state.value} and cannot be cancelled")
    job.cancel_requested = True
    if job.state == State.queued:
        advance(job, State.cancelled, error_code="cancelled", error_message=f"cancelled by {actor} before it started")
    session.flush()
    record(session=session, actor=actor, action="retro_test.cancel", subject_type="retro_test", subject_id=job.id)
    return job


def advance(job: RetroTest, to: State, *, error_code: str | None = None, error_message: str | None = None) -> None:
    """Move a job to a new state, recording when the stage started; refuse moves the machine does not allow."""
    restart = job.state in RUNNING_STATES and to == State.resolving  # a redelivered job starts its stages again
    if to not in TRANSITIONS[job.state] and not restart and to != job.state:
        raise Conflict(f"retro test {job.id} cannot go from {job.state.value} to {to.value}")
    now = utcnow()
    _observe_stage(job, now)
    job.state = to
    job.stage_started = {**(job.stage_started or {}), to.value: now.isoformat()}
    if to in TERMINAL_STATES:
        job.finished_at = now
        job.error_code = error_code
        job.error_message = error_message


def _observe_stage(job: RetroTest, now: datetime) -> None:
    """Record how long the job spent in the stage it is leaving (queued or a running stage)."""
    started = (job.stage_started or {}).get(job.state.value) if job.state is not None else None
    if started is None or job.state in TERMINAL_STATES:
        return
    try:
        seconds = (now - datetime.fromisoformat(started)).total_seconds()
    except (TypeError, ValueError):
        return
    STAGE_SECONDS.labels(job.state.value).observe(max(0.0, seconds))


def fail_unqueued(*, session: Session, job_id: uuid.UUID, reason: str) -> None:
    """Mark a job that could not be sent to the workers as failed, so it is not left queued forever."""
    job = get_retro_test(session=session, job_id=job_id, scope=ALL_PARTNERS)
    if job.state == State.queued:
        advance(
            job, State.failed, error_code="queue_unavailable", error_message=f"the job queue refused the job: {reason}"
        )
    session.flush()


def job_prefix(job: RetroTest) -> str:
    """Results folder of a job, under its partner's folder so storage policies can follow partners."""
    return f"{job.partner_id}/{job.id}"
