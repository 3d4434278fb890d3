"""The period of a job as its history covers it: which days have no row, said the way a person reads them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, timedelta

from app.i18n import _, ngettext


def missing_days(*, start: date, end: date, days_with_history: Iterable[date]) -> list[date]:
    """The days of [start, end] that are not among days_with_history."""
    have = set(days_with_history)
    return [start + timedelta(days=i) for i in range((end - start).days + 1) if start + timedelta(days=i) not in have]


def days_text(days: Sequence[date], *, limit: int = 10) -> str:
    """Days as a person reads them: runs of consecutive days as ranges, at most `limit` items then a count."""
    runs: list[tuple[date, date]] = []
    for d in sorted(days):
        if runs and d == runs[-1][1] + timedelta(days=1):
            runs[-1] = (runs[-1][0], d)
        else:
            runs.append((d, d))
    span = _("{first} to {last}")
    items = [str(a) if a == b else span.format(first=a, last=b) for a, b in runs]
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else _("{shown} and {count} more").format(shown=shown, count=len(items) - limit)


def period_warnings(days_without_history: Sequence[str] | None) -> list[str]:
    """What a person should know about the period before reading the results (the API's `warnings`)."""
    if not days_without_history:
        return []
    days = [date.fromisoformat(d) for d in days_without_history]
    # English says "day(s)" either way; the Russian catalogue has its three plural forms.
    message = ngettext(
        "the history has no rows on {count} day(s) of the period: {days}; those days are not in the results",
        "the history has no rows on {count} day(s) of the period: {days}; those days are not in the results",
        len(days),
    )
    return [message.format(count=len(days), days=days_text(days))]
