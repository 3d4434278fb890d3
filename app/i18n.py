"""Russian and English: the gettext catalogues of app/locale and the language of the request, command or report.

The catalogues are the .po files themselves, compiled in memory on first use (Babel), so a fresh clone needs no
build step and no compiled file can go stale. English is the language of the msgids.

The language in effect is a context variable holding a mutable box: the web middleware puts one box per request
(from `Accept-Language`, else RETRO_DEFAULT_LANGUAGE); the dependency that finds the signed-in user sets its
profile language in that box, which the endpoint's thread sees because it shares the box, not a copy.
"""

from __future__ import annotations

import gettext as _gettext
import io
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import get_settings

LANGUAGES = ("en", "ru")
LANGUAGE_NAMES = {"en": "English", "ru": "Русский"}
FALLBACK = "en"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
DOMAIN = "messages"


@dataclass
class LanguageBox:
    """The language of one request or command; mutable so a dependency running in a copied context can set it."""

    language: str


_current: ContextVar[LanguageBox | None] = ContextVar("retro_language", default=None)


def default_language() -> str:
    """RETRO_DEFAULT_LANGUAGE (English unless set)."""
    return get_settings().default_language


def supported(value: str | None) -> str | None:
    """'ru', 'ru-RU', 'ru_RU.UTF-8' -> 'ru'; None for anything not supported."""
    if not value:
        return None
    primary = value.strip().replace("_", "-").split("-", 1)[0].split(".", 1)[0].lower()
    return primary if primary in LANGUAGES else None


def negotiate(accept_language: str | None, *, default: str | None = None) -> str:
    """The supported language a browser's `Accept-Language` prefers (by q-value), else the default."""
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate((accept_language or "").split(",")):
        tag, _sep, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _eq, raw = param.strip().partition("=")
            if key == "q":
                try:
                    quality = float(raw)
                except ValueError:
                    quality = 0.0
        language = supported(tag)
        if language is not None and quality > 0:
            ranked.append((-quality, position, language))
    return min(ranked)[2] if ranked else (default or default_language())


@cache
def translations(language: str) -> _gettext.NullTranslations:
    """The compiled catalogue of a language; English and unknown languages translate to the msgid."""
    po = LOCALE_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"
    if language == FALLBACK or not po.is_file():
        return _gettext.NullTranslations()
    with po.open("rb") as handle:
        catalog = read_po(handle, locale=language)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return _gettext.GNUTranslations(buffer)


def current_language() -> str:
    box = _current.get()
    return box.language if box is not None else default_language()


def set_language(language: str) -> None:
    """Switch the language of the request or command in effect (a signed-in user's profile setting)."""
    box = _current.get()
    if box is None:
        _current.set(LanguageBox(language))
    else:
        box.language = language


@contextmanager
def use_language(language: str) -> Iterator[None]:
    """Run a block (a request, a command, one report) in a language."""
    token = _current.set(LanguageBox(supported(language) or FALLBACK))
    try:
        yield
    finally:
        _current.reset(token)


def gettext(message: str) -> str:
    """The message in the language in effect."""
    return translations(current_language()).gettext(message)


def ngettext(singular: str, plural: str, n: int) -> str:
    return translations(current_language()).ngettext(singular, plural, n)


def pgettext(context: str, message: str) -> str:
    return translations(current_language()).pgettext(context, message)


_ = gettext


def N_(message: str) -> str:
    """Marks a message for extraction where it is defined (a table of labels); it is translated where shown."""
    return message


def translate_values(labels: dict[str, str]) -> dict[str, str]:
    """A table of N_-marked labels in the language in effect."""
    return {key: gettext(value) for key, value in labels.items()}


class RequestLanguage:
    """ASGI middleware: each request runs in the language its `Accept-Language` prefers, else the default; the
    signed-in user's profile setting replaces it once the user is known (app/auth/deps.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"accept-language"), b"")
        with use_language(negotiate(header.decode("latin-1"))):
            await self.app(scope, receive, send)
