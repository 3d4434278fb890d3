"""Web pages to sign in and out (password or OIDC) and to manage one's own API tokens."""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth import oidc, throttle
from app.auth import service as auth_service
from app.auth.deps import session_user, sign_in, sign_out
from app.auth.models import User
from app.auth.schemas import TokenCreate
from app.config import Settings, get_settings
from app.db import get_session
from app.errors import AppError, NotFound
from app.i18n import N_, _
from app.web.deps import NO_FEEDBACK, Feedback, WebUser, csrf_guard, field_errors, render

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_guard)])

_USERNAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,150}$")
OIDC_CALLBACK = "/auth/oidc/callback"
WRONG_PASSWORD = N_("Wrong username or password, or the account is deactivated.")


def safe_next(value: str | None) -> str:
    """Where to go after signing in: only a path on this site, never another host."""
    if not value:
        return "/jobs"
    on_site = value.startswith("/") and not value.startswith("//") and "\\" not in value
    return value if on_site and not any(ord(c) < 32 for c in value) else "/jobs"


def _login_page(
    request: Request, settings: Settings, *, next_url: str, username: str = "", error: str | None, status_code: int
) -> HTMLResponse:
    return render(
        request,
        "login.html",
        {"next": next_url, "username": username, "error": error, "oidc_enabled": settings.oidc_enabled()},
        user=None,
        status_code=status_code,
    )


def _signed_in(request: Request, session: Session, user: User, *, via: str, next_url: str) -> RedirectResponse:
    record(
        session=session,
        actor=user.username,
        action="user.sign_in",
        subject_type="user",
        subject_id=user.id,
        via=via,
        ip=request.client.host if request.client else None,
    )
    session.commit()
    sign_in(request, user)
    return RedirectResponse(safe_next(next_url), status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
    next: Annotated[str, Query(max_length=2000)] = "/jobs",
) -> Response:
    if session_user(request, session) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, settings, next_url=safe_next(next), error=None, status_code=200)


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/jobs",
) -> Response:
    """Check a username and password (unless throttled); on success start a session (a new cookie and CSRF token)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in username):
        # No account has such a name, and PostgreSQL cannot even hold a NUL to look it up: a wrong name, at once.
        return _login_page(request, settings, next_url=safe_next(next), error=_(WRONG_PASSWORD), status_code=401)
    address = request.client.host if request.client else "?"
    counted = throttle.bars(settings=settings, username=username, address=address)
    try:
        address_wait_s = throttle.check(session=session, checked=counted)
        user = auth_service.authenticate(session=session, username=username, password=password)
        if user is None:
            log.warning("failed sign-in for %r from %s", username[:150], address)
            throttle.note_failure(session=session, settings=settings, failed=counted)
            session.commit()
            if address_wait_s:
                raise throttle.TooManySignIns(address_wait_s)
            return _login_page(
                request, settings, next_url=safe_next(next), username=username, error=_(WRONG_PASSWORD), status_code=401
            )
        throttle.admit(session=session, settings=settings, checked=counted, address_wait_s=address_wait_s)
    except throttle.TooManySignIns as exc:
        page = _login_page(
            request, settings, next_url=safe_next(next), username=username, error=exc.detail, status_code=429
        )
        page.headers["Retry-After"] = str(exc.retry_after_s)
        return page
    throttle.note_success(session=session, succeeded=counted)
    return _signed_in(request, session, user, via="password", next_url=next)


@router.post("/logout")
def logout(request: Request, session: Annotated[Session, Depends(get_session)]) -> RedirectResponse:
    """Sign out: this cookie, and every other of the same user, stops working at once."""
    sign_out(request, session)
    return RedirectResponse("/login", status_code=303)


@router.get("/auth/oidc/start")
def oidc_start(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    next: Annotated[str, Query(max_length=2000)] = "/jobs",
) -> RedirectResponse:
    """Send the browser to the identity provider, remembering state, nonce and PKCE verifier in the session."""
    if not settings.oidc_enabled():
        raise NotFound(_("single sign-on is not configured"))
    auth = oidc.start(settings, redirect_uri=settings.public_base_url.rstrip("/") + OIDC_CALLBACK)
    request.session["oidc"] = {
        "state": auth.state,
        "nonce": auth.nonce,
        "verifier": auth.verifier,
        "next": safe_next(next),
    }
    return RedirectResponse(auth.url, status_code=303)


@router.get(OIDC_CALLBACK, response_class=HTMLResponse)
def oidc_callback(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
    code: Annotated[str, Query(max_length=4096)] = "",
    state: Annotated[str, Query(max_length=512)] = "",
    error: Annotated[str, Query(max_length=200)] = "",
) -> Response:
    """The identity provider sends the browser back here; verify everything before signing anyone in."""
    if not settings.oidc_enabled():
        raise NotFound(_("single sign-on is not configured"))
    pending = request.session.pop("oidc", None)
    next_url = pending.get("next", "/jobs") if isinstance(pending, dict) else "/jobs"

    def refuse(message: str, status_code: int = 401) -> HTMLResponse:
        return _login_page(request, settings, next_url=next_url, error=message, status_code=status_code)

    if error:
        return refuse(_("Single sign-on did not complete: {error}.").format(error=error))
    if not isinstance(pending, dict) or not state or not secrets.compare_digest(str(pending.get("state")), state):
        return refuse(_("This single sign-on answer does not belong to a sign-in started here; try again."))
    try:
        claims = oidc.finish(
            settings,
            code=code,
            redirect_uri=settings.public_base_url.rstrip("/") + OIDC_CALLBACK,
            verifier=str(pending["verifier"]),
            nonce=str(pending["nonce"]),
        )
    except AppError as exc:
        return refuse(_("Single sign-on failed: {detail}").format(detail=exc.detail), exc.status_code)
    username = str(claims.get(settings.oidc_username_claim) or "")
    if not _USERNAME.fullmatch(username):
        return refuse(
            _("Your single sign-on account has no usable {claim}.").format(claim=repr(settings.oidc_username_claim)),
            403,
        )
    user = auth_service.sign_in_oidc(
        session=session,
        subject=f"{claims['iss']} {claims['sub']}",
        username=username,
        create=settings.oidc_create_users,
    )
    if user is None:
        session.rollback()
        return refuse(_("{username} may not sign in here; ask an admin.").format(username=repr(username)), 403)
    return _signed_in(request, session, user, via="oidc", next_url=next_url)


def _tokens_page(
    request: Request,
    session: Session,
    user: User,
    *,
    form: dict[str, str],
    feedback: Feedback = NO_FEEDBACK,
    new_token: str | None = None,
) -> HTMLResponse:
    return render(
        request,
        "account/tokens.html",
        {
            "active": "tokens",
            "tokens": auth_service.list_api_tokens(session=session, user=user),
            "form": form,
            "errors": feedback.errors,
            "labels": {"name": _("Token name")},
            "new_token": new_token,
            "notice": feedback.notice,
        },
        user=user,
        status_code=feedback.status_code,
    )


@router.get("/account/tokens", response_class=HTMLResponse)
def tokens_page(
    request: Request,
    user: WebUser,
    session: Annotated[Session, Depends(get_session)],
    saved: Annotated[str, Query(max_length=8)] = "",
) -> HTMLResponse:
    notice = _("Language saved.") if saved else None
    return _tokens_page(request, session, user, form={"name": ""}, feedback=Feedback(notice=notice))


@router.post("/account/language")
def save_language(
    user: WebUser,
    session: Annotated[Session, Depends(get_session)],
    language: Annotated[str, Form(max_length=8)] = "",
) -> RedirectResponse:
    """The user's language for pages and messages; empty: as the browser asks (Accept-Language)."""
    auth_service.set_language(session=session, user=user, language=language or None, actor=user.username)
    session.commit()
    return RedirectResponse("/account/tokens?saved=1", status_code=303)


@router.post("/account/tokens", response_class=HTMLResponse)
def create_token(
    request: Request,
    user: WebUser,
    session: Annotated[Session, Depends(get_session)],
    name: Annotated[str, Form(max_length=400)] = "",
) -> HTMLResponse:
    """Create a personal API token and show it this once."""
    try:
        data = TokenCreate(name=name)
    except ValidationError as exc:
        feedback = Feedback(errors=field_errors(exc), status_code=422)
        return _tokens_page(request, session, user, form={"name": name}, feedback=feedback)
    _, secret = auth_service.create_api_token(session=session, user=user, name=data.name, actor=user.username)
    session.commit()
    return _tokens_page(request, session, user, form={"name": ""}, feedback=Feedback(status_code=201), new_token=secret)


@router.post("/account/tokens/{token_id}/revoke")
def revoke_token(
    token_id: uuid.UUID, user: WebUser, session: Annotated[Session, Depends(get_session)]
) -> RedirectResponse:
    auth_service.revoke_api_token(session=session, user=user, token_id=token_id, actor=user.username)
    session.commit()
    return RedirectResponse("/account/tokens", status_code=303)
