"""The audit trail: one row per action a person or the system takes."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.audit.models import AuditEvent


def record(*, session: Session, actor: str, action: str, subject_type: str, subject_id: object, **detail: Any) -> None:
    """Add an audit event to the session; the caller commits it with the change it describes."""
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            subject_type=subject_type,
            subject_id=str(subject_id),
            detail=detail,
        )
    )
