"""Thin Celery tasks: load by id, hand off to the pipeline or the reaper."""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache
from typing import Any

from celery import Task
from sqlalchemy import select

from app.auth import throttle
from app.config import get_settings
from app.core.jobs import TERMINAL_STATES, RetroTest, State
from app.db import get_session_factory
from app.integrations.deployers.port import Deployer
from app.integrations.wiring import (
    make_deployer,
    make_environments,
    make_history_source,
    make_registry,
    make_result_store,
)
from app.logging_setup import job_context
from app.queue import (
    REAP_DEPLOYMENTS,
    RECONCILE_JOBS,
    RUN_RETRO_TEST,
    SCORE_PARTITION,
    send_partition,
    send_retro_test,
)
from worker.celery_app import celery_app
from worker.pipeline import run_retro_test, score_partition
from worker.reaper import expire_results, reap_deployments, reap_files, reap_staged_models, reap_staging
from worker.reconciler import reconcile_jobs
from worker.run import Adapters, PartitionOrder

log = logging.getLogger(__name__)


@lru_cache
def _deployer() -> Deployer:
    return make_deployer(get_settings())


@lru_cache
def _adapters() -> Adapters:
    settings = get_settings()
    return Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=_deployer(),
        store=make_result_store(settings),
        environments=make_environments(settings),
        send_partition=lambda order: send_partition(order.to_message()),
    )


@celery_app.task(name=RUN_RETRO_TEST, bind=True, acks_late=True, max_retries=None)  # type: ignore[untyped-decorator]
def run_retro_test_task(self: Task, job_id: str) -> str:
    """Run one retro test to a terminal state.

    A delivery that finds the job held by another attempt checks back once that attempt's heartbeat could
    have gone stale, so a job whose worker was killed is taken over within about RETRO_STALE_AFTER_S.
    """
    settings = get_settings()
    with job_context(job_id):
        ended = _ended(job_id)
        if ended is not None:
            return ended
        state = run_retro_test(
            job_id=uuid.UUID(job_id), sessions=get_session_factory(), adapters=_adapters(), settings=settings
        )
        if state not in TERMINAL_STATES:
            log.info(
                "retro test %s is held by another attempt; checking back in %.0f s", job_id, settings.stale_after_s
            )
            raise self.retry(countdown=settings.stale_after_s + 1)
        log.info("retro test %s finished: %s", job_id, state.value)
    return state.value


def _ended(job_id: str) -> str | None:
    """The state of a job that has ended or is gone, logged once: its message is stale and is acknowledged.

    Such a message is one the broker delivered again (Redis after its visibility timeout, a reconciler's second
    send); it is dropped here, without a lock on the job or an attempt counted.
    """
    with get_session_factory()() as s:
        state = s.scalar(select(RetroTest.state).where(RetroTest.id == uuid.UUID(job_id)))
    if state is None:
        log.warning("retro test %s does not exist; dropping its message", job_id)
        return State.failed.value
    if state not in TERMINAL_STATES:
        return None
    log.info("retro test %s has already ended (%s); dropping a stale message for it", job_id, state.value)
    return str(state.value)


@celery_app.task(name=SCORE_PARTITION, acks_late=True)  # type: ignore[untyped-decorator]
def score_partition_task(message: dict[str, Any]) -> str:
    """Score a helper's share (a date range) of a job that another worker coordinates (RETRO_PARTITIONS > 1)."""
    order = PartitionOrder.from_message(message)
    with job_context(str(order.job_id)):
        outcome = score_partition(
            order=order, sessions=get_session_factory(), adapters=_adapters(), settings=get_settings()
        )
        log.info("partition %s..%s of retro test %s: %s", order.first, order.last, order.job_id, outcome)
    return outcome


@celery_app.task(name=REAP_DEPLOYMENTS)  # type: ignore[untyped-decorator]
def reap_deployments_task() -> list[str]:
    """Delete model deployments whose job has ended or whose expiry has passed, files ended jobs left, and results
    past their retention (beat)."""
    sessions = get_session_factory()
    adapters, settings = _adapters(), get_settings()
    reaped = reap_deployments(deployer=_deployer(), sessions=sessions, settings=settings)
    reaped += reap_staging(source=adapters.source, sessions=sessions, database=settings.hive_scratch_database)
    reaped += [f"staged model {d}" for d in reap_staged_models(settings=settings)]
    reaped += reap_files(store=adapters.store, sessions=sessions)
    with sessions.begin() as s:
        throttle.forget_old_failures(session=s, settings=settings)
    return reaped + expire_results(
        store=adapters.store, sessions=sessions, retention_days=settings.result_retention_days
    )


@celery_app.task(name=RECONCILE_JOBS)  # type: ignore[untyped-decorator]
def reconcile_jobs_task() -> list[str]:
    """Send jobs that a lost message or a dead worker stranded to the workers again (sent by beat)."""
    settings = get_settings()
    ids = reconcile_jobs(
        sessions=get_session_factory(),
        enqueue=send_retro_test,
        stale_after_s=settings.stale_after_s,
        requeue_queued_after_s=settings.requeue_queued_after_s,
    )
    return [str(i) for i in ids]
