"""Result retention: a succeeded job's files and partner links go RETRO_RESULT_RETENTION_DAYS after it finished.

Beat runs worker.reaper.expire_results; the writes to the job's rows live here. The job itself stays, with its
history and audit trail; only its files (and the links to them) go.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.jobs import ResultFile, RetroTest, State, job_prefix
from app.downloads.service import revoke_job_links

ACTOR = "retention"


def jobs_past_retention(*, session: Session, finished_before: datetime, limit: int) -> list[tuple[uuid.UUID, str]]:
    """Succeeded jobs that finished before the cutoff and still have result files: (id, folder in the store)."""
    has_files = exists().where(ResultFile.retro_test_id == RetroTest.id)
    jobs = session.scalars(
        select(RetroTest)
        .where(RetroTest.state == State.succeeded, RetroTest.finished_at < finished_before, has_files)
        .order_by(RetroTest.finished_at)
        .limit(limit)
    ).all()
    return [(job.id, job_prefix(job)) for job in jobs]


def close_links(*, session: Session, job_id: uuid.UUID) -> None:
    """First step: the job's partner links stop working, before its files go."""
    revoked = revoke_job_links(session=session, job_id=job_id, actor=ACTOR)
    if revoked:
        record(
            session=session,
            actor=ACTOR,
            action="download_link.revoke",
            subject_type="retro_test",
            subject_id=job_id,
            links=revoked,
            reason="retention",
        )


def record_results_deleted(*, session: Session, job_id: uuid.UUID, retention_days: int) -> None:
    """Last step, once the files are gone from the store: the job no longer lists them; the audit trail says why."""
    names = list(session.scalars(select(ResultFile.name).where(ResultFile.retro_test_id == job_id)))
    session.execute(delete(ResultFile).where(ResultFile.retro_test_id == job_id))
    record(
        session=session,
        actor=ACTOR,
        action="retro_test.results_deleted",
        subject_type="retro_test",
        subject_id=job_id,
        files=names,
        retention_days=retention_days,
    )
    session.flush()
