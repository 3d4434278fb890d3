"""Errors on pages people open in a browser: an HTML page with the same message the API would give."""

from __future__ import annotations

import logging
from typing import Literal
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from app.auth.deps import session_user
from app.auth.models import User
from app.db import get_session_factory
from app.i18n import N_, _
from app.web.deps import render
from app.web.partner import link_not_found

log = logging.getLogger(__name__)

WEB_SECTIONS = frozenset({"", "jobs", "partners", "account", "admin", "login", "logout", "auth"})
TITLES = {401: N_("Please sign in"), 403: N_("Not allowed"), 404: N_("Not found"), 409: N_("Cannot do that now")}


def page_kind(path: str) -> Literal["link", "web", "api"]:
    """Partner link pages, web pages, or everything else (the JSON API, docs, health)."""
    if path == "/d" or path.startswith("/d/"):
        return "link"
    first = path.lstrip("/").split("/", 1)[0]
    return "web" if first in WEB_SECTIONS else "api"


def error_page(request: Request, *, status_code: int, detail: str) -> Response | None:
    """The HTML answer for an error on a web or partner page; None where the answer is JSON."""
    kind = page_kind(request.url.path)
    if kind == "api":
        return None
    if kind == "link":
        return link_not_found()  # whatever went wrong, a partner link says only "not found"
    if status_code == 401:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    signed_in = isinstance(request.session.get("uid"), str)
    title = _(TITLES.get(status_code, N_("Something went wrong") if status_code >= 500 else N_("Cannot do that")))
    user = _signed_in_user(request) if signed_in and status_code < 500 else None
    return render(
        request,
        "error.html",
        {"title": title, "detail": detail, "signed_in": signed_in},
        user=user,
        status_code=status_code,
    )


def _signed_in_user(request: Request) -> User | None:
    """The page's user, so an error page keeps the navigation; None if the database cannot say (never a new error)."""
    try:
        with get_session_factory()() as session:
            user = session_user(request, session)
            if user is not None:
                session.expunge(user)
            return user
    except Exception:
        log.warning("could not load the signed-in user for an error page", exc_info=True)
        return None
