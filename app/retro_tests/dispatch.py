"""Commit a new retro test and send it to the workers: shared by the REST API and the web form."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.config import Settings
from app.core.jobs import RetroTest
from app.db import release_connection
from app.errors import Upstream
from app.i18n import _
from app.integrations.storage.results import ResultStore
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

    No transaction is open during an outside call: the partner is read and that read ended, then the model is
    resolved, the population checked and the history's partitions listed, then one short transaction adds the job.

    A population is checked before anything is written, and its checked copy is stored (under the job's folder,
    the partner's prefix) after the job's row is committed and before the job is queued: no transaction waits on
    the store, and no worker sees the job before its file is there.
    """
    partner = service.requested_partner(session=session, settings=settings, request=request)
    # The partner was read; end that transaction before the registry, the population and the history source are
    # asked (seconds on a slow registry or a 64 MiB upload), so that no connection waits on them.
    release_connection(session)
    checked = service.check_request(
        registry=registry, settings=settings, request=request, partner=partner, history=history
    )
    job, created, population = service.add_job(session=session, checked=checked)
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
                raise Upstream(
                    _("the population could not be stored, the retro test was not started: {exc}").format(exc=exc)
                ) from exc
        try:
            send_retro_test(job.id)
        except Exception as exc:
            service.fail_unqueued(session=session, job_id=job.id, reason=str(exc))
            session.commit()
            raise Upstream(
                _("the job queue is unavailable, the retro test was not started: {exc}").format(exc=exc)
            ) from exc
    return job, created
