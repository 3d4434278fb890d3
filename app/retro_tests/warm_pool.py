"""The pool of warm deployments, as the database holds it: which model servers outlive their job, who uses each.

A warm deployment is a model server a job started and left running when it ended, so that the next job of the same
model version, environment, deployer and settings (its pool key, worker/warm.py) attaches to it instead of
deploying again. Its row lives while the deployment does; `warm_deployment_users` holds one row per job attached
to it. The pool's rules, all in the SQL below:

- A job attaches only to a `ready` deployment of its key (on its own host for local servers) with fewer than
  `share` jobs on it; the row is locked while it counts, so two jobs never take the last place at once.
- A deployment is idle when no job is attached; an idle one expires RETRO_WARM_TTL_S after its last job left.
- Over RETRO_WARM_MAX deployments, idle ones go least recently used first; in-use ones are never evicted.
- A `draining` deployment takes no new job and goes when its last job leaves (`retrotest servers drain`).
- A job that ended without detaching (its worker was killed) is detached by the reaper, by the job's state.

Functions here only read and write rows; they return the names of deployments to stop, which the caller stops
after the transaction commits (worker/warm.py). A row is deleted before its deployment is stopped, so no job can
attach to a deployment that is going.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, Select, String, Uuid, delete, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.clock import as_utc
from app.core.jobs import TERMINAL_STATES, RetroTest
from app.db import Base

STARTING = "starting"
READY = "ready"
DRAINING = "draining"


class WarmDeployment(Base):
    __tablename__ = "warm_deployments"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    pool_key: Mapped[str] = mapped_column(String(64), index=True)
    deployer: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))  # the worker host of a local server; "" on Kubernetes
    state: Mapped[str] = mapped_column(String(16))  # starting, ready, draining
    endpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the Deployment, once ready
    model_name: Mapped[str] = mapped_column(String(255))
    model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # None while a job uses it
    jobs_served: Mapped[int] = mapped_column(Integer)


class WarmDeploymentUser(Base):
    __tablename__ = "warm_deployment_users"

    deployment_name: Mapped[str] = mapped_column(
        String(63), ForeignKey("warm_deployments.name", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, index=True)
    attached_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class PoolEntry:
    """One warm deployment as `retrotest servers list` shows it."""

    name: str
    deployer: str
    host: str
    state: str
    model: str
    jobs: int
    jobs_served: int
    last_used_at: datetime
    expires_at: datetime | None


def _users(session: Session, name: str) -> int:
    return int(session.scalar(select(func.count()).where(WarmDeploymentUser.deployment_name == name)) or 0)


def _attach(session: Session, row: WarmDeployment, job_id: uuid.UUID, now: datetime) -> None:
    session.add(WarmDeploymentUser(deployment_name=row.name, job_id=job_id, attached_at=now))
    row.last_used_at = now
    row.expires_at = None
    row.jobs_served += 1


def detach_job(session: Session, job_id: uuid.UUID) -> None:
    """Forget any attachment an earlier attempt of this job left (it was killed before it could detach)."""
    session.execute(delete(WarmDeploymentUser).where(WarmDeploymentUser.job_id == job_id))


def attach(
    session: Session, *, key: str, host: str, job_id: uuid.UUID, share: int, now: datetime
) -> dict[str, Any] | None:
    """Attach the job to a ready deployment of its key with room for it; its endpoint, or None when there is none.

    Each candidate is locked in turn (by name, so two jobs never wait on each other in opposite orders) and counted
    under the lock: two jobs never take the last place at once, and neither skips a deployment the other is
    attaching to (the lock is held for a moment only).
    """
    detach_job(session, job_id)
    names = session.scalars(
        select(WarmDeployment.name)
        .where(WarmDeployment.pool_key == key, WarmDeployment.host == host, WarmDeployment.state == READY)
        .order_by(WarmDeployment.name)
    ).all()
    for name in names:
        row = session.get(WarmDeployment, name, with_for_update=True, populate_existing=True)
        if row is None or row.state != READY or _users(session, name) >= share:
            continue
        _attach(session, row, job_id, now)
        session.flush()
        return row.endpoint
    return None


@dataclass(frozen=True)
class NewWarm:
    name: str
    key: str
    deployer: str
    host: str
    model_name: str
    model_version: str


def register(session: Session, *, new: NewWarm, job_id: uuid.UUID, now: datetime) -> None:
    """A deployment about to be created, with its job attached: recorded first, so a reaper can always find it."""
    detach_job(session, job_id)
    row = WarmDeployment(
        name=new.name,
        pool_key=new.key,
        deployer=new.deployer,
        host=new.host,
        state=STARTING,
        endpoint=None,
        model_name=new.model_name,
        model_version=new.model_version,
        created_at=now,
        last_used_at=now,
        expires_at=None,
        jobs_served=0,
    )
    session.add(row)
    session.flush()
    _attach(session, row, job_id, now)
    session.flush()


def serves_jobs(session: Session, *, name: str) -> bool:
    """Whether a deployment of this name is in the pool with jobs on it (locked, so none leaves meanwhile)."""
    row = session.get(WarmDeployment, name, with_for_update=True)
    return row is not None and _users(session, name) > 0


def mark_ready(session: Session, *, name: str, endpoint: dict[str, Any]) -> None:
    """The deployment passed its first job's reference check: other jobs may attach to it now."""
    row = session.get(WarmDeployment, name, with_for_update=True)
    if row is not None and row.state == STARTING:
        row.state = READY
        row.endpoint = endpoint
        session.flush()


def release(session: Session, *, name: str, job_id: uuid.UUID, ttl_s: float, now: datetime) -> bool:
    """Detach the job; True when the deployment stays warm, False when it must be stopped (its row is gone then).

    It stays when it is ready and other jobs use it, or when it is ready and the TTL is not 0 (it idles then); a
    deployment still `starting` (its first check never passed) or `draining` goes with its last job.
    """
    session.execute(
        delete(WarmDeploymentUser).where(
            WarmDeploymentUser.deployment_name == name, WarmDeploymentUser.job_id == job_id
        )
    )
    row = session.get(WarmDeployment, name, with_for_update=True)
    if row is None:
        return False
    row.last_used_at = now
    if _users(session, name):
        session.flush()
        return True
    if row.state != READY or ttl_s <= 0:
        session.delete(row)
        session.flush()
        return False
    row.expires_at = now + timedelta(seconds=ttl_s)
    session.flush()
    return True


def remove(session: Session, *, name: str) -> None:
    """Take a deployment out of the pool at once (it died or failed its check); jobs on it find out by themselves."""
    session.execute(delete(WarmDeploymentUser).where(WarmDeploymentUser.deployment_name == name))
    session.execute(delete(WarmDeployment).where(WarmDeployment.name == name))


def _idle_query(host: str) -> Select[WarmDeployment]:
    """The host's idle deployments (no job attached), least recently used first."""
    in_use = select(WarmDeploymentUser.deployment_name)
    return (
        select(WarmDeployment)
        .where(WarmDeployment.host == host, WarmDeployment.name.not_in(in_use))
        .order_by(WarmDeployment.last_used_at, WarmDeployment.name)
    )


def _idle(session: Session, host: str) -> list[WarmDeployment]:
    """The host's idle deployments, locked (rows another transaction holds are skipped)."""
    return list(session.scalars(_idle_query(host).with_for_update(skip_locked=True)))


def evict(session: Session, *, host: str, max_count: int, now: datetime) -> list[tuple[str, str]]:
    """Delete the rows of the host's idle deployments that expired or drain, then of the least recently used idle
    ones while the host has more than max_count (a local server is stopped only where it runs; on Kubernetes the
    host is "" for all); returns (name, reason) of each, to stop."""
    idle = _idle(session, host)
    total = int(session.scalar(select(func.count()).where(WarmDeployment.host == host)) or 0)
    gone: list[tuple[str, str]] = []
    for row in idle:
        if _users(session, row.name):  # a job attached between the query and the lock: not idle after all
            continue
        if row.state == DRAINING:
            reason = "drained"
        elif row.expires_at is not None and as_utc(row.expires_at) <= now:
            reason = "expired"
        elif row.state == STARTING:
            reason = "never_ready"  # its job left without detaching properly; nothing else may use it
        elif total > max_count:
            reason = "evicted"
        else:
            continue
        session.delete(row)
        total -= 1
        gone.append((row.name, reason))
    session.flush()
    return gone


def idle_names(session: Session, *, host: str) -> list[str]:
    """The host's idle deployments, least recently used first (not locked: take_idle decides)."""
    return [row.name for row in session.scalars(_idle_query(host))]


def take_idle(session: Session, *, name: str) -> bool:
    """Delete the row of a deployment that is still idle, to stop it; False when a job attached meanwhile."""
    row = session.get(WarmDeployment, name, with_for_update=True)
    if row is None or _users(session, name):
        return False
    session.delete(row)
    session.flush()
    return True


def detach_ended_jobs(session: Session, *, ttl_s: float, now: datetime) -> int:
    """Detach jobs that ended or vanished while attached (a killed worker); a deployment left idle starts its TTL.

    Returns how many attachments went."""
    live = select(RetroTest.id).where(RetroTest.state.not_in(list(TERMINAL_STATES)))
    stale = session.scalars(select(WarmDeploymentUser).where(WarmDeploymentUser.job_id.not_in(live))).all()
    names = {u.deployment_name for u in stale}
    for user in stale:
        session.delete(user)
    session.flush()
    for name in names:
        row = session.get(WarmDeployment, name)
        if row is not None and row.expires_at is None and not _users(session, name):
            row.expires_at = now + timedelta(seconds=ttl_s)
    session.flush()
    return len(stale)


def forget_if_ready(session: Session, *, name: str) -> bool:
    """Remove a deployment that is gone from the cluster or host (it died); one still starting may not exist yet."""
    row = session.get(WarmDeployment, name, with_for_update=True)
    if row is None or row.state == STARTING:
        return False
    remove(session, name=name)
    return True


def drain(session: Session, *, host: str | None = None) -> None:
    """Every deployment (of the host, if given) takes no new job; idle ones go at the next evict, in-use ones when
    their last job leaves."""
    query = select(WarmDeployment).with_for_update()
    if host is not None:
        query = query.where(WarmDeployment.host == host)
    for row in session.scalars(query):
        row.state = DRAINING
    session.flush()


def names(session: Session) -> set[str]:
    return set(session.scalars(select(WarmDeployment.name)))


def entries(session: Session) -> list[PoolEntry]:
    users = (
        select(WarmDeploymentUser.deployment_name, func.count().label("n"))
        .group_by(WarmDeploymentUser.deployment_name)
        .subquery()
    )
    rows = session.execute(
        select(WarmDeployment, func.coalesce(users.c.n, 0))
        .outerjoin(users, users.c.deployment_name == WarmDeployment.name)
        .order_by(WarmDeployment.last_used_at.desc())
    ).all()
    return [
        PoolEntry(
            name=row.name,
            deployer=row.deployer,
            host=row.host,
            state=row.state,
            model=f"{row.model_name}/{row.model_version}",
            jobs=int(n),
            jobs_served=row.jobs_served,
            last_used_at=as_utc(row.last_used_at),
            expires_at=as_utc(row.expires_at) if row.expires_at is not None else None,
        )
        for row, n in rows
    ]
