"""Password sign-in throttling: failures counted per account from one address, per address and per account.

The account's own counters (per account from one address, per account) lock: past their bar, further tries for that
account are refused for a while that doubles with each failure and is capped, so an attacker guessing slowly gets
nowhere and one guessing fast only delays a user, never locks them out for good.

The per-address counter only throttles (OWASP's Credential Stuffing and Blocking Brute Force cheat sheets: many
users share one address behind a proxy or an ingress): past its bar, wrong passwords from the address are refused
for sign_in_address_lock_s, but a right password for an account with no failures of its own still gets in. Tries
during the throttle neither count nor extend it; only another bar's worth of failures after it throttles again (for
twice as long, capped), so one request per lock period cannot keep an address throttled. The counts live in the
database, so every API process sees the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.models import SignInFailure
from app.clock import as_utc, utcnow
from app.config import Settings
from app.errors import AppError
from app.i18n import ngettext

_FIRST_LOCK_S = 30  # the first refusal past a bar; doubled with each failure beyond it


class TooManySignIns(AppError):
    status_code = 429
    code = "too_many_sign_ins"

    def __init__(self, retry_after_s: int) -> None:
        minutes = max(1, math.ceil(retry_after_s / 60))
        # English says "minute(s)" either way; the Russian catalogue has its three plural forms.
        message = ngettext(
            "too many failed sign-ins for this account or from your address; try again in {minutes} minute(s)",
            "too many failed sign-ins for this account or from your address; try again in {minutes} minute(s)",
            minutes,
        )
        super().__init__(message.format(minutes=minutes))
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Bar:
    key: str
    max_failures: int
    account: bool = True  # the account's own counter (locks, doubling); False: the address's (throttles only)


def bars(*, settings: Settings, username: str, address: str) -> list[Bar]:
    """The counters one sign-in attempt is measured against."""
    name = username.lower()[:150]
    return [
        Bar(key=f"account-address:{name}|{address}", max_failures=settings.sign_in_max_failures),
        Bar(key=f"address:{address}", max_failures=settings.sign_in_address_max_failures, account=False),
        Bar(key=f"account:{name}", max_failures=settings.sign_in_account_max_failures),
    ]


def _wait_s(session: Session, bars: list[Bar], now: datetime) -> float:
    """How long the longest lock among these counters has to run; 0 when none is locked."""
    waits = [
        (as_utc(row.locked_until) - now).total_seconds()
        for bar in bars
        if (row := session.get(SignInFailure, bar.key)) is not None and row.locked_until is not None
    ]
    return max(waits, default=0.0)


def check(*, session: Session, checked: list[Bar]) -> int:
    """Refuse (TooManySignIns) while the account's own counters are locked; else the seconds the address's throttle
    has left (0: none), for which only a right password for a clean account gets in (see admit)."""
    now = utcnow()
    account_wait = _wait_s(session, [b for b in checked if b.account], now)
    if account_wait > 0:
        raise TooManySignIns(math.ceil(account_wait))
    return max(0, math.ceil(_wait_s(session, [b for b in checked if not b.account], now)))


def admit(*, session: Session, settings: Settings, checked: list[Bar], address_wait_s: int) -> None:
    """After a right password: refuse it (TooManySignIns) only while the address is throttled and the account has
    failures of its own in their window; an account nobody has guessed at is never shut out by its neighbours."""
    if address_wait_s <= 0:
        return
    window = timedelta(seconds=settings.sign_in_window_s)
    now = utcnow()
    for bar in checked:
        row = session.get(SignInFailure, bar.key)
        if bar.account and row is not None and row.failures > 0 and now - as_utc(row.window_started_at) <= window:
            raise TooManySignIns(address_wait_s)


def _counter(session: Session, key: str, now: datetime) -> SignInFailure:
    row = session.get(SignInFailure, key, with_for_update=True)
    if row is not None:
        return row
    row = SignInFailure(key=key, failures=0, window_started_at=now, locked_until=None)
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another process counted the first failure at the same moment
        found = session.get(SignInFailure, key, with_for_update=True, populate_existing=True)
        assert found is not None
        return found
    return row


def note_failure(*, session: Session, settings: Settings, failed: list[Bar]) -> None:
    """Count one failed sign-in on each counter; lock those past their bar."""
    now = utcnow()
    window = timedelta(seconds=settings.sign_in_window_s)
    for bar in failed:
        row = _counter(session, bar.key, now)
        if bar.account:
            _count_for_account(row, bar=bar, settings=settings, now=now, window=window)
        else:
            _count_for_address(row, bar=bar, settings=settings, now=now, window=window)
    session.flush()


def _count_for_account(row: SignInFailure, *, bar: Bar, settings: Settings, now: datetime, window: timedelta) -> None:
    if now - as_utc(row.window_started_at) > window:
        row.failures, row.window_started_at, row.locked_until = 0, now, None
    row.failures += 1
    beyond = row.failures - bar.max_failures
    if beyond >= 0:
        lock_s = min(settings.sign_in_lock_max_s, _FIRST_LOCK_S * 2 ** min(beyond, 20))
        row.locked_until = now + timedelta(seconds=lock_s)
        row.window_started_at = now  # the count lasts as long as the lock does


def _count_for_address(row: SignInFailure, *, bar: Bar, settings: Settings, now: datetime, window: timedelta) -> None:
    if row.locked_until is not None and as_utc(row.locked_until) > now:
        return  # a try while throttled neither counts nor extends the throttle
    if now - as_utc(row.window_started_at) > window:
        row.failures, row.window_started_at = 0, now
    row.locked_until = None
    row.failures += 1
    # Each further bar's worth of failures in the window throttles again, twice as long; a single failure after a
    # throttle has run out never does.
    if row.failures % bar.max_failures == 0:
        rounds = row.failures // bar.max_failures
        lock_s = min(settings.sign_in_lock_max_s, settings.sign_in_address_lock_s * 2 ** min(rounds - 1, 20))
        row.locked_until = now + timedelta(seconds=lock_s)


def note_success(*, session: Session, succeeded: list[Bar]) -> None:
    """A right password from this address clears its own account-from-address counter."""
    row = session.get(SignInFailure, succeeded[0].key)
    if row is not None:
        session.delete(row)
        session.flush()


def forget_old_failures(*, session: Session, settings: Settings) -> int:
    """Drop counters whose window and lock have both run out (beat), so the table holds only live ones."""
    now = utcnow()
    stale = session.execute(
        delete(SignInFailure)
        .where(
            SignInFailure.window_started_at < now - timedelta(seconds=settings.sign_in_window_s),
            or_(SignInFailure.locked_until.is_(None), SignInFailure.locked_until < now),
        )
        .returning(SignInFailure.key)
    ).all()
    return len(stale)
