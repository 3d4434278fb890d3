"""Shed overload instead of queueing it: at most RETRO_API_MAX_IN_FLIGHT requests of one API process are served at
once; past that a request is answered 503 with Retry-After at once, without a thread, a database connection or a
byte of its body. Under a queue every caller waits and most give up after the work was done anyway (issue 32: at
200 req/s, 47% got no answer within 10 s); a fast "try again in a second" keeps the answers that are given fast.

Probes are exempt: /health, /ready and /metrics must tell a busy process from a dead one. So are the static files,
which cost nothing.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from app.metrics import API_REQUESTS_SHED

RETRY_AFTER_S = 1
EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
_BUSY_JSON = json.dumps(
    {
        "error": "overloaded",
        "detail": f"the service is busy with other requests; try again in {RETRY_AFTER_S} s",
    }
).encode()
_BUSY_HTML = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
    f"<meta http-equiv='refresh' content='{RETRY_AFTER_S}'><title>Busy</title></head>"
    "<body><p>The service is busy with other requests; this page loads again in a moment.</p></body></html>"
).encode()


class InFlightLimit:
    """Pure ASGI middleware: counts requests in flight in this process's event loop (no lock: one loop)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path or self.limit <= 0 or path in EXEMPT_PATHS or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            API_REQUESTS_SHED.inc()
            await _busy(scope, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _busy(scope: Scope, send: Send) -> None:
    accept = b""
    for name, value in scope.get("headers") or []:
        if name == b"accept":
            accept = value
    html = b"text/html" in accept
    body = _BUSY_HTML if html else _BUSY_JSON
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8" if html else b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
                (b"cache-control", b"no-store"),
                # The body was not read: the connection goes, so a large upload is not drained to reuse it.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
