"""Recovery that does not rely on the broker's memory: re-enqueue jobs a lost message or a dead worker stranded.

A running job renews its heartbeat every few seconds; one whose heartbeat is older than stale_after_s lost
its worker, and one whose lease holder was a process on this host that is gone lost it for certain. A queued
job whose message was never picked up (a Redis restart drops unacked and queued messages) is sent again after
requeue_queued_after_s. Sending a job twice is harmless: the pipeline's lease lets one attempt run it and the
others do nothing.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.service import record
from app.clock import utcnow
from app.core.jobs import RUNNING_STATES, RetroTest, State
from worker.control import holder_is_dead
from worker.run import mark_requeued

log = logging.getLogger(__name__)


def reconcile_jobs(
    *,
    sessions: sessionmaker[Session],
    enqueue: Callable[[uuid.UUID], None],
    stale_after_s: float,
    requeue_queued_after_s: float,
    now: datetime | None = None,
) -> list[uuid.UUID]:
    """Send stranded jobs to the workers again; returns their ids."""
    now = now or utcnow()
    stale = now - timedelta(seconds=stale_after_s)
    queued_before = now - timedelta(seconds=requeue_queued_after_s)
    with sessions() as s, s.begin():
        jobs = list(
            s.scalars(
                select(RetroTest)
                .where(
                    or_(
                        and_(
                            RetroTest.state.in_(RUNNING_STATES),
                            or_(RetroTest.heartbeat_at.is_(None), RetroTest.heartbeat_at < stale),
                            or_(RetroTest.last_enqueued_at.is_(None), RetroTest.last_enqueued_at < stale),
                        ),
                        and_(
                            RetroTest.state == State.queued,
                            RetroTest.cancel_requested.is_(False),
                            or_(RetroTest.heartbeat_at.is_(None), RetroTest.heartbeat_at < stale),
                            or_(
                                and_(RetroTest.last_enqueued_at.is_(None), RetroTest.created_at < queued_before),
                                RetroTest.last_enqueued_at < queued_before,
                            ),
                        ),
                    )
                )
                .with_for_update(skip_locked=True)
            )
        )
        # On one machine (a laptop, a single VM) a dead holder is seen at once, without waiting for its heartbeat.
        jobs += [job for job in _dead_here(s, stale) if job not in jobs]
        for job in jobs:
            mark_requeued(s, job.id, at=now)
            record(
                session=s,
                actor="reconciler",
                action="retro_test.requeue",
                subject_type="retro_test",
                subject_id=job.id,
                state=job.state.value,
                heartbeat_at=job.heartbeat_at.isoformat() if job.heartbeat_at else None,
            )
        ids = [job.id for job in jobs]
    for job_id in ids:  # after the commit, so a fast worker sees last_enqueued_at
        log.warning("retro test %s looks stranded; sending it to the workers again", job_id)
        enqueue(job_id)
    return ids


def _dead_here(s: Session, stale: datetime) -> list[RetroTest]:
    """Running jobs whose lease holder was a process on this host that is gone (locked for the caller)."""
    held_here = s.scalars(
        select(RetroTest)
        .where(
            RetroTest.state.in_(RUNNING_STATES),
            RetroTest.lease_holder.startswith(f"{socket.gethostname()}:"),
            or_(RetroTest.last_enqueued_at.is_(None), RetroTest.last_enqueued_at < stale),
        )
        .with_for_update(skip_locked=True)
    )
    return [job for job in held_here if holder_is_dead(job.lease_holder)]


def resume_dead_here(
    *, sessions: sessionmaker[Session] | None = None, enqueue: Callable[[uuid.UUID], None] | None = None
) -> list[uuid.UUID]:
    """A starting worker's sweep: send again the running jobs whose attempt died with a process on this host."""
    from app.db import get_session_factory
    from app.queue import send_retro_test

    sessions = sessions or get_session_factory()
    send = enqueue or (lambda job_id: send_retro_test(job_id))
    now = utcnow()
    try:
        with sessions() as s, s.begin():
            jobs = _dead_here(s, now)
            for job in jobs:
                mark_requeued(s, job.id, at=now)
            ids = [job.id for job in jobs]
    except Exception:
        log.warning("could not look for jobs a dead process on this host held; beat's reconciler will", exc_info=True)
        return []
    for job_id in ids:
        log.warning("retro test %s was held by a process on this host that died; sending it again", job_id)
        send(job_id)
    return ids
