"""REST API for the caller's own account and tokens, and (admins) for users."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from sqlalchemy.orm import Session

from app.auth import service
from app.auth.deps import AdminUser, CurrentUser, SignedInUser, current_user
from app.auth.schemas import MeOut, MeUpdate, TokenCreate, TokenCreated, TokenOut, UserCreate, UserOut, UserUpdate
from app.db import get_session

router = APIRouter(prefix="/api/v1", tags=["users and tokens"], dependencies=[Depends(current_user)])

ADMIN_ONLY: dict[int | str, dict[str, Any]] = {403: {"description": "Only admins manage users"}}


@router.get("/me", response_model=MeOut)
def me(user: CurrentUser, session: Annotated[Session, Depends(get_session)]) -> MeOut:
    """The caller, with the partners they act on."""
    codes = None if user.is_admin else service.assigned_partner_codes(session=session, user=user)
    return MeOut(**UserOut.model_validate(user).model_dump(), partner_codes=codes)


@router.patch("/me", response_model=MeOut)
def update_me(data: MeUpdate, user: CurrentUser, session: Annotated[Session, Depends(get_session)]) -> MeOut:
    """Change the caller's own settings: the language of pages and messages."""
    service.set_language(session=session, user=user, language=data.language, actor=user.username)
    session.commit()
    return me(user, session)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(user: CurrentUser, session: Annotated[Session, Depends(get_session)]) -> list[TokenOut]:
    """The caller's API tokens (never the tokens themselves), newest first."""
    return [TokenOut.model_validate(t) for t in service.list_api_tokens(session=session, user=user)]


@router.post(
    "/tokens",
    status_code=201,
    response_model=TokenCreated,
    responses={403: {"description": "Called with an API token: tokens cannot make tokens"}},
)
def create_token(
    data: TokenCreate, user: SignedInUser, session: Annotated[Session, Depends(get_session)]
) -> TokenCreated:
    """A new personal API token for the caller, signed in (not with a token). The token is in this response only."""
    token, secret = service.create_api_token(
        session=session, user=user, name=data.name, actor=user.username, expires_in_days=data.expires_in_days
    )
    session.commit()
    return TokenCreated(**TokenOut.model_validate(token).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", status_code=204, responses={404: {"description": "No such token of yours"}})
def revoke_token(token_id: uuid.UUID, user: CurrentUser, session: Annotated[Session, Depends(get_session)]) -> Response:
    """Revoke one of the caller's tokens; it stops working at once."""
    service.revoke_api_token(session=session, user=user, token_id=token_id, actor=user.username)
    session.commit()
    return Response(status_code=204)


@router.get("/users", response_model=list[UserOut], responses=ADMIN_ONLY)
def list_users(_: AdminUser, session: Annotated[Session, Depends(get_session)]) -> list[UserOut]:
    """Every user (admins)."""
    return [UserOut.model_validate(u) for u in service.list_users(session=session)]


@router.post(
    "/users", status_code=201, response_model=UserOut, responses={409: {"description": "Name taken"}, **ADMIN_ONLY}
)
def create_user(data: UserCreate, admin: AdminUser, session: Annotated[Session, Depends(get_session)]) -> UserOut:
    """Add a user (admins)."""
    user = service.create_user(session=session, data=data, actor=admin.username)
    session.commit()
    return UserOut.model_validate(user)


@router.patch(
    "/users/{user_id}", response_model=UserOut, responses={404: {"description": "No such user"}, **ADMIN_ONLY}
)
def update_user(
    user_id: uuid.UUID, data: UserUpdate, admin: AdminUser, session: Annotated[Session, Depends(get_session)]
) -> UserOut:
    """Change a user's role, password or whether they may sign in (admins)."""
    user = service.update_user(session=session, user_id=user_id, data=data, actor=admin.username)
    session.commit()
    return UserOut.model_validate(user)
