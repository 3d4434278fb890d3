from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.auth.models import Role
from app.validation import NO_CONTROL_PATTERN

Username = Annotated[str, Field(min_length=1, max_length=150, pattern=r"^[A-Za-z0-9_.@+-]+$")]
Password = Annotated[str, Field(min_length=12, max_length=1024)]
TokenName = Annotated[str, Field(min_length=1, max_length=100, pattern=NO_CONTROL_PATTERN)]


class UserCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"username": "jane", "role": "account_manager", "password": "a long passphrase"}]
        },
    )

    username: Username
    role: Role = Role.account_manager
    password: Password | None = Field(default=None, description="Leave out for users who sign in only through SSO")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    is_active: Annotated[bool, Field(strict=True)] | None = None
    password: Password | None = None


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    username: str
    role: Role
    is_active: bool
    created_at: datetime
    last_login_at: datetime | None
    language: str | None = Field(default=None, description="Pages and messages: en, ru; null: Accept-Language")


class MeUpdate(BaseModel):
    """The caller's own settings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"language": "ru"}]})

    language: Literal["en", "ru"] | None = Field(
        description="The language of pages and messages; null: the browser's or the request's Accept-Language"
    )


class MeOut(UserOut):
    partner_codes: list[str] | None = Field(description="The partners this user acts on; null for admins (all)")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "laptop"}]})

    name: TokenName
    expires_in_days: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        default=None, description="Days it lives; RETRO_API_TOKEN_DEFAULT_DAYS unless told, at most the maximum"
    )


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself; shown only now, store it safely")


class PartnerManagers(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"usernames": ["jane"]}]})

    usernames: Annotated[list[Username], Field(max_length=500)]
