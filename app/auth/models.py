from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import Boolean, DateTime, Enum, ForeignKey, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base


class Role(enum.StrEnum):
    """What a user may do: admins act on every partner and manage users; account managers on their partners."""

    admin = "admin"
    account_manager = "account_manager"


class User(Base):
    """A person who signs in: with a local password, through OIDC, or with a personal API token."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    username: Mapped[str] = mapped_column(String(150), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=32, validate_strings=True))
    # argon2 hash; None for users who only sign in through OIDC.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    # "<issuer> <sub>" of the OIDC identity this user is linked to, once they have signed in that way.
    oidc_subject: Mapped[str | None] = mapped_column(String(512), unique=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Signed-in sessions carry the generation they started in; raising it (sign-out, a new password, a new role,
    # deactivation) ends every session of the user at once.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The language of the pages and messages ("en", "ru"); None: the browser's Accept-Language.
    language: Mapped[str | None] = mapped_column(String(8))

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin


# Usernames are one name whatever their case: `AM2` cannot sit next to `am2`.
Index("uq_users_username_lower", func.lower(User.username), unique=True)


class ApiToken(Base):
    """A personal token for the REST API; only its sha256 is stored, the token itself is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    user: Mapped[User] = relationship(lazy="raise")
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, so a person can tell tokens apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UserPartner(Base):
    """An account manager is assigned to a partner: they see and act on its retro tests."""

    __tablename__ = "user_partners"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    partner_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("partners.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SignInFailure(Base):
    """Failed password sign-ins under one key (an account from an address, an address, an account) in a window."""

    __tablename__ = "sign_in_failures"

    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    window_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
