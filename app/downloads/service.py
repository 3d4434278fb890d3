"""Partner download links: random tokens, stored hashed, scoped to one job, expiring and revocable."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from app.audit.models import AuditEvent
from app.audit.service import record
from app.auth.service import secret_digest
from app.clock import as_utc, utcnow
from app.core.jobs import RetroTest, State
from app.downloads.files import Download
from app.downloads.models import DownloadLink
from app.downloads.schemas import DownloadOut, LinkOut, LinkState
from app.errors import Conflict, Invalid, NotFound
from app.i18n import _

DOWNLOAD_ACTION = "download_link.download"
_MAX_TOKEN_CHARS = 100


def link_url(base_url: str, token: str) -> str:
    """The address a partner opens."""
    return f"{base_url.rstrip('/')}/d/{token}"


def create_link(
    *, session: Session, job: RetroTest, expires_in_days: int, max_days: int, actor: str
) -> tuple[DownloadLink, str]:
    """A new link to a succeeded job's files; returns the row and the token, which is not stored."""
    if job.state != State.succeeded:
        raise Conflict(
            _("a download link needs a succeeded retro test; this one is {value}").format(value=job.state.value)
        )
    if not 1 <= expires_in_days <= max_days:
        raise Invalid(
            _("a link may last 1 to {max_days} days, not {expires_in_days}").format(
                max_days=max_days, expires_in_days=expires_in_days
            ),
            field="expires_in_days",
        )
    token = secrets.token_urlsafe(32)  # 256 random bits
    link = DownloadLink(
        retro_test_id=job.id,
        token_hash=secret_digest(token),
        created_by=actor,
        expires_at=utcnow() + timedelta(days=expires_in_days),
    )
    session.add(link)
    session.flush()
    record(
        session=session,
        actor=actor,
        action="download_link.create",
        subject_type="retro_test",
        subject_id=job.id,
        link_id=str(link.id),
        expires_at=link.expires_at.isoformat(),
    )
    return link, token


def list_links(*, session: Session, job_id: uuid.UUID) -> list[DownloadLink]:
    return list(
        session.scalars(
            select(DownloadLink).where(DownloadLink.retro_test_id == job_id).order_by(DownloadLink.created_at.desc())
        )
    )


def revoke_link(*, session: Session, job_id: uuid.UUID, link_id: uuid.UUID, actor: str) -> DownloadLink:
    """Revoke a link of this job; it stops working at once."""
    link = session.get(DownloadLink, link_id)
    if link is None or link.retro_test_id != job_id:
        raise NotFound(_("retro test {job_id} has no download link {link_id}").format(job_id=job_id, link_id=link_id))
    if link.revoked_at is None:
        link.revoked_at = utcnow()
        link.revoked_by = actor
        session.flush()
        record(
            session=session,
            actor=actor,
            action="download_link.revoke",
            subject_type="retro_test",
            subject_id=job_id,
            link_id=str(link.id),
        )
    return link


def revoke_job_links(*, session: Session, job_id: uuid.UUID, actor: str) -> int:
    """Revoke every link of the job still open (its results are going); returns how many."""
    now = utcnow()
    revoked = session.scalars(
        update(DownloadLink)
        .where(DownloadLink.retro_test_id == job_id, DownloadLink.revoked_at.is_(None))
        .values(revoked_at=now, revoked_by=actor)
        .returning(DownloadLink.id)
    ).all()
    session.flush()
    return len(revoked)


def link_state(link: DownloadLink, now: datetime | None = None) -> LinkState:
    if link.revoked_at is not None:
        return "revoked"
    if as_utc(link.expires_at) <= (now or utcnow()):
        return "expired"
    return "active"


def link_out(link: DownloadLink) -> LinkOut:
    return LinkOut(
        id=link.id,
        retro_test_id=link.retro_test_id,
        created_by=link.created_by,
        created_at=link.created_at,
        expires_at=link.expires_at,
        revoked_at=link.revoked_at,
        revoked_by=link.revoked_by,
        state=link_state(link),
    )


def resolve_link(*, session: Session, token: str) -> tuple[DownloadLink, RetroTest] | None:
    """The live link for a token and its succeeded job with files; None for unknown, expired or revoked alike."""
    if not token or len(token) > _MAX_TOKEN_CHARS:
        return None
    row = session.execute(
        select(DownloadLink, RetroTest)
        .join(RetroTest, RetroTest.id == DownloadLink.retro_test_id)
        .where(
            DownloadLink.token_hash == secret_digest(token),
            DownloadLink.revoked_at.is_(None),
            DownloadLink.expires_at > utcnow(),
            RetroTest.state == State.succeeded,
        )
        .options(selectinload(RetroTest.files), selectinload(RetroTest.partner))
    ).one_or_none()
    if row is None:
        return None
    link, job = row
    return link, job


def record_download(
    *, session: Session, link: DownloadLink, download: Download, ip: str | None, user_agent: str | None
) -> None:
    """Write one partner download (its file, bytes and status) to the audit trail, before its first byte is sent."""
    record(
        session=session,
        actor=f"download-link:{link.id}",
        action=DOWNLOAD_ACTION,
        subject_type="retro_test",
        subject_id=link.retro_test_id,
        link_id=str(link.id),
        file=download.file.name,
        ip=ip,
        user_agent=(user_agent or "")[:400],
        bytes=download.part.length,
        status=206 if download.part.partial else 200,
    )


def download_history(*, session: Session, job_id: uuid.UUID, limit: int = 200) -> list[DownloadOut]:
    """The job's partner downloads, newest first."""
    events = session.scalars(
        select(AuditEvent)
        .where(
            AuditEvent.subject_type == "retro_test",
            AuditEvent.subject_id == str(job_id),
            AuditEvent.action == DOWNLOAD_ACTION,
        )
        .order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
        .limit(limit)
    )
    return [
        DownloadOut(
            at=e.at,
            link_id=e.detail.get("link_id"),
            file=e.detail.get("file"),
            ip=e.detail.get("ip"),
            user_agent=e.detail.get("user_agent"),
            bytes=e.detail.get("bytes"),
            status=e.detail.get("status"),
        )
        for e in events
    ]
