"""The Jinja2 environment for every server-rendered page, with the filters the pages share."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from app import i18n
from app.i18n import _

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
STATIC_DIR = Path(__file__).resolve().parent / "static"

templates = Jinja2Templates(directory=str(TEMPLATES_DIR), extensions=["jinja2.ext.i18n"])
# Templates say {{ _("...") }} or {% trans %}; the language is the request's (app/i18n.py).
templates.env.install_gettext_callables(i18n.gettext, i18n.ngettext, newstyle=True)  # type: ignore[attr-defined]
templates.env.globals["current_language"] = i18n.current_language
templates.env.globals["LANGUAGE_NAMES"] = i18n.LANGUAGE_NAMES


def human_bytes(size: int | None) -> str:
    """1536 -> '1.5 KiB'."""
    if size is None:
        return ""
    value = float(size)
    units = {"bytes": "bytes", "KiB": _("KiB"), "MiB": _("MiB"), "GiB": _("GiB")}
    for unit, shown in units.items():
        if value < 1024 or unit == "GiB":
            return _("{size} bytes").format(size=f"{size:,}") if unit == "bytes" else f"{value:.1f} {shown}"
        value /= 1024
    return _("{size} bytes").format(size=f"{size:,}")


def when(moment: datetime | None) -> str:
    """A time for people: UTC, to the second."""
    if moment is None:
        return ""
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds(value: float | None) -> str:
    if value is None:
        return _("running")
    if value < 60:
        return _("{seconds} s").format(seconds=f"{value:.1f}")
    minutes, secs = divmod(round(value), 60)
    return _("{minutes} min {seconds} s").format(minutes=minutes, seconds=secs)


def data(value: object) -> Markup:
    """A name or value put into a sentence, marked as data (HTML's translate="no") so nothing translates it."""
    return Markup('<span translate="no">{}</span>').format(value)


def state_label(state: str) -> str:
    """A job's or link's state as its badge shows it: English keeps the API's names ('succeeded'), Russian words."""
    names = {
        "queued": i18n.pgettext("state", "queued"),
        "resolving": i18n.pgettext("state", "resolving"),
        "extracting": i18n.pgettext("state", "extracting"),
        "preparing_environment": i18n.pgettext("state", "preparing_environment"),
        "deploying": i18n.pgettext("state", "deploying"),
        "validating": i18n.pgettext("state", "validating"),
        "scoring": i18n.pgettext("state", "scoring"),
        "publishing": i18n.pgettext("state", "publishing"),
        "succeeded": i18n.pgettext("state", "succeeded"),
        "failed": i18n.pgettext("state", "failed"),
        "cancelled": i18n.pgettext("state", "cancelled"),
        "active": i18n.pgettext("state", "active"),
        "expired": i18n.pgettext("state", "expired"),
        "revoked": i18n.pgettext("state", "revoked"),
    }
    return names.get(state, state)


def role_label(role: str) -> str:
    """'account_manager' -> 'account manager' / «аккаунт-менеджер»."""
    names = {"admin": i18n.pgettext("role", "admin"), "account_manager": i18n.pgettext("role", "account manager")}
    return names.get(role, role.replace("_", " "))


templates.env.globals["state_label"] = state_label
templates.env.globals["role_label"] = role_label
templates.env.filters["human_bytes"] = human_bytes
templates.env.filters["when"] = when
templates.env.filters["seconds"] = seconds
templates.env.filters["data"] = data
