"""The reaper: deletes temporary model deployments that outlived their job, and result files no job offers.

A job stops its deployment on every path it controls (success, failure, cancel). A worker that is killed
cannot, so beat runs this every RETRO_REAPER_INTERVAL_S: a managed deployment goes when its job is terminal
or missing, or when its expiry time has passed (RETRO_DEPLOYMENT_TTL_S after it was created, which must be
longer than the longest job). Deleting is idempotent, so a reaper racing a job's own stop is harmless.

The same holds for files: a job that fails or is cancelled removes its files itself, and a succeeded one its
parts; a worker killed at the wrong moment leaves them, and reap_files removes them for jobs that ended within
RECENT_DAYS (older ones were looked at by earlier runs).

Staged model copies (app/integrations/deployers/staging.py) go when unused for RETRO_MODEL_STAGING_TTL_S.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.clock import utcnow
from app.config import Settings
from app.core.jobs import TERMINAL_STATES, RetroTest, State, job_prefix
from app.integrations.deployers.port import Deployer, ManagedDeployment
from app.integrations.deployers.staging import ModelStaging
from app.integrations.history.port import STAGING_PREFIX, HistorySource
from app.integrations.storage.results import ResultStore
from app.metrics import DEPLOYMENTS_REAPED, REAPER_RUNS
from app.retro_tests import retention, warm_pool
from worker.warm import maintain

log = logging.getLogger(__name__)


def reap_deployments(
    *, deployer: Deployer, sessions: sessionmaker[Session], now: float | None = None, settings: Settings | None = None
) -> list[str]:
    """Delete managed deployments whose job is terminal or missing, or whose expiry has passed; return their names.

    A deployment in the warm pool (worker/warm.py) outlives its job: the pool's rules decide when it goes. With
    settings, the pool is tended first: jobs that ended attached are detached, idle deployments past
    RETRO_WARM_TTL_S and the pool's surplus are stopped.
    """
    REAPER_RUNS.inc()
    now = time.time() if now is None else now
    reaped = []
    if settings is not None:
        for name, reason in maintain(
            sessions=sessions,
            deployer=deployer,
            settings=settings,
            live=lambda: {m.name for m in deployer.list_managed()},
        ):
            DEPLOYMENTS_REAPED.labels(f"warm_{reason}").inc()
            reaped.append(name)
    return reaped + _reap_managed(deployer=deployer, sessions=sessions, now=now)


def _reap_managed(*, deployer: Deployer, sessions: sessionmaker[Session], now: float) -> list[str]:
    reaped: list[str] = []
    managed = deployer.list_managed()
    if not managed:
        return reaped
    states = _job_states(sessions, [m.job_id for m in managed])
    with sessions() as s:
        pooled = warm_pool.names(s)
    for deployment in managed:
        reason = reap_reason(deployment, states=states, now=now, pooled=deployment.name in pooled)
        if reason is None:
            continue
        try:
            deployer.stop(deployment.name)
            if deployment.name in pooled:
                with sessions.begin() as s:
                    warm_pool.remove(s, name=deployment.name)
        except Exception:
            log.exception("reaper: could not delete deployment %s; trying again next time", deployment.name)
            continue
        DEPLOYMENTS_REAPED.labels(reason).inc()
        log.info("reaper: deleted deployment %s of job %s (%s)", deployment.name, deployment.job_id, reason)
        reaped.append(deployment.name)
    return reaped


def reap_staged_models(*, settings: Settings, now: float | None = None) -> list[str]:
    """Delete staged model copies unused for RETRO_MODEL_STAGING_TTL_S; a store that fails is tried next time."""
    try:
        return ModelStaging(settings=settings).reap(now=now)
    except Exception:
        log.exception("reaper: could not clean the staged models under %s", settings.model_staging_url)
        return []


def reap_reason(
    deployment: ManagedDeployment, *, states: dict[str, State], now: float, pooled: bool = False
) -> str | None:
    """Why a deployment should go ("expired", "job_missing", "job_finished"), or None to keep it.

    Its expiry (RETRO_DEPLOYMENT_TTL_S after it was created) holds in the warm pool too; otherwise a pooled
    deployment stays whatever its first job's state: the pool expires it."""
    if deployment.expires_at is not None and deployment.expires_at <= now:
        return "expired"
    if pooled:
        return None
    state = states.get(_canonical(deployment.job_id) or "")
    if state is None:
        return "job_missing"
    if state in TERMINAL_STATES:
        return "job_finished"
    return None


def _canonical(job_id: str | None) -> str | None:
    try:
        return str(uuid.UUID(job_id)) if job_id else None
    except ValueError:
        return None


def _job_states(sessions: sessionmaker[Session], job_ids: list[str | None]) -> dict[str, State]:
    ids = {uuid.UUID(c) for c in map(_canonical, job_ids) if c is not None}
    if not ids:
        return {}
    with sessions() as s:
        rows = s.execute(select(RetroTest.id, RetroTest.state).where(RetroTest.id.in_(ids))).tuples()
        return {str(job_id): state for job_id, state in rows}


RECENT_DAYS = 7


def reap_files(*, store: ResultStore, sessions: sessionmaker[Session], recent_days: int = RECENT_DAYS) -> list[str]:
    """Remove what ended jobs left: every file of a failed or cancelled job, the parts of a succeeded one."""
    since = utcnow() - timedelta(days=recent_days)
    with sessions() as s:
        ended = s.scalars(
            select(RetroTest).where(RetroTest.state.in_(TERMINAL_STATES), RetroTest.finished_at >= since)
        ).all()
        leftovers = [job_prefix(job) if job.state != State.succeeded else f"{job_prefix(job)}/parts" for job in ended]
    removed = []
    for rel in leftovers:
        try:
            if store.exists(rel):
                store.remove_tree(rel)
                removed.append(rel)
                log.info("reaper: removed %s, left behind by a job that ended", rel)
        except Exception:
            log.exception("reaper: could not remove %s; trying again next time", rel)
    return removed


RETENTION_BATCH = 100  # jobs per beat run; the next run takes the rest


def expire_results(*, store: ResultStore, sessions: sessionmaker[Session], retention_days: int) -> list[str]:
    """Delete the files and links of succeeded jobs finished more than retention_days ago (0: keep for ever).

    Links first, then the files, then the record: no link ever points at a file that is gone, no transaction is
    open while the store works, and a crash in between leaves a job the next run finishes.
    """
    if retention_days <= 0:
        return []
    cutoff = utcnow() - timedelta(days=retention_days)
    with sessions() as s:
        due = retention.jobs_past_retention(session=s, finished_before=cutoff, limit=RETENTION_BATCH)
    expired = []
    for job_id, prefix in due:
        try:
            with sessions.begin() as s:
                retention.close_links(session=s, job_id=job_id)
            store.remove_tree(prefix)
            with sessions.begin() as s:
                retention.record_results_deleted(session=s, job_id=job_id, retention_days=retention_days)
        except Exception:
            log.exception("retention: could not delete the results of %s; trying again next time", job_id)
            continue
        log.info("retention: deleted the results and links of retro test %s (over %d days)", job_id, retention_days)
        expired.append(str(job_id))
    return expired


def reap_staging(*, source: HistorySource, sessions: sessionmaker[Session], database: str) -> list[str]:
    """Drop population staging tables whose job has ended or is gone (a killed worker could not drop its own)."""
    try:
        tables = source.staging_tables(database, prefix=STAGING_PREFIX)
    except Exception:  # no scratch database yet, or the source is down: nothing to do until the next run
        log.warning("reaper: could not list staging tables in %s", database, exc_info=True)
        return []
    if not tables:
        return []
    owners = {t: _job_of_staging(t) for t in tables}
    states = _job_states(sessions, [str(j) for j in owners.values() if j is not None])
    dropped = []
    for table, job_id in owners.items():
        state = states.get(str(job_id)) if job_id else None
        if state is not None and state not in TERMINAL_STATES:
            continue
        try:
            source.drop_staging(table)
        except Exception:
            log.exception("reaper: could not drop staging table %s; trying again next time", table)
            continue
        log.info("reaper: dropped staging table %s of a job that ended", table)
        dropped.append(table)
    return dropped


def _job_of_staging(table: str) -> uuid.UUID | None:
    name = table.rsplit(".", 1)[-1]
    try:
        return uuid.UUID(hex=name[len(STAGING_PREFIX) :])
    except ValueError:
        return None
