"""A job's live view for its page: server-sent events fed by one shared query per API process.

Every open page of a running job used to poll the status endpoint once a second: N pages cost N authenticated
requests a second. Here each API process runs one poller while anyone watches a job: once a second it reads every
watched job in one query (service.read_retro_tests: only their rows, only the view's columns), builds each job's
view once (twice when staff and account managers watch it: they see different things), and hands it to the
streams watching that job when it changed. N pages of one job cost one row a second.

A stream starts the way the status endpoint answers: the caller's scope is checked by the same read, whose view
is the first event. It then holds no database connection, and no in-flight slot (app/load_shedding.py counts a
stream only until its first byte): the poller's cost does not grow with the number of streams. A stream ends when
its job ends (an `end` event, so the browser does not reconnect), and after STREAM_MAX_S otherwise: the browser's
EventSource then reconnects, which checks the caller's session again, so a signed-out user stops getting updates.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi.responses import StreamingResponse

from app.core.jobs import TERMINAL_STATES
from app.db import get_session_factory
from app.retro_tests import service, views
from app.retro_tests.service import JobRead

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the connection, a gone client is noticed
STREAM_MAX_S = 300.0
RECONNECT_MS = 1000  # what the browser waits before it reconnects a stream that ended without `end`

Reader = Callable[[Collection[uuid.UUID]], dict[uuid.UUID, JobRead]]


class Watch:
    """One stream's subscription: its job, whether it sees the staff view, and the newest view not yet sent."""

    def __init__(self, job_id: uuid.UUID, *, staff: bool, files_at: str, sent: str) -> None:
        self.job_id = job_id
        self.staff = staff
        self.files_at = files_at
        self.sent = sent
        self.pending: str | None = None
        self.terminal = False
        self.changed = asyncio.Event()


def render(read: JobRead, *, files_at: str, staff: bool) -> str:
    """A job's view as the status endpoint answers it, as JSON."""
    return views.job_json(read, files_at, staff=staff).decode()


class JobFeed:
    """The process's one poller of watched jobs, and the streams it feeds."""

    def __init__(self, read: Reader, *, interval_s: float = POLL_INTERVAL_S) -> None:
        self._read = read
        self.interval_s = interval_s
        self._watches: set[Watch] = set()
        self._task: asyncio.Task[None] | None = None
        # One read at a time, on its own thread: never queued behind the requests on FastAPI's threadpool.
        self._limiter = CapacityLimiter(1)
        self.polls = 0  # queries run: one per tick whatever the number of streams
        self._failing = False

    def watch(self, job_id: uuid.UUID, *, staff: bool, files_at: str, sent: str) -> Watch:
        watch = Watch(job_id, staff=staff, files_at=files_at, sent=sent)
        self._watches.add(watch)
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._run())
        return watch

    def unwatch(self, watch: Watch) -> None:
        self._watches.discard(watch)

    async def _run(self) -> None:
        while self._watches:
            await asyncio.sleep(self.interval_s)
            watches = list(self._watches)
            if watches:
                await self._tick(watches)

    async def _tick(self, watches: list[Watch]) -> None:
        """Read the watched jobs once and wake the streams whose job's view changed."""
        ids = {w.job_id for w in watches}
        try:
            reads = await anyio.to_thread.run_sync(self._read, ids, limiter=self._limiter)
        except Exception as exc:  # the database is away: the streams stay open and the next tick tries again
            if not self._failing:
                log.warning("live job updates paused: the jobs could not be read: %s", type(exc).__name__)
            self._failing = True
            return
        if self._failing:
            log.warning("live job updates resumed")
        self._failing = False
        self.polls += 1
        views_by_key: dict[tuple[uuid.UUID, bool, str], str] = {}
        for watch in watches:
            read = reads.get(watch.job_id)
            if read is None:
                continue
            key = (watch.job_id, watch.staff, watch.files_at)
            if key not in views_by_key:
                views_by_key[key] = render(read, files_at=watch.files_at, staff=watch.staff)
            if views_by_key[key] != watch.sent:
                watch.pending, watch.terminal = views_by_key[key], read.job.state in TERMINAL_STATES
                watch.changed.set()

    async def stream(self, first: JobRead, *, staff: bool, files_at: str) -> AsyncIterator[str]:
        """The events of one stream: the job's view now, then each change, then `end` once the job ended."""
        sent = render(first, files_at=files_at, staff=staff)
        yield f"retry: {RECONNECT_MS}\nevent: job\ndata: {sent}\n\n"
        if first.job.state in TERMINAL_STATES:
            yield "event: end\ndata: {}\n\n"
            return
        watch = self.watch(first.job.id, staff=staff, files_at=files_at, sent=sent)
        deadline = time.monotonic() + STREAM_MAX_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(watch.changed.wait(), timeout=min(KEEPALIVE_S, left))
                except TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                watch.changed.clear()
                watch.sent = watch.pending or watch.sent
                yield f"event: job\ndata: {watch.sent}\n\n"
                if watch.terminal:
                    yield "event: end\ndata: {}\n\n"
                    return
        finally:
            self.unwatch(watch)


def read_watched(job_ids: Collection[uuid.UUID]) -> dict[uuid.UUID, JobRead]:
    """The watched jobs' view rows, in a session of their own that is closed before the views are built."""
    with get_session_factory()() as session:
        return service.read_retro_tests(session=session, job_ids=job_ids)


FEED = JobFeed(read_watched)


def event_stream(first: JobRead, *, staff: bool, files_at: str, feed: JobFeed = FEED) -> StreamingResponse:
    """The response of a job's event stream, starting from a read that already checked the caller's scope."""
    return StreamingResponse(
        feed.stream(first, staff=staff, files_at=files_at),
        media_type="text/event-stream",
        # no-transform and X-Accel-Buffering: proxies (nginx) pass each event on at once instead of buffering.
        headers={"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"},
    )
