"""Web pages for partners (admins create, edit and assign account managers) and for users (admins)."""

from __future__ import annotations

import uuid
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session

from app.auth import service as auth_service
from app.auth.models import Role, User
from app.auth.schemas import UserCreate, UserUpdate
from app.config import get_settings
from app.core.partners import Partner
from app.core.scope import ALL_PARTNERS
from app.db import get_session
from app.errors import AppError
from app.i18n import N_, _, translate_values
from app.partners import service as partners
from app.partners.schemas import PartnerCreate, PartnerUpdate
from app.web.deps import (
    NO_FEEDBACK,
    Feedback,
    WebAdmin,
    WebScope,
    WebUser,
    csrf_guard,
    field_errors,
    form_errors,
    render,
)

router = APIRouter(include_in_schema=False, dependencies=[Depends(csrf_guard)])

PARTNER_LABELS = {
    "code": N_("Code"),
    "name": N_("Name"),
    "contact_email": N_("Contact e-mail"),
    "report_language": N_("Report language"),
    "usernames": N_("Account managers"),
}
USER_LABELS = {"username": N_("Username"), "role": N_("Role"), "password": N_("Password")}


def _partner_field(name: str | None) -> str:
    return name if name in PARTNER_LABELS else "form"


def _user_field(name: str | None) -> str:
    return name if name in USER_LABELS else "form"


@router.get("/partners", response_class=HTMLResponse)
def partner_list(
    request: Request,
    user: WebUser,
    scope: WebScope,
    session: Annotated[Session, Depends(get_session)],
    deleted: Annotated[str, Query(max_length=64)] = "",
) -> HTMLResponse:
    """Partners the user acts on (every partner for admins), with their account managers."""
    rows = partners.list_partners(session=session, scope=scope)
    managers = {
        p.id: [u.username for u in auth_service.partner_managers(session=session, partner_id=p.id)] for p in rows
    }
    notice = _("Partner {code} was deleted.").format(code=deleted) if deleted else None
    return render(
        request,
        "partners/list.html",
        {"active": "partners", "partners": rows, "managers": managers, "notice": notice},
        user=user,
    )


def _partner_page(
    request: Request,
    session: Session,
    user: User,
    *,
    partner: Partner | None,
    form: dict[str, object],
    feedback: Feedback = NO_FEEDBACK,
) -> HTMLResponse:
    candidates = [u for u in auth_service.list_users(session=session) if u.role == Role.account_manager]
    return render(
        request,
        "partners/form.html",
        {
            "active": "partners",
            "partner": partner,
            "form": form,
            "errors": feedback.errors,
            "labels": translate_values(PARTNER_LABELS),
            "default_language": get_settings().default_language,
            "candidates": candidates,
            "notice": feedback.notice,
            "job_count": partners.count_retro_tests(session=session, partner_id=partner.id) if partner else 0,
        },
        user=user,
        status_code=feedback.status_code,
    )


@router.get("/partners/new", response_class=HTMLResponse)
def new_partner_form(
    request: Request, admin: WebAdmin, session: Annotated[Session, Depends(get_session)]
) -> HTMLResponse:
    form: dict[str, object] = {"code": "", "name": "", "contact_email": "", "report_language": ""}
    return _partner_page(request, session, admin, partner=None, form=form)


@router.post("/partners/new", response_class=HTMLResponse)
def create_partner(
    request: Request,
    admin: WebAdmin,
    session: Annotated[Session, Depends(get_session)],
    code: Annotated[str, Form(max_length=200)] = "",
    name: Annotated[str, Form(max_length=400)] = "",
    contact_email: Annotated[str, Form(max_length=400)] = "",
    report_language: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    form: dict[str, object] = {
        "code": code,
        "name": name,
        "contact_email": contact_email,
        "report_language": report_language,
    }
    try:
        data = PartnerCreate.model_validate(
            {
                "code": code,
                "name": name,
                "contact_email": contact_email or None,
                "report_language": report_language or None,
            }
        )
        partner = partners.create_partner(session=session, data=data, actor=admin.username)
    except (ValidationError, AppError) as exc:
        session.rollback()
        errors, status = form_errors(exc, _partner_field)
        feedback = Feedback(errors=errors, status_code=status)
        return _partner_page(request, session, admin, partner=None, form=form, feedback=feedback)
    session.commit()
    return RedirectResponse(f"/partners/{partner.id}?saved=1", status_code=303)


@router.get("/partners/{partner_id}", response_class=HTMLResponse)
def edit_partner_form(
    partner_id: uuid.UUID,
    request: Request,
    admin: WebAdmin,
    session: Annotated[Session, Depends(get_session)],
    saved: Annotated[str, Query(max_length=8)] = "",
) -> HTMLResponse:
    partner = partners.get_partner(session=session, partner_id=partner_id, scope=ALL_PARTNERS)
    form: dict[str, object] = {
        "name": partner.name,
        "contact_email": partner.contact_email or "",
        "report_language": partner.report_language or "",
        "managers": [u.username for u in auth_service.partner_managers(session=session, partner_id=partner.id)],
    }
    notice = _("Saved.") if saved else None
    return _partner_page(request, session, admin, partner=partner, form=form, feedback=Feedback(notice=notice))


class PartnerForm(BaseModel):
    """The partner form as the browser sends it."""

    name: str = Field(default="", max_length=400)
    contact_email: str = Field(default="", max_length=400)
    report_language: str = Field(default="", max_length=8)
    managers: list[str] = []


@router.post("/partners/{partner_id}", response_class=HTMLResponse)
def update_partner(
    partner_id: uuid.UUID,
    request: Request,
    admin: WebAdmin,
    session: Annotated[Session, Depends(get_session)],
    fields: Annotated[PartnerForm, Form()],
) -> Response:
    """Save a partner's name, contact and account managers together."""
    partner = partners.get_partner(session=session, partner_id=partner_id, scope=ALL_PARTNERS)
    form: dict[str, object] = fields.model_dump()
    try:
        data = PartnerUpdate.model_validate(
            {
                "name": fields.name,
                "contact_email": fields.contact_email or None,
                "report_language": fields.report_language or None,
            }
        )
        partners.update_partner(session=session, partner_id=partner.id, data=data, actor=admin.username)
        auth_service.set_partner_managers(
            session=session, partner=partner, usernames=fields.managers, actor=admin.username
        )
    except (ValidationError, AppError) as exc:
        session.rollback()
        errors, status = form_errors(exc, _partner_field)
        feedback = Feedback(errors=errors, status_code=status)
        return _partner_page(request, session, admin, partner=partner, form=form, feedback=feedback)
    session.commit()
    return RedirectResponse(f"/partners/{partner.id}?saved=1", status_code=303)


@router.post("/partners/{partner_id}/delete", response_class=HTMLResponse)
def delete_partner(
    partner_id: uuid.UUID, request: Request, admin: WebAdmin, session: Annotated[Session, Depends(get_session)]
) -> Response:
    partner = partners.get_partner(session=session, partner_id=partner_id, scope=ALL_PARTNERS)
    code = partner.code
    try:
        partners.delete_partner(session=session, partner_id=partner.id, actor=admin.username)
    except AppError as exc:
        session.rollback()
        form: dict[str, object] = {
            "name": partner.name,
            "contact_email": partner.contact_email or "",
            "report_language": partner.report_language or "",
            "managers": [u.username for u in auth_service.partner_managers(session=session, partner_id=partner.id)],
        }
        feedback = Feedback(errors={"form": exc.detail}, status_code=exc.status_code)
        return _partner_page(request, session, admin, partner=partner, form=form, feedback=feedback)
    session.commit()
    return RedirectResponse(f"/partners?deleted={quote(code)}", status_code=303)


def _users_page(
    request: Request, session: Session, admin: User, *, form: dict[str, str], feedback: Feedback = NO_FEEDBACK
) -> HTMLResponse:
    return render(
        request,
        "admin/users.html",
        {
            "active": "users",
            "users": auth_service.list_users(session=session),
            "roles": list(Role),
            "form": form,
            "errors": feedback.errors,
            "labels": translate_values(USER_LABELS),
            "notice": feedback.notice,
            "action_error": feedback.action_error,
        },
        user=admin,
        status_code=feedback.status_code,
    )


_EMPTY_USER = {"username": "", "role": Role.account_manager.value}


@router.get("/admin/users", response_class=HTMLResponse)
def users_page(
    request: Request,
    admin: WebAdmin,
    session: Annotated[Session, Depends(get_session)],
    saved: Annotated[str, Query(max_length=150)] = "",
) -> HTMLResponse:
    notice = _("Saved {user}.").format(user=saved) if saved else None
    return _users_page(request, session, admin, form=dict(_EMPTY_USER), feedback=Feedback(notice=notice))


@router.post("/admin/users", response_class=HTMLResponse)
def create_user(
    request: Request,
    admin: WebAdmin,
    session: Annotated[Session, Depends(get_session)],
    username: Annotated[str, Form(max_length=400)] = "",
    role: Annotated[str, Form(max_length=40)] = Role.account_manager.value,
    password: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    form = {"username": username, "role": role}
    try:
        data = UserCreate.model_validate({"username": username, "role": role, "password": password or None})
        user = auth_service.create_user(session=session, data=data, actor=admin.username)
    except (ValidationError, AppError) as exc:
        session.rollback()
        errors, status = form_errors(exc, _user_field)
        return _users_page(request, session, admin, form=form, feedback=Feedback(errors=errors, status_code=status))
    session.commit()
    return RedirectResponse(f"/admin/users?saved={quote(user.username)}", status_code=303)


@router.post("/admin/users/{user_id}", response_class=HTMLResponse)
def update_user(
    user_id: uuid.UUID,
    request: Request,
    admin: WebAdmin,
    session: Annotated[Session, Depends(get_session)],
    role: Annotated[str, Form(max_length=40)] = "",
    is_active: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """Change a user's role and whether they may sign in."""
    try:
        data = UserUpdate.model_validate({"role": role, "is_active": is_active == "true"})
        user = auth_service.update_user(session=session, user_id=user_id, data=data, actor=admin.username)
    except ValidationError as exc:
        message = "; ".join(field_errors(exc).values())
        feedback = Feedback(action_error=message, status_code=422)
        return _users_page(request, session, admin, form=dict(_EMPTY_USER), feedback=feedback)
    except AppError as exc:
        session.rollback()
        feedback = Feedback(action_error=exc.detail, status_code=exc.status_code)
        return _users_page(request, session, admin, form=dict(_EMPTY_USER), feedback=feedback)
    session.commit()
    return RedirectResponse(f"/admin/users?saved={quote(user.username)}", status_code=303)
