from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.deps import AdminUser, CurrentScope, current_user
from app.auth.schemas import PartnerManagers
from app.core.scope import ALL_PARTNERS
from app.db import get_session
from app.partners import service
from app.partners.schemas import PartnerCreate, PartnerOut, PartnerUpdate

router = APIRouter(prefix="/api/v1/partners", tags=["partners"], dependencies=[Depends(current_user)])

ADMIN_ONLY: dict[int | str, dict[str, Any]] = {403: {"description": "Only admins manage partners"}}


@router.get("", response_model=list[PartnerOut])
def list_partners(session: Annotated[Session, Depends(get_session)], scope: CurrentScope) -> list[PartnerOut]:
    """The partners the caller acts on (every partner for admins), by code."""
    return [PartnerOut.model_validate(p) for p in service.list_partners(session=session, scope=scope)]


@router.post(
    "",
    status_code=201,
    response_model=PartnerOut,
    responses={409: {"description": "Code already used"}, **ADMIN_ONLY},
)
def create_partner(
    data: PartnerCreate,
    request: Request,
    response: Response,
    session: Annotated[Session, Depends(get_session)],
    admin: AdminUser,
) -> PartnerOut:
    """Add a partner (admins). Its code is what account managers type in requests."""
    partner = service.create_partner(session=session, data=data, actor=admin.username)
    session.commit()
    response.headers["Location"] = str(request.url_for("get_partner", partner_id=partner.id))
    return PartnerOut.model_validate(partner)


@router.get("/{partner_id}", response_model=PartnerOut, responses={404: {"description": "No such partner"}})
def get_partner(
    partner_id: uuid.UUID, session: Annotated[Session, Depends(get_session)], scope: CurrentScope
) -> PartnerOut:
    return PartnerOut.model_validate(service.get_partner(session=session, partner_id=partner_id, scope=scope))


@router.patch(
    "/{partner_id}", response_model=PartnerOut, responses={404: {"description": "No such partner"}, **ADMIN_ONLY}
)
def update_partner(
    partner_id: uuid.UUID,
    data: PartnerUpdate,
    session: Annotated[Session, Depends(get_session)],
    admin: AdminUser,
) -> PartnerOut:
    """Change a partner's name or contact (admins)."""
    partner = service.update_partner(session=session, partner_id=partner_id, data=data, actor=admin.username)
    session.commit()
    return PartnerOut.model_validate(partner)


@router.delete(
    "/{partner_id}",
    status_code=204,
    responses={
        404: {"description": "No such partner"},
        409: {"description": "The partner has retro tests"},
        **ADMIN_ONLY,
    },
)
def delete_partner(
    partner_id: uuid.UUID, session: Annotated[Session, Depends(get_session)], admin: AdminUser
) -> Response:
    """Delete a partner without retro tests (admins)."""
    service.delete_partner(session=session, partner_id=partner_id, actor=admin.username)
    session.commit()
    return Response(status_code=204)


@router.get(
    "/{partner_id}/managers", response_model=PartnerManagers, responses={404: {"description": "No such partner"}}
)
def get_partner_managers(
    partner_id: uuid.UUID, session: Annotated[Session, Depends(get_session)], scope: CurrentScope
) -> PartnerManagers:
    """The account managers assigned to a partner."""
    partner = service.get_partner(session=session, partner_id=partner_id, scope=scope)
    users = auth_service.partner_managers(session=session, partner_id=partner.id)
    return PartnerManagers(usernames=[u.username for u in users])


@router.put(
    "/{partner_id}/managers",
    response_model=PartnerManagers,
    responses={404: {"description": "No such partner"}, 422: {"description": "Unknown user"}, **ADMIN_ONLY},
)
def set_partner_managers(
    partner_id: uuid.UUID,
    data: PartnerManagers,
    session: Annotated[Session, Depends(get_session)],
    admin: AdminUser,
) -> PartnerManagers:
    """Assign exactly these users to the partner (admins); they see and act on its retro tests."""
    partner = service.get_partner(session=session, partner_id=partner_id, scope=ALL_PARTNERS)
    users = auth_service.set_partner_managers(
        session=session, partner=partner, usernames=data.usernames, actor=admin.username
    )
    session.commit()
    return PartnerManagers(usernames=[u.username for u in users])
