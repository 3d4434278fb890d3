"""Partner downloads through links (`/d/{token}`), and the REST API that makes, lists and revokes links."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.auth.deps import CurrentScope, CurrentUser, current_user
from app.config import Settings, get_settings
from app.db import get_session
from app.downloads import files, service
from app.downloads.schemas import DownloadOut, LinkCreate, LinkCreated, LinkOut
from app.integrations.results import ResultStore
from app.integrations.wiring import get_result_store
from app.retro_tests import service as retro_tests
from app.web.templating import templates

api_router = APIRouter(prefix="/api/v1/retro-tests", tags=["download links"], dependencies=[Depends(current_user)])
partner_router = APIRouter(prefix="/d", include_in_schema=False)

PARTNER_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
}

# One page for every link that does not work (unknown, expired, revoked, tampered) and every file it lacks:
# the same status and the same bytes, so a guesser learns nothing.
NOT_FOUND_HTML = (
    "<!doctype html><html lang=en><head><meta charset=utf-8><title>Not found</title>"
    '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
    "<body><h1>Not found</h1><p>This link does not work. Ask the person who sent it for a new one.</p></body></html>"
)


def link_not_found() -> HTMLResponse:
    return HTMLResponse(NOT_FOUND_HTML, status_code=404, headers=PARTNER_HEADERS)


@partner_router.get("/{token}")
def partner_landing(token: str, request: Request, session: Annotated[Session, Depends(get_session)]) -> Response:
    """The page a partner opens: the job's files with sizes and sha256, each a download."""
    found = service.resolve_link(session=session, token=token)
    if found is None:
        return link_not_found()
    link, job = found
    shown = [f for f in job.files if files.find_result_file(job, f.name) is not None]
    return templates.TemplateResponse(
        request,
        "partner/landing.html",
        {"job": job, "link": link, "files": shown, "token": token},
        headers=PARTNER_HEADERS,
    )


@partner_router.get("/{token}/{name:path}")
def partner_download(
    token: str,
    name: str,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    store: Annotated[ResultStore, Depends(get_result_store)],
) -> Response:
    """One file of the link's job, whole or a byte range; every download goes to the audit trail."""
    found = service.resolve_link(session=session, token=token)
    if found is None:
        return link_not_found()
    link, job = found
    file = files.find_result_file(job, name)
    if file is None:
        return link_not_found()
    part = files.choose_slice(
        size=file.bytes,
        range_header=request.headers.get("range"),
        if_range=request.headers.get("if-range"),
        etag=files.etag_of(file),
    )
    if part is None:
        return files.not_satisfiable(file.bytes, PARTNER_HEADERS)
    fh = files.open_result(store, job, file)
    if fh is None:
        return link_not_found()
    service.record_download(
        session=session,
        link=link,
        file=file,
        ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
        sent_bytes=part.length,
        status=206 if part.partial else 200,
    )
    session.commit()
    return files.stream_slice(fh=fh, file=file, part=part, headers=PARTNER_HEADERS)


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
    job = retro_tests.get_retro_test(session=session, job_id=job_id, scope=scope)
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
    job = retro_tests.get_retro_test(session=session, job_id=job_id, scope=scope)
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
    job = retro_tests.get_retro_test(session=session, job_id=job_id, scope=scope)
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
    job = retro_tests.get_retro_test(session=session, job_id=job_id, scope=scope)
    return service.download_history(session=session, job_id=job.id)
