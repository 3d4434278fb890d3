"""What every web page needs: the signed-in user, CSRF checks on forms, and rendering with safe headers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.deps import SAFE_METHODS, csrf_matches, csrf_token, session_user
from app.auth.models import User
from app.config import Settings, get_settings
from app.core.scope import PartnerScope
from app.db import get_session, release_connection
from app.errors import AppError, Forbidden, Unauthorized
from app.i18n import _
from app.validation import error_message
from app.web.templating import templates

WEB_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
}


CSRF_QUERY = "csrf_token"


class SignInRequired(Unauthorized):
    """A page needs a signed-in user; the browser is sent to the sign-in page."""

    code = "sign_in_required"


def web_user(request: Request, session: Annotated[Session, Depends(get_session)]) -> User:
    """The signed-in user of this browser, or SignInRequired."""
    user = session_user(request, session)
    release_connection(session)
    if user is None:
        raise SignInRequired(_("sign in to see this page"))
    return user


WebUser = Annotated[User, Depends(web_user)]


def web_scope(user: WebUser, session: Annotated[Session, Depends(get_session)]) -> PartnerScope:
    scope = auth_service.partner_scope(session=session, user=user)
    release_connection(session)
    return scope


WebScope = Annotated[PartnerScope, Depends(web_scope)]


def web_admin(user: WebUser) -> User:
    if not user.is_admin:
        raise Forbidden(_("only an admin may open this page"))
    return user


WebAdmin = Annotated[User, Depends(web_admin)]


@dataclass(frozen=True)
class Page:
    """What a signed-in page works with: the request, the user and the partners they may see, the database, the
    settings."""

    request: Request
    user: User
    scope: PartnerScope
    session: Session
    settings: Settings


def web_page(
    request: Request,
    user: WebUser,
    scope: WebScope,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Page:
    return Page(request=request, user=user, scope=scope, session=session, settings=settings)


WebPage = Annotated[Page, Depends(web_page)]


@dataclass(frozen=True)
class Feedback:
    """What a page says about the action that led to it: errors by field, a notice, an error of the whole action,
    and the status it is answered with."""

    errors: dict[str, str] = field(default_factory=dict)
    notice: str | None = None
    action_error: str | None = None
    status_code: int = 200


NO_FEEDBACK = Feedback()  # a page opened, not answered after an action


async def csrf_guard(request: Request) -> None:
    """Every form that changes something carries the session's CSRF token; refuse it otherwise.

    An upload form carries it in its action URL's query (CSRF_QUERY) as well, so that it is checked before the
    body is read; other forms in a field of the form.
    """
    if request.method in SAFE_METHODS:
        return
    presented: object = request.query_params.get(CSRF_QUERY)
    if presented is None:
        presented = (await request.form()).get("csrf_token")
    if not isinstance(presented, str) or not csrf_matches(request, presented):
        raise Forbidden(_("the form's security token is missing or out of date; reload the page and try again"))


def render(
    request: Request, template: str, context: dict[str, Any], *, user: User | None, status_code: int = 200
) -> HTMLResponse:
    """A page with the user, the CSRF token for its forms, and the web security headers."""
    return templates.TemplateResponse(
        request,
        template,
        {"user": user, "csrf_token": csrf_token(request), **context},
        status_code=status_code,
        headers=WEB_HEADERS,
    )


def field_errors(exc: ValidationError) -> dict[str, str]:
    """Pydantic's first error per field (a model-level one under "__root__"), with the API's messages."""
    errors: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        name = loc[0] if loc else "__root__"
        errors.setdefault(name, error_message(err))
    return errors


def form_errors(exc: ValidationError | AppError, field_of: Callable[[str | None], str]) -> tuple[dict[str, str], int]:
    """A refused form's messages by the form field they belong to (field_of), and the status to answer with."""
    if isinstance(exc, AppError):
        return {field_of(exc.field): exc.detail}, exc.status_code
    errors: dict[str, str] = {}
    for name, message in field_errors(exc).items():
        errors.setdefault(field_of(name), message)
    return errors, 422
