"""Commit a new retro test and send it to the workers: shared by the REST API and the web form."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.config import Settings
from app.core.jobs import RetroTest
from app.errors import Upstream
from app.integrations.results import ResultStore
from app.queue import send_retro_test
from app.retro_tests import service


def submit(
    *,
    session: Session,
    registry: service.ModelResolver,
    settings: Settings,
    request: service.RetroTestRequest,
    history: service.HistoryCoverage | None = None,
    store: ResultStore | None = None,
) -> tuple[RetroTest, bool]:
    """Validate, commit and queue a request; returns (job, created). A job the queue refuses is marked failed.

    A population is checked before anything is written, and its checked copy is stored (under the job's folder,
    the partner's prefix) after the job's row is committed and before the job is queued: no transaction waits on
    the store, and no worker sees the job before its file is there.
    """
    job, created, population = service.submit_request(
        session=session,
        registry=registry,
        settings=settings,
        request=request,
        history=history,
    )
    session.commit()
    if created:
        if population is not None and job.population is not None:
            assert store is not None, "a population needs the result store"
            try:
                with store.open_write(job.population.path) as fh:
                    fh.write(population.parquet)
            except OSError as exc:
                service.fail_unqueued(session=session, job_id=job.id, reason=f"population not stored: {exc}")
                session.commit()
                raise Upstream(f"the population could not be stored, the retro test was not started: {exc}") from exc
        try:
            send_retro_test(job.id)
        except Exception as exc:
            service.fail_unqueued(session=session, job_id=job.id, reason=str(exc))
            session.commit()
            raise Upstream(f"the job queue is unavailable, the retro test was not started: {exc}") from exc
    return job, created
