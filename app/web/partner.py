"""The pages a partner opens from a download link (no sign-in): the landing page and the file downloads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.db import get_session, release_connection
from app.downloads import files
from app.downloads import service as links
from app.errors import NotFound
from app.i18n import _, current_language, set_language
from app.integrations.storage.results import ResultStore
from app.integrations.wiring import get_result_store
from app.web.templating import templates

router = APIRouter(prefix="/d", include_in_schema=False)

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
# In the language the browser asks for: the same bytes for every bad link from one browser.
NOT_FOUND_HTML = (
    "<!doctype html><html lang={lang}><head><meta charset=utf-8><title>{title}</title>"
    '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="stylesheet" href="/static/app.css">'
    '</head><body><header class="top"><span class="brand">{brand}</span></header><main id="main">'
    "<h1>{title}</h1><p>{text}</p></main></body></html>"
)


def link_not_found() -> HTMLResponse:
    page = NOT_FOUND_HTML.format(
        lang=current_language(),
        title=_("Not found"),
        brand=_("Retro test results"),
        text=_("This link does not work. Ask the person who sent it for a new one."),
    )
    return HTMLResponse(page, status_code=404, headers=PARTNER_HEADERS)


@router.get("/{token}")
def partner_landing(token: str, request: Request, session: Annotated[Session, Depends(get_session)]) -> Response:
    """The page a partner opens: the job's files with sizes and sha256, each a download."""
    found = links.resolve_link(session=session, token=token)
    if found is None:
        return link_not_found()
    link, job = found
    if job.partner.report_language:
        set_language(job.partner.report_language)  # the partner's page speaks as its report does
    shown = [f for f in job.files if files.find_result_file(job, f.name, partner=True) is not None]
    return templates.TemplateResponse(
        request,
        "partner/landing.html",
        {"job": job, "link": link, "files": shown, "token": token},
        headers=PARTNER_HEADERS,
    )


@router.get("/{token}/{name:path}")
def partner_download(
    token: str,
    name: str,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    store: Annotated[ResultStore, Depends(get_result_store)],
) -> Response:
    """One file of the link's job, whole or a byte range; every download goes to the audit trail."""
    found = links.resolve_link(session=session, token=token)
    if found is None:
        return link_not_found()
    link, job = found
    release_connection(session)  # no connection is held while the file is opened (a network call on s3://)
    try:
        download = files.open_download(
            store=store,
            job=job,
            name=name,
            range_header=request.headers.get("range"),
            if_range=request.headers.get("if-range"),
            partner=True,
        )
    except NotFound:
        return link_not_found()
    except files.RangeNotSatisfiable as exc:
        return files.not_satisfiable(exc.size, PARTNER_HEADERS)
    links.record_download(
        session=session,
        link=link,
        download=download,
        ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
    )
    session.commit()
    return files.stream_slice(fh=download.fh, file=download.file, part=download.part, headers=PARTNER_HEADERS)
