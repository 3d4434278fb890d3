"""Who is calling: the one dependency every API router and web page uses to know the user and their partners."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.auth import service
from app.auth.models import User
from app.auth.scope import ALL_PARTNERS, PartnerScope
from app.db import get_session, release_connection
from app.errors import Forbidden, Unauthorized

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"

bearer = HTTPBearer(
    auto_error=False,
    description="A personal API token: `retrotest create-token --username NAME`, or the web UI's API tokens page.",
)


def sign_in(request: Request, user: User) -> None:
    """Start a signed-in session: a fresh cookie with the user's id and a new CSRF token."""
    request.session.clear()
    request.session["uid"] = str(user.id)
    request.session["csrf"] = secrets.token_urlsafe(32)


def sign_out(request: Request) -> None:
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


def session_user(request: Request, session: Session) -> User | None:
    """The user of the signed-in session cookie, if any and still active."""
    raw = request.session.get("uid")
    if not isinstance(raw, str):
        return None
    try:
        user_id = uuid.UUID(raw)
    except ValueError:
        return None
    return service.active_user(session=session, user_id=user_id)


def current_user(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    """The caller: by `Authorization: Bearer <token>`, else by the session cookie (plus X-CSRF-Token to change things)."""
    if credentials is not None:
        user = service.user_for_api_token(session=session, secret=credentials.credentials)
        release_connection(session)  # and write the token's last-used time, when it was due
        if user is None:
            raise Unauthorized("the API token is unknown or revoked, or its user is deactivated")
        return user
    user = session_user(request, session)
    release_connection(session)
    if user is None:
        raise Unauthorized("sign in, or send `Authorization: Bearer <token>` with a personal API token")
    if request.method not in SAFE_METHODS and not csrf_matches(request, request.headers.get(CSRF_HEADER)):
        raise Forbidden(f"a signed-in browser must send its CSRF token in the {CSRF_HEADER} header to change things")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


async def current_scope(user: CurrentUser, session: Annotated[Session, Depends(get_session)]) -> PartnerScope:
    """The partners the caller may see and act on.

    Async, so that an admin's scope, which needs no query, costs no thread switch; an account manager's is read
    on a thread.
    """
    if user.is_admin:
        return ALL_PARTNERS
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
        raise Forbidden("only an admin may do this")
    return user


AdminUser = Annotated[User, Depends(require_admin)]
