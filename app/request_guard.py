"""What every request passes before any route sees it: a body size limit, no NUL in the URL, the public host.

Pure ASGI, so nothing is read or parsed before the checks: a body larger than its route allows is refused by its
Content-Length alone, or as soon as a chunked one passes the limit. Every request may send RETRO_MAX_BODY_BYTES;
an upload route's larger limit applies only once the route has authenticated the caller (and checked CSRF) and
called allow_upload, so an anonymous caller cannot make the API read or parse more than the small limit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings

# Routes that take a population file: their bodies may hold RETRO_POPULATION_MAX_BYTES of file on top of the
# RETRO_MAX_BODY_BYTES every route gets (the request's own fields, the multipart framing).
UPLOAD_ROUTES: tuple[re.Pattern[str], ...] = (
    re.compile(r"/api/v1/retro-tests/with-population"),
    re.compile(r"/jobs/new"),
)

_NUL_IN_QUERY = re.compile(rb"%00|\x00")
# Partner links hash whatever token they are given, and answer every dead one with the same page: a NUL there is
# one more dead token, not a bad request.
_OPAQUE_PATHS = ("/d/",)
HSTS = "max-age=31536000; includeSubDomains"
BODY_ALLOWANCE = "retro.body_allowance"  # the scope key of the request's BodyAllowance
_MULTIPART = b"multipart/form-data"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than this route accepts ({limit} bytes)")


@dataclass(frozen=True)
class PublicOrigin:
    scheme: str
    host: bytes


@dataclass
class BodyAllowance:
    """How much body a request may send now (limit), and what its route allows an authenticated caller (upload)."""

    limit: int
    upload: int
    finished: bool = False  # the whole body has been read


def body_limit(settings: Settings, path: str) -> int:
    """The largest body the route at path accepts from an authenticated caller."""
    if any(p.fullmatch(path) for p in UPLOAD_ROUTES):
        return settings.population_max_bytes + settings.max_body_bytes
    return settings.max_body_bytes


def allow_upload(scope: Scope) -> None:
    """Let this request send its route's upload limit; call only after authentication and the CSRF check."""
    allowance = scope.get(BODY_ALLOWANCE)
    if isinstance(allowance, BodyAllowance):
        allowance.limit = allowance.upload


class RequestGuard:
    """The checks above, plus HSTS on every answer when the public URL is https."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        public = urlsplit(settings.public_base_url)
        self.origin = PublicOrigin(scheme=public.scheme or "http", host=public.netloc.encode("latin-1"))
        self.hsts = public.scheme == "https"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_hsts(send) if self.hsts else send
        if _has_nul(scope):
            await _refuse(send, 400, "the URL contains a NUL character; remove it and try again")
            return
        allowance = self._allowance(scope)
        declared = _content_length(scope)
        if declared is not None and declared > allowance.upload:
            await _refuse(send, 413, BodyTooLarge(allowance.upload).detail)
            return
        scope = {**self._with_public_host(scope), BODY_ALLOWANCE: allowance}
        if declared or _header(scope, b"transfer-encoding"):
            send = _closing_if_unread(send, allowance)
        await self.app(scope, _limited(receive, allowance), send)

    def _allowance(self, scope: Scope) -> BodyAllowance:
        """The small limit for now; an upload route's, for a multipart body only (a form of fields is small)."""
        small = self.settings.max_body_bytes
        multipart = _header(scope, b"content-type").lower().startswith(_MULTIPART)
        return BodyAllowance(limit=small, upload=body_limit(self.settings, scope["path"]) if multipart else small)

    def _with_public_host(self, scope: Scope) -> Scope:
        """Links, Location headers and redirects are built from RETRO_PUBLIC_BASE_URL, never the client's Host."""
        headers = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", self.origin.host)]
        return {**scope, "headers": headers, "scheme": self.origin.scheme}

    @staticmethod
    def _with_hsts(send: Send) -> Send:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"strict-transport-security", HSTS.encode())],
                }
            await send(message)

        return sending


def _has_nul(scope: Scope) -> bool:
    if _NUL_IN_QUERY.search(scope.get("query_string", b"")):
        return True
    path: str = scope["path"]
    return "\x00" in path and not path.startswith(_OPAQUE_PATHS)


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if not value:
        return None
    try:
        return int(value[:20])
    except ValueError:
        return None


def _limited(receive: Receive, allowance: BodyAllowance) -> Receive:
    """receive, refusing (413) once the body read so far passes the allowance's current limit."""
    seen = 0

    async def receiving() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > allowance.limit:
                raise BodyTooLarge(allowance.limit)
            allowance.finished = not message.get("more_body", False)
        return message

    return receiving


def _closing_if_unread(send: Send, allowance: BodyAllowance) -> Send:
    """send, closing the connection after an answer given before the body was read (an anonymous upload's 401):
    the server would otherwise read the rest of the body, up to 64 MiB, only to drop it."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and not allowance.finished:
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return sending


async def _refuse(send: Send, status: int, detail: str) -> None:
    code = "request_too_large" if status == 413 else "invalid_request"
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
