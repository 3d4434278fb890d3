"""API token checks of the last few seconds, kept per API process for reads.

Pages and scripts poll the status and list endpoints, and checking a token is a third of such a request's cost:
a thread switch, a query and a commit (bench/api_load: ~1.6 of ~2.4 ms CPU for GET /api/v1/me). A read (GET, HEAD)
whose token was checked less than RETRO_API_TOKEN_CACHE_S ago reuses that check: the user and the partners they
may see. Anything that changes things checks the token in the database every time.

What this costs: a token revoked, a user deactivated or demoted, or an assignment changed through another API
process is still accepted for reads for up to RETRO_API_TOKEN_CACHE_S (10 s by default; 0 turns the cache off).
Through this process it takes effect at once: a flush that touches a user, a token or an assignment forgets every
check (Kubernetes' webhook token authenticator makes the same trade with 2 minutes:
`--authentication-token-webhook-cache-ttl`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from app.auth.models import ApiToken, User, UserPartner
from app.clock import as_utc, utcnow
from app.core.scope import PartnerScope

_WATCHED = (User, ApiToken, UserPartner)


class TokenCheck(NamedTuple):
    user: User
    scope: PartnerScope


class RecentTokenChecks:
    """The last `size` token checks, by the token's digest, each for at most `ttl_s` (and never past the token's
    own expiry)."""

    def __init__(self, *, ttl_s: float, size: int = 1024) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._checks: OrderedDict[str, tuple[float, TokenCheck]] = OrderedDict()
        self._lock = threading.Lock()  # dependencies run on the event loop and on the threadpool's threads

    def get(self, digest: str) -> TokenCheck | None:
        with self._lock:
            found = self._checks.get(digest)
            if found is None:
                return None
            if time.monotonic() >= found[0]:
                del self._checks[digest]
                return None
            self._checks.move_to_end(digest)
            return found[1]

    def put(self, digest: str, check: TokenCheck, *, token_expires_at: datetime) -> None:
        if self.ttl_s <= 0:
            return
        token_left_s = (as_utc(token_expires_at) - utcnow()).total_seconds()
        until = time.monotonic() + min(self.ttl_s, token_left_s)
        with self._lock:
            self._checks[digest] = (until, check)
            self._checks.move_to_end(digest)
            while len(self._checks) > self.size:
                self._checks.popitem(last=False)

    def forget(self) -> None:
        with self._lock:
            self._checks.clear()


_checks: RecentTokenChecks | None = None


def recent_checks() -> RecentTokenChecks:
    """This process's checks (RETRO_API_TOKEN_CACHE_S from the settings on first use)."""
    global _checks
    if _checks is None:
        from app.config import get_settings

        _checks = RecentTokenChecks(ttl_s=get_settings().api_token_cache_s)
    return _checks


def forget_all() -> None:
    if _checks is not None:
        _checks.forget()


@event.listens_for(Session, "after_flush")
def _forget_after_changes(session: Session, _context: Any) -> None:
    """A user, token or assignment written through any session of this process: no check holds any more."""
    if _checks is None:
        return
    for changed in (session.new, session.dirty, session.deleted):
        if any(isinstance(obj, _WATCHED) for obj in changed):
            forget_all()
            return


@event.listens_for(Session, "do_orm_execute")
def _forget_after_bulk_changes(state: ORMExecuteState) -> None:
    """The same for UPDATE and DELETE statements (a password reset revokes every token of its user in one)."""
    if _checks is None or not (state.is_update or state.is_delete):
        return
    mapper = state.bind_mapper
    if mapper is not None and issubclass(mapper.class_, _WATCHED):
        forget_all()
