"""Partners: the companies whose customers' history is scored."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.jobs import RetroTest
from app.core.partners import Partner
from app.core.scope import ALL_PARTNERS, PartnerScope
from app.errors import Conflict, NotFound
from app.i18n import _
from app.partners.schemas import PartnerCreate, PartnerUpdate


def get_partner(*, session: Session, partner_id: uuid.UUID, scope: PartnerScope) -> Partner:
    """The partner, or NotFound (also when the caller is not assigned to it)."""
    partner = session.get(Partner, partner_id)
    if partner is None or not scope.allows(partner.id):
        raise NotFound(_("no partner with id {partner_id}").format(partner_id=partner_id))
    return partner


def find_by_code(*, session: Session, code: str) -> Partner | None:
    """The partner with this code, if any."""
    return session.scalars(select(Partner).where(Partner.code == code)).one_or_none()


def list_partners(*, session: Session, scope: PartnerScope) -> list[Partner]:
    """The partners the caller may see, by code."""
    query = select(Partner).order_by(Partner.code)
    if scope.partner_ids is not None:
        query = query.where(Partner.id.in_(list(scope.partner_ids)))
    return list(session.scalars(query))


def create_partner(*, session: Session, data: PartnerCreate, actor: str) -> Partner:
    """Add a partner; its code must be new."""
    if find_by_code(session=session, code=data.code) is not None:
        raise Conflict(_("a partner with code {code} already exists").format(code=repr(data.code)), field="code")
    partner = Partner(
        code=data.code, name=data.name, contact_email=data.contact_email, report_language=data.report_language
    )
    session.add(partner)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(
            _("a partner with code {code} already exists").format(code=repr(data.code)), field="code"
        ) from None
    record(
        session=session,
        actor=actor,
        action="partner.create",
        subject_type="partner",
        subject_id=partner.id,
        code=data.code,
    )
    return partner


def update_partner(*, session: Session, partner_id: uuid.UUID, data: PartnerUpdate, actor: str) -> Partner:
    partner = get_partner(session=session, partner_id=partner_id, scope=ALL_PARTNERS)
    changes = data.model_dump(exclude_unset=True)
    for key, value in changes.items():
        setattr(partner, key, value)
    session.flush()
    record(
        session=session,
        actor=actor,
        action="partner.update",
        subject_type="partner",
        subject_id=partner.id,
        changes=changes,
    )
    return partner


def count_retro_tests(*, session: Session, partner_id: uuid.UUID) -> int:
    """How many retro tests a partner has (any one keeps it from being deleted)."""
    return int(
        session.scalar(select(func.count()).select_from(RetroTest).where(RetroTest.partner_id == partner_id)) or 0
    )


def delete_partner(*, session: Session, partner_id: uuid.UUID, actor: str) -> None:
    """Delete a partner that has no retro tests; one with history is kept for the audit trail."""
    partner = get_partner(session=session, partner_id=partner_id, scope=ALL_PARTNERS)
    jobs = count_retro_tests(session=session, partner_id=partner.id)
    if jobs:
        raise Conflict(
            _("partner {code} has {jobs} retro test(s) and cannot be deleted").format(
                code=repr(partner.code), jobs=jobs
            )
        )
    session.delete(partner)
    session.flush()
    record(
        session=session,
        actor=actor,
        action="partner.delete",
        subject_type="partner",
        subject_id=partner_id,
        code=partner.code,
    )
