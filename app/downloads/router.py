"""Partner downloads through links (`/d/{token}`), and the REST API that makes, lists and revokes links."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from sqlalchemy.orm import Session

from app.auth.deps import CurrentScope, CurrentUser, current_user
from app.config import Settings, get_settings
from app.core.jobs import get_retro_test
from app.db import get_session
from app.downloads import service
from app.downloads.schemas import DownloadOut, LinkCreate, LinkCreated, LinkOut

api_router = APIRouter(prefix="/api/v1/retro-tests", tags=["download links"], dependencies=[Depends(current_user)])


@api_router.post(
    "/{job_id}/links",
    status_code=201,
    response_model=LinkCreated,
    responses={404: {"description": "No such retro test"}, 409: {"description": "The job has not succeeded"}},
)
def create_link(
    job_id: uuid.UUID,
    data: LinkCreate,
    user: CurrentUser,
    scope: CurrentScope,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> LinkCreated:
    """A download link for a partner to a succeeded job's files. The URL is in this response only."""
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    link, token = service.create_link(
        session=session,
        job=job,
        expires_in_days=data.expires_in_days or settings.download_link_default_days,
        max_days=settings.download_link_max_days,
        actor=user.username,
    )
    session.commit()
    return LinkCreated(**service.link_out(link).model_dump(), url=service.link_url(settings.public_base_url, token))


@api_router.get("/{job_id}/links", response_model=list[LinkOut], responses={404: {"description": "No such retro test"}})
def list_links(
    job_id: uuid.UUID, scope: CurrentScope, session: Annotated[Session, Depends(get_session)]
) -> list[LinkOut]:
    """The job's download links, newest first (never their tokens)."""
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    return [service.link_out(link) for link in service.list_links(session=session, job_id=job.id)]


@api_router.delete(
    "/{job_id}/links/{link_id}", status_code=204, responses={404: {"description": "No such retro test or link"}}
)
def revoke_link(
    job_id: uuid.UUID,
    link_id: uuid.UUID,
    user: CurrentUser,
    scope: CurrentScope,
    session: Annotated[Session, Depends(get_session)],
) -> Response:
    """Revoke a link: it answers like an unknown one from now on."""
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    service.revoke_link(session=session, job_id=job.id, link_id=link_id, actor=user.username)
    session.commit()
    return Response(status_code=204)


@api_router.get(
    "/{job_id}/downloads", response_model=list[DownloadOut], responses={404: {"description": "No such retro test"}}
)
def list_downloads(
    job_id: uuid.UUID, scope: CurrentScope, session: Annotated[Session, Depends(get_session)]
) -> list[DownloadOut]:
    """Downloads of the job's files through partner links, newest first: time, IP, user agent, bytes."""
    job = get_retro_test(session=session, job_id=job_id, scope=scope)
    return service.download_history(session=session, job_id=job.id)
