"""Users, passwords, personal API tokens and which partners each account manager is assigned to."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import ApiToken, Role, User, UserPartner
from app.auth.schemas import UserCreate, UserUpdate
from app.clock import as_utc, utcnow
from app.config import get_settings
from app.core.partners import Partner
from app.core.scope import ALL_PARTNERS, PartnerScope
from app.errors import Conflict, Invalid, NotFound
from app.i18n import LANGUAGES, _

API_TOKEN_PREFIX = "rtk_"
# How stale last_used_at may get before a request writes it again: one write per token per minute at most.
_LAST_USED_RESOLUTION = timedelta(minutes=1)

_hasher = PasswordHasher()
# Checked when the user does not exist, so a wrong username takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """An argon2id hash of password."""
    return _hasher.hash(password)


def _password_matches(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def secret_digest(secret: str) -> str:
    """sha256 of a random secret (API or link token): enough for 256 random bits, and fast to look up."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def find_user(*, session: Session, username: str) -> User | None:
    """The user of this name, whatever its case."""
    return session.scalars(select(User).where(func.lower(User.username) == username.lower())).one_or_none()


def get_user(*, session: Session, user_id: uuid.UUID) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(_("no user with id {user_id}").format(user_id=user_id))
    return user


def list_users(*, session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def create_user(*, session: Session, data: UserCreate, actor: str) -> User:
    """Add a user; the username must be new."""
    if find_user(session=session, username=data.username) is not None:
        raise Conflict(
            _("a user named {username} already exists").format(username=repr(data.username)), field="username"
        )
    user = User(
        username=data.username,
        role=data.role,
        password_hash=hash_password(data.password) if data.password else None,
        is_active=True,
    )
    session.add(user)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict(
            _("a user named {username} already exists").format(username=repr(data.username)), field="username"
        ) from None
    record(
        session=session,
        actor=actor,
        action="user.create",
        subject_type="user",
        subject_id=user.id,
        username=user.username,
        role=user.role.value,
    )
    return user


def _active_admins(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User).where(User.role == Role.admin, User.is_active)) or 0


def update_user(*, session: Session, user_id: uuid.UUID, data: UserUpdate, actor: str) -> User:
    """Change a user's role, password or whether they may sign in; the last active admin stays one."""
    user = get_user(session=session, user_id=user_id)
    stays_admin = (data.role or user.role) == Role.admin and (
        user.is_active if data.is_active is None else data.is_active
    )
    if user.is_admin and user.is_active and not stays_admin and _active_admins(session) <= 1:
        raise Conflict(
            _("{username} is the last active admin; make another admin first").format(username=repr(user.username))
        )
    ends_sessions = (
        (data.role is not None and data.role != user.role)
        or (data.is_active is not None and data.is_active != user.is_active)
        or data.password is not None
    )
    if data.role is not None:
        user.role = data.role
    if data.is_active is not None:
        user.is_active = data.is_active
    if data.password is not None:
        user.password_hash = hash_password(data.password)
    if ends_sessions:
        user.session_generation += 1
    session.flush()
    changes = data.model_dump(exclude_unset=True, exclude={"password"}, mode="json")
    if data.password is not None:
        changes["password"] = "changed"
    record(session=session, actor=actor, action="user.update", subject_type="user", subject_id=user.id, **changes)
    if data.password is not None:
        _revoke_all_tokens(session=session, user=user, actor=actor)
    return user


def _revoke_all_tokens(*, session: Session, user: User, actor: str) -> None:
    """A new password is set by an admin, after a leak or a handover: whatever the old holder made stops working
    too, tokens as well as sessions (docs/security.md, issue 26)."""
    revoked = session.scalars(
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .returning(ApiToken.id)
    ).all()
    if revoked:
        record(
            session=session,
            actor=actor,
            action="api_token.revoke",
            subject_type="user",
            subject_id=user.id,
            token_ids=[str(t) for t in revoked],
            reason="password reset",
        )


def authenticate(*, session: Session, username: str, password: str) -> User | None:
    """The active user with this username and password, or None; upgrades an outdated hash."""
    user = find_user(session=session, username=username)
    stored = user.password_hash if user is not None else None
    if not _password_matches(stored, password) or user is None or not user.is_active:
        return None
    if stored is not None and _hasher.check_needs_rehash(stored):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    session.flush()
    return user


def set_language(*, session: Session, user: User, language: str | None, actor: str) -> None:
    """A user's language for pages and messages ("en", "ru"), or None for the browser's Accept-Language."""
    if language is not None and language not in LANGUAGES:
        raise Invalid(
            _("unknown language {language}; use one of: {known}").format(
                language=repr(language), known=", ".join(LANGUAGES)
            ),
            field="language",
        )
    user.language = language
    session.flush()
    record(
        session=session, actor=actor, action="user.language", subject_type="user", subject_id=user.id, language=language
    )


def end_sessions(*, session: Session, user: User) -> None:
    """End every signed-in session of user at once (sign-out): their cookies no longer match."""
    user.session_generation += 1
    session.flush()


def create_api_token(
    *, session: Session, user: User, name: str, actor: str, expires_in_days: int | None = None
) -> tuple[ApiToken, str]:
    """A new personal API token for user: returns the row and the token, which is never stored or shown again.

    It expires after expires_in_days (RETRO_API_TOKEN_DEFAULT_DAYS unless told, RETRO_API_TOKEN_MAX_DAYS at most).
    """
    settings = get_settings()
    if expires_in_days is None:
        expires_in_days = settings.api_token_default_days
    if expires_in_days > settings.api_token_max_days:
        raise Invalid(
            _("an API token lives at most {api_token_max_days} days").format(
                api_token_max_days=settings.api_token_max_days
            ),
            field="expires_in_days",
        )
    secret = API_TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    token = ApiToken(
        user_id=user.id,
        name=name,
        token_hash=secret_digest(secret),
        prefix=secret[:12],
        expires_at=utcnow() + timedelta(days=expires_in_days),
    )
    session.add(token)
    session.flush()
    record(
        session=session,
        actor=actor,
        action="api_token.create",
        subject_type="user",
        subject_id=user.id,
        token_id=str(token.id),
        name=name,
        expires_at=token.expires_at.isoformat(),
    )
    return token, secret


def list_api_tokens(*, session: Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at.desc()))
    )


def revoke_api_token(*, session: Session, user: User, token_id: uuid.UUID, actor: str) -> ApiToken:
    """Revoke one of user's tokens; it stops working at once."""
    token = session.get(ApiToken, token_id)
    if token is None or token.user_id != user.id:
        raise NotFound(_("you have no API token with id {token_id}").format(token_id=token_id))
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        session.flush()
        record(
            session=session,
            actor=actor,
            action="api_token.revoke",
            subject_type="user",
            subject_id=user.id,
            token_id=str(token.id),
        )
    return token


# The active user of an unrevoked, unexpired token, with the token's id and last use; built once, as every API
# request runs it.
_TOKEN_USER = (
    select(User, ApiToken.id, ApiToken.last_used_at, ApiToken.expires_at)
    .join(ApiToken, ApiToken.user_id == User.id)
    .where(
        ApiToken.token_hash == bindparam("token_hash"),
        ApiToken.revoked_at.is_(None),
        ApiToken.expires_at > bindparam("now"),
        User.is_active,
    )
)


def user_for_api_token(*, session: Session, secret: str) -> User | None:
    """The active user a presented token belongs to, or None if it is unknown, revoked or expired; notes its use."""
    found = api_token_holder(session=session, digest=secret_digest(secret)) if is_api_token(secret) else None
    return found[0] if found is not None else None


def is_api_token(secret: str) -> bool:
    """Whether secret is shaped like an API token at all (anything else is refused without a query)."""
    return secret.startswith(API_TOKEN_PREFIX) and len(secret) <= 200


def api_token_holder(*, session: Session, digest: str) -> tuple[User, datetime] | None:
    """The active user of the unrevoked, unexpired token of this digest, and when the token expires; notes its use."""
    now = utcnow()
    row = session.execute(_TOKEN_USER, {"token_hash": digest, "now": now}).one_or_none()
    if row is None:
        return None
    user, token_id, last_used_at, expires_at = row
    if last_used_at is None or now - as_utc(last_used_at) > _LAST_USED_RESOLUTION:
        session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now))
    return user, expires_at


def active_user(*, session: Session, user_id: uuid.UUID, generation: int) -> User | None:
    """The user of a signed-in session, if they still exist, may sign in and have not ended it since."""
    user = session.get(User, user_id)
    if user is None or not user.is_active or user.session_generation != generation:
        return None
    return user


def partner_scope(*, session: Session, user: User) -> PartnerScope:
    """Every partner for an admin; the assigned ones for an account manager."""
    if user.is_admin:
        return ALL_PARTNERS
    ids = session.scalars(select(UserPartner.partner_id).where(UserPartner.user_id == user.id))
    return PartnerScope(partner_ids=frozenset(ids))


def assigned_partner_codes(*, session: Session, user: User) -> list[str]:
    return list(
        session.scalars(
            select(Partner.code)
            .join(UserPartner, UserPartner.partner_id == Partner.id)
            .where(UserPartner.user_id == user.id)
            .order_by(Partner.code)
        )
    )


def partner_managers(*, session: Session, partner_id: uuid.UUID) -> list[User]:
    """The account managers assigned to a partner, by username."""
    return list(
        session.scalars(
            select(User)
            .join(UserPartner, UserPartner.user_id == User.id)
            .where(UserPartner.partner_id == partner_id)
            .order_by(User.username)
        )
    )


def set_partner_managers(*, session: Session, partner: Partner, usernames: list[str], actor: str) -> list[User]:
    """Make exactly these users the partner's account managers."""
    wanted = sorted({name.lower() for name in usernames})
    users = list(session.scalars(select(User).where(func.lower(User.username).in_(wanted)))) if wanted else []
    missing = sorted(set(wanted) - {u.username.lower() for u in users})
    if missing:
        raise Invalid(_("no user named {value}").format(value=", ".join(repr(m) for m in missing)), field="usernames")
    current = {m.id for m in partner_managers(session=session, partner_id=partner.id)}
    target = {u.id for u in users}
    for user_id in current - target:
        link = session.get(UserPartner, (user_id, partner.id))
        if link is not None:
            session.delete(link)
    for user_id in target - current:
        session.add(UserPartner(user_id=user_id, partner_id=partner.id))
    session.flush()
    record(
        session=session,
        actor=actor,
        action="partner.managers",
        subject_type="partner",
        subject_id=partner.id,
        usernames=wanted,
    )
    return sorted(users, key=lambda u: u.username)


def sign_in_oidc(*, session: Session, subject: str, username: str, create: bool) -> User | None:
    """The user linked to an OIDC identity by its stable subject, or a new account manager for a new identity.

    Never matched by name: an identity whose username is taken by a local account (an admin, say) is refused
    until an admin links the two (`retrotest link-sso`), as anyone may choose their name at some identity providers.
    """
    user = session.scalars(select(User).where(User.oidc_subject == subject)).one_or_none()
    if user is None:
        if not create or find_user(session=session, username=username) is not None:
            return None
        user = User(username=username, role=Role.account_manager, is_active=True, oidc_subject=subject)
        session.add(user)
        session.flush()
        record(
            session=session,
            actor=username,
            action="user.create",
            subject_type="user",
            subject_id=user.id,
            username=username,
            role=user.role.value,
            via="oidc",
        )
    if not user.is_active:
        return None
    user.last_login_at = utcnow()
    session.flush()
    return user


def link_oidc_identity(*, session: Session, user: User, subject: str, actor: str) -> User:
    """Link an OIDC identity ("<issuer> <sub>") to an existing user, so it signs in as them (admins)."""
    holder = session.scalars(select(User).where(User.oidc_subject == subject)).one_or_none()
    if holder is not None and holder.id != user.id:
        raise Conflict(_("that identity is already linked to {username}").format(username=repr(holder.username)))
    user.oidc_subject = subject
    session.flush()
    record(
        session=session, actor=actor, action="user.link_sso", subject_type="user", subject_id=user.id, subject=subject
    )
    return user
