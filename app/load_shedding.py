"""Shed overload instead of queueing it: at most RETRO_API_MAX_IN_FLIGHT requests of one API process are served at
once, fewer when the process answers slowly (InFlightLimit's adaptive bound); past that a request is answered 503
with Retry-After at once, without a thread, a database connection or a byte of its body. Under a queue every caller waits and most give up after the work was done anyway (issue 32: at
200 req/s, 47% got no answer within 10 s); a fast "try again in a second" keeps the answers that are given fast.

Probes are exempt: /health, /ready and /metrics must tell a busy process from a dead one. So are the static files,
which cost nothing. A job's event stream is counted only until its answer starts (see STREAM_SUFFIX).
"""

from __future__ import annotations

import json
import time
from functools import cache

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.i18n import _, current_language
from app.metrics import API_REQUESTS_SHED

RETRY_AFTER_S = 1
EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
# A job's event stream (app/retro_tests/live.py) counts while it checks its caller and reads the job, and no longer
# once its answer starts: it then lasts minutes, costs one row of a shared query a second, and holds no thread or
# database connection. Counted to its end, 64 open job pages would refuse every other request of the process.
STREAM_SUFFIX = "/events"


@cache
def _busy_bodies(language: str) -> tuple[bytes, bytes]:
    """The JSON and HTML answers of a shed request in a language, made once (shedding must stay cheap)."""
    detail = _("the service is busy with other requests; try again in {seconds} s").format(seconds=RETRY_AFTER_S)
    title, text = _("Busy"), _("The service is busy with other requests; this page loads again in a moment.")
    page = (
        f"<!doctype html><html lang='{language}'><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{RETRY_AFTER_S}'><title>{title}</title></head>"
        f"<body><p>{text}</p></body></html>"
    )
    return json.dumps({"error": "overloaded", "detail": detail}).encode(), page.encode()


class InFlightLimit:
    """Pure ASGI middleware: counts requests in flight in this process's event loop (no lock: one loop).

    The bound adapts to how fast the process serves (additive increase, multiplicative decrease on latency, as TCP
    does with its window): a fixed bound of 64 is a 0.3 s queue for a process serving 200 requests a second, but a
    6 s one for a process given a fifth of a core by a busy machine. A read whose answer started later than
    target_s after it arrived shrinks the bound by a quarter (at most once per target_s, so a cut shows before the
    next); a read answered within half of it grows the bound by one, up to `limit`. The bound never falls below
    `floor` (the threads that serve requests: fewer would leave them idle). Reads only, timed to the start of their
    answer: an upload's time is its body's, a download's or stream's length is the client's.
    """

    def __init__(self, app: ASGIApp, *, limit: int, floor: int = 1, target_s: float = 0.25) -> None:
        self.app = app
        self.limit = limit
        self.floor = max(1, min(floor, limit))
        self.target_s = target_s
        self.bound = limit
        self.in_flight = 0
        self._last_cut = 0.0

    def _answered(self, waited_s: float, now: float) -> None:
        """Adapt the bound to how long a read took to start its answer."""
        if waited_s > self.target_s:
            if now - self._last_cut > self.target_s:
                self.bound = max(self.floor, self.bound * 3 // 4)
                self._last_cut = now
        elif waited_s < self.target_s / 2 and self.bound < self.limit:
            self.bound += 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path or self.limit <= 0 or path in EXEMPT_PATHS or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.bound:
            API_REQUESTS_SHED.inc()
            await _busy(scope, send)
            return
        self.in_flight += 1
        held = True
        arrived = time.monotonic()
        timed = scope.get("method") in ("GET", "HEAD")
        stream = path.endswith(STREAM_SUFFIX)

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.in_flight -= 1

        async def send_noting_start(message: Message) -> None:
            if message["type"] == "http.response.start":
                now = time.monotonic()
                if timed:
                    self._answered(now - arrived, now)
                if stream:
                    release()
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        finally:
            release()


async def _busy(scope: Scope, send: Send) -> None:
    accept = b""
    for name, value in scope.get("headers") or []:
        if name == b"accept":
            accept = value
    html = b"text/html" in accept
    busy_json, busy_html = _busy_bodies(current_language())
    body = busy_html if html else busy_json
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
