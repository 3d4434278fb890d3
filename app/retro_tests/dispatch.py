"""Commit a new retro test and send it to the workers: shared by the REST API and the web form."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.auth.scope import PartnerScope
from app.config import Settings
from app.errors import Upstream
from app.queue import send_retro_test
from app.retro_tests import service
from app.retro_tests.models import RetroTest
from app.retro_tests.schemas import RetroTestCreate


def submit(
    *,
    session: Session,
    registry: service.ModelResolver,
    settings: Settings,
    data: RetroTestCreate,
    actor: str,
    scope: PartnerScope,
    history: service.HistoryCoverage | None = None,
) -> tuple[RetroTest, bool]:
    """Validate, commit and queue a request; returns (job, created). A job the queue refuses is marked failed."""
    job, created = service.create_retro_test(
        session=session, registry=registry, settings=settings, data=data, actor=actor, scope=scope, history=history
    )
    session.commit()
    if created:
        try:
            send_retro_test(job.id)
        except Exception as exc:
            service.fail_unqueued(session=session, job_id=job.id, reason=str(exc))
            session.commit()
            raise Upstream(f"the job queue is unavailable, the retro test was not started: {exc}") from exc
    return job, created
