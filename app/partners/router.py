from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from app.actors import current_actor
from app.db import get_session
from app.partners import service
from app.partners.schemas import PartnerCreate, PartnerOut, PartnerUpdate

router = APIRouter(prefix="/api/v1/partners", tags=["partners"])


@router.get("", response_model=list[PartnerOut])
def list_partners(session: Annotated[Session, Depends(get_session)]) -> list[PartnerOut]:
    """Every partner, by code."""
    return [PartnerOut.model_validate(p) for p in service.list_partners(session=session)]


@router.post("", status_code=201, response_model=PartnerOut, responses={409: {"description": "Code already used"}})
def create_partner(
    data: PartnerCreate,
    request: Request,
    response: Response,
    session: Annotated[Session, Depends(get_session)],
    actor: Annotated[str, Depends(current_actor)],
) -> PartnerOut:
    """Add a partner. Its code is what account managers type in requests."""
    partner = service.create_partner(session=session, data=data, actor=actor)
    session.commit()
    response.headers["Location"] = str(request.url_for("get_partner", partner_id=partner.id))
    return PartnerOut.model_validate(partner)


@router.get("/{partner_id}", response_model=PartnerOut, responses={404: {"description": "No such partner"}})
def get_partner(partner_id: uuid.UUID, session: Annotated[Session, Depends(get_session)]) -> PartnerOut:
    return PartnerOut.model_validate(service.get_partner(session=session, partner_id=partner_id))


@router.patch("/{partner_id}", response_model=PartnerOut, responses={404: {"description": "No such partner"}})
def update_partner(
    partner_id: uuid.UUID,
    data: PartnerUpdate,
    session: Annotated[Session, Depends(get_session)],
    actor: Annotated[str, Depends(current_actor)],
) -> PartnerOut:
    partner = service.update_partner(session=session, partner_id=partner_id, data=data, actor=actor)
    session.commit()
    return PartnerOut.model_validate(partner)


@router.delete(
    "/{partner_id}",
    status_code=204,
    responses={404: {"description": "No such partner"}, 409: {"description": "The partner has retro tests"}},
)
def delete_partner(
    partner_id: uuid.UUID,
    session: Annotated[Session, Depends(get_session)],
    actor: Annotated[str, Depends(current_actor)],
) -> Response:
    service.delete_partner(session=session, partner_id=partner_id, actor=actor)
    session.commit()
    return Response(status_code=204)
