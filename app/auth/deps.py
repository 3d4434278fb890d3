"""Who is calling: the one dependency every API router and web page uses to know the user and their partners."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import service
from app.auth.models import User
from app.auth.token_checks import TokenCheck, recent_checks
from app.config import get_settings
from app.core.scope import ALL_PARTNERS, PartnerScope
from app.db import get_session, release_connection
from app.errors import Forbidden, Unauthorized
from app.i18n import _, set_language

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SEEN_RESOLUTION_S = 30  # how stale a session's last-use time may get before a request notes it again
CSRF_HEADER = "X-CSRF-Token"

bearer = HTTPBearer(
    auto_error=False,
    description="A personal API token: `retrotest create-token --username NAME`, or the web UI's API tokens page.",
)


def _now() -> int:
    return int(time.time())


def sign_in(request: Request, user: User) -> None:
    """Start a signed-in session: a fresh cookie with the user's id and session generation, its start (for the
    absolute lifetime) and last use (for the idle one), and a new CSRF token."""
    now = _now()
    request.session.clear()
    request.session.update(
        {
            "uid": str(user.id),
            "gen": user.session_generation,
            "iat": now,
            "seen": now,
            "csrf": secrets.token_urlsafe(32),
        }
    )


def sign_out(request: Request, session: Session) -> None:
    """End this browser's session and, through the user's session generation, every copy of its cookie."""
    user = session_user(request, session)
    if user is not None:
        service.end_sessions(session=session, user=user)
        session.commit()
    request.session.clear()


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (the sign-in form needs one before anyone is signed in)."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


def csrf_matches(request: Request, presented: str | None) -> bool:
    expected = request.session.get("csrf")
    return isinstance(expected, str) and presented is not None and secrets.compare_digest(expected, presented)


def _session_alive(request: Request) -> bool:
    """Whether the cookie's session is within its absolute and idle lifetimes; notes this use when it is."""
    settings = get_settings()
    started, seen, now = request.session.get("iat"), request.session.get("seen"), _now()
    if not isinstance(started, int) or not isinstance(seen, int):
        return False
    if now - started > settings.session_max_age_s or now - seen > settings.session_idle_s:
        return False
    if now - seen >= _SEEN_RESOLUTION_S:
        request.session["seen"] = now
    return True


def session_user(request: Request, session: Session) -> User | None:
    """The user of the signed-in session cookie, if any, still active, and the session neither ended nor expired."""
    raw, generation = request.session.get("uid"), request.session.get("gen")
    if not isinstance(raw, str) or not isinstance(generation, int) or not _session_alive(request):
        return None
    try:
        user_id = uuid.UUID(raw)
    except ValueError:
        return None
    user = service.active_user(session=session, user_id=user_id, generation=generation)
    if user is not None and user.language:
        set_language(user.language)  # the profile's language over the browser's
    return user


async def current_user(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    """The caller: by `Authorization: Bearer <token>`, else by the session cookie (plus X-CSRF-Token to change things).

    A read with an API token checked a moment ago in this process reuses that check (app/auth/token_checks.py):
    no thread switch, no query. Everything else is checked on a thread, against the database.
    """
    if credentials is None or request.method not in SAFE_METHODS or not service.is_api_token(credentials.credentials):
        return await run_in_threadpool(_checked_caller, request, session, credentials)
    digest = service.secret_digest(credentials.credentials)
    check = recent_checks().get(digest)
    if check is None:
        check = await run_in_threadpool(_checked_token, session, digest)
        if check is None:
            raise Unauthorized(_("the API token is unknown, revoked or expired, or its user is deactivated"))
    request.state.token_scope = check.scope
    _note_token_user(request, check.user)
    return check.user


def _checked_token(session: Session, digest: str) -> TokenCheck | None:
    """The holder of a token and the partners they may see, from the database; kept for the next reads."""
    found = service.api_token_holder(session=session, digest=digest)
    if found is None:
        release_connection(session)
        return None
    user, expires_at = found
    check = TokenCheck(user=user, scope=service.partner_scope(session=session, user=user))
    release_connection(session)  # and write the token's last-used time, when it was due
    recent_checks().put(digest, check, token_expires_at=expires_at)
    return check


def _note_token_user(request: Request, user: User) -> None:
    request.state.via_api_token = True
    if user.language and "accept-language" not in request.headers:
        set_language(user.language)  # a script's own Accept-Language wins over the profile


def _checked_caller(request: Request, session: Session, credentials: HTTPAuthorizationCredentials | None) -> User:
    if credentials is not None:
        user = service.user_for_api_token(session=session, secret=credentials.credentials)
        release_connection(session)  # and write the token's last-used time, when it was due
        if user is None:
            raise Unauthorized(_("the API token is unknown, revoked or expired, or its user is deactivated"))
        _note_token_user(request, user)
        return user
    user = session_user(request, session)
    release_connection(session)
    if user is None:
        raise Unauthorized(_("sign in, or send `Authorization: Bearer <token>` with a personal API token"))
    if request.method not in SAFE_METHODS and not csrf_matches(request, request.headers.get(CSRF_HEADER)):
        raise Forbidden(
            _("a signed-in browser must send its CSRF token in the {csrf_header} header to change things").format(
                csrf_header=CSRF_HEADER
            )
        )
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def optional_caller(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User | None:
    """The caller if they sent credentials that hold, else None (for routes open to anyone that show more to some)."""
    if credentials is not None:
        user = service.user_for_api_token(session=session, secret=credentials.credentials)
    else:
        user = session_user(request, session)
    release_connection(session)
    return user


def signed_in_user(request: Request, user: CurrentUser) -> User:
    """The caller, signed in with a password or SSO: an API token may not do this (e.g. make more tokens, which
    would outlive its own revocation)."""
    if getattr(request.state, "via_api_token", False):
        raise Forbidden(_("an API token cannot do this; sign in to the web UI (API tokens page) instead"))
    return user


SignedInUser = Annotated[User, Depends(signed_in_user)]


async def current_scope(
    request: Request, user: CurrentUser, session: Annotated[Session, Depends(get_session)]
) -> PartnerScope:
    """The partners the caller may see and act on.

    Async, so that an admin's scope, which needs no query, costs no thread switch, nor does one read with the
    token's check (current_user); an account manager's is otherwise read on a thread.
    """
    if user.is_admin:
        return ALL_PARTNERS
    scope: PartnerScope | None = getattr(request.state, "token_scope", None)
    if scope is not None:
        return scope
    return await run_in_threadpool(_assigned_scope, session, user)


def _assigned_scope(session: Session, user: User) -> PartnerScope:
    scope = service.partner_scope(session=session, user=user)
    release_connection(session)
    return scope


CurrentScope = Annotated[PartnerScope, Depends(current_scope)]


@dataclass(frozen=True)
class Caller:
    """Who makes an API request and the partners they may see and act on."""

    user: User
    scope: PartnerScope


def current_caller(user: CurrentUser, scope: CurrentScope) -> Caller:
    return Caller(user=user, scope=scope)


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def require_admin(user: CurrentUser) -> User:
    """The caller, who must be an admin."""
    if not user.is_admin:
        raise Forbidden(_("only an admin may do this"))
    return user


AdminUser = Annotated[User, Depends(require_admin)]
