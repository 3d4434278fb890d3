"""A job's page gets its progress pushed (server-sent events from one shared query per API process) instead of
polling (issue 32): the stream delivers state changes, is scoped like the status endpoint, holds no in-flight slot,
costs one query a tick however many watch, and the page falls back to polling when the stream is refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, event, update

from tests.conftest import _TMP, free_port, make_user, start_process, stop_process, wait_until_ready
from tests.factories import make_retro_test

MAX_IN_FLIGHT = 2
PASSWORD = "live events test password"


@dataclass
class LiveApi:
    base_url: str
    token: str  # an admin's
    other_token: str  # an account manager of another partner
    manager: str  # an account manager of the job's partner, with PASSWORD
    job_id: uuid.UUID


def set_job(job_id: uuid.UUID, **values: Any) -> None:
    """Change the job's row as the worker would, committed."""
    from app.core.jobs import RetroTest
    from app.db import get_session_factory

    with get_session_factory()() as session, session.begin():
        session.execute(update(RetroTest).where(RetroTest.id == job_id).values(**values))


def serve_api(**env: str) -> tuple[subprocess.Popen[bytes], str]:
    """`retrotest serve` as its own process (one worker) with these settings, ready; and its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = _TMP / f"live-api-{port}.log"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--skip-migrations", "--workers", "1"]
    proc = start_process(cmd, env={**os.environ, "RETRO_PUBLIC_BASE_URL": base, **env}, log=log)
    try:
        wait_until_ready(f"{base}/ready", procs=[proc], timeout_s=90, logs=lambda: log.read_text(errors="replace"))
    except BaseException:
        stop_process(proc)
        raise
    return proc, base


@pytest.fixture(scope="module")
def live_api(database_url: str) -> Iterator[LiveApi]:
    """The API as its own process (one worker, at most MAX_IN_FLIGHT requests in flight), a queued job, and users."""
    from app.auth.models import User
    from app.core.jobs import RetroTest
    from app.core.partners import Partner
    from app.db import get_session_factory

    suffix = uuid.uuid4().hex[:8]
    names = [f"live-admin-{suffix}", f"live-am-{suffix}", f"live-other-{suffix}"]
    with get_session_factory()() as session:
        start = date.today() - timedelta(days=40)
        job_id = make_retro_test(session, start=start, end=start, partner_prefix="live")
        other_job = make_retro_test(session, start=start, end=start, partner_prefix="live-other")
        codes = [
            session.get(Partner, session.get(RetroTest, j).partner_id).code  # type: ignore[union-attr]
            for j in (job_id, other_job)
        ]
        token = make_user(session, names[0], role="admin")
        make_user(session, names[1], role="account_manager", partners=[codes[0]], password=PASSWORD)
        other_token = make_user(session, names[2], role="account_manager", partners=[codes[1]])
        session.commit()

    proc, base = serve_api(RETRO_API_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT))
    try:
        yield LiveApi(base, token, other_token, names[1], job_id)
    finally:
        stop_process(proc)
        with get_session_factory()() as session, session.begin():
            partner_ids = list(session.scalars(select_partner_ids((job_id, other_job))))
            session.execute(delete(RetroTest).where(RetroTest.id.in_((job_id, other_job))))
            session.execute(delete(Partner).where(Partner.id.in_(partner_ids)))
            session.execute(delete(User).where(User.username.in_(names)))


def select_partner_ids(job_ids: tuple[uuid.UUID, ...]) -> Any:
    from sqlalchemy import select

    from app.core.jobs import RetroTest

    return select(RetroTest.partner_id).where(RetroTest.id.in_(job_ids))


def events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream, comments and retry lines skipped."""
    name, data = "message", ""
    for line in lines:
        if line == "":
            if data:
                yield name, data
            name, data = "message", ""
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def test_the_stream_delivers_each_state_change_and_ends_with_the_job(live_api: LiveApi) -> None:
    api = live_api
    set_job(api.job_id, state="queued", rows_total=None, rows_scored=0)
    headers = {"Authorization": f"Bearer {api.token}"}
    with (
        httpx.Client(base_url=api.base_url, headers=headers, timeout=30) as client,
        client.stream("GET", f"/api/v1/retro-tests/{api.job_id}/events") as stream,
    ):
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        received = events(stream.iter_lines())
        name, data = next(received)
        assert name == "job" and json.loads(data)["state"] == "queued"
        # The first event is what the status endpoint answers.
        status = client.get(f"/api/v1/retro-tests/{api.job_id}").json()
        assert {k: v for k, v in json.loads(data).items() if k != "progress"} == {
            k: v for k, v in status.items() if k != "progress"
        }

        set_job(api.job_id, state="scoring", rows_total=1000, rows_scored=250)
        for _name, data in received:
            if json.loads(data)["state"] == "scoring":
                break
        assert json.loads(data)["progress"]["rows_scored"] == 250

        set_job(api.job_id, state="failed", error_code="test", error_message="stopped by the test")
        seen = list(received)  # the stream ends by itself once the job has ended
    assert seen[-1][0] == "end" and json.loads(seen[-2][1])["error"]["code"] == "test"


def test_another_partner_s_job_is_refused_as_the_status_endpoint_refuses_it(live_api: LiveApi) -> None:
    api = live_api
    with httpx.Client(base_url=api.base_url, timeout=30) as anonymous:
        assert anonymous.get(f"/api/v1/retro-tests/{api.job_id}/events").status_code == 401
    headers = {"Authorization": f"Bearer {api.other_token}"}
    with httpx.Client(base_url=api.base_url, headers=headers, timeout=30) as other:
        status = other.get(f"/api/v1/retro-tests/{api.job_id}")
        stream = other.get(f"/api/v1/retro-tests/{api.job_id}/events")
        assert status.status_code == stream.status_code == 404
        assert stream.json() == status.json()
        assert other.get(f"/api/v1/retro-tests/{uuid.uuid4()}/events").status_code == 404


def test_open_streams_hold_no_in_flight_slot(live_api: LiveApi) -> None:
    """More open streams than the process serves requests at once: every other request is still served."""
    api = live_api
    set_job(api.job_id, state="scoring")
    headers = {"Authorization": f"Bearer {api.token}"}

    async def run() -> tuple[list[int], int]:
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, timeout=30) as client:
            streams = []
            for _ in range(MAX_IN_FLIGHT * 3):
                stream = await client.send(
                    client.build_request("GET", f"/api/v1/retro-tests/{api.job_id}/events"), stream=True
                )
                streams.append(stream)
            try:
                status = (await client.get(f"/api/v1/retro-tests/{api.job_id}")).status_code
            finally:
                for stream in streams:
                    await stream.aclose()
            return [s.status_code for s in streams], status

    streams, status = asyncio.run(run())
    assert streams == [200] * (MAX_IN_FLIGHT * 3) and status == 200


def test_many_streams_of_a_job_cost_one_query_a_tick(live_api: LiveApi, engine) -> None:  # type: ignore[no-untyped-def]
    """Ten streams of one job in one process: the change reaches all ten from one read of the job per tick."""
    from app.core.scope import ALL_PARTNERS
    from app.db import get_session_factory
    from app.retro_tests import live, service

    api = live_api
    set_job(api.job_id, state="scoring", rows_scored=1)
    with get_session_factory()() as session:
        first = service.read_retro_test(session=session, job_id=api.job_id, scope=ALL_PARTNERS)
    reads = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FROM retro_tests" in statement:
            reads.append(statement)

    async def run() -> list[str]:
        feed = live.JobFeed(live.read_watched, interval_s=0.2)
        streams = [feed.stream(first, staff=True, files_at="http://x/api") for _ in range(10)]
        firsts = [await s.__anext__() for s in streams]
        assert all('"state":"scoring"' in f for f in firsts)
        await asyncio.to_thread(set_job, api.job_id, rows_scored=500)
        changed = await asyncio.wait_for(asyncio.gather(*(s.__anext__() for s in streams)), timeout=10)
        for s in streams:
            await s.aclose()
        assert feed.polls >= 1
        return [feed.polls, *changed]  # type: ignore[list-item]

    event.listen(engine, "before_cursor_execute", count)
    try:
        polls, *changed = asyncio.run(run())
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert all(json.loads(c.split("data: ", 1)[1])["progress"]["rows_scored"] == 500 for c in changed)
    assert len(reads) == polls  # one read of the watched jobs per tick, not one per stream


def test_the_job_page_is_pushed_its_progress_and_polls_when_the_stream_is_refused(live_api: LiveApi) -> None:
    """In Chromium: the page listens to the stream (no poll of the status endpoint) and shows a change within
    seconds; with the stream refused it polls instead."""
    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
    from tests.web_helpers import csrf_of

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/system-packages.sh (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    api = live_api
    set_job(api.job_id, state="extracting", rows_total=None, rows_scored=0)
    status_url = f"{api.base_url}/api/v1/retro-tests/{api.job_id}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for refused in (False, True):
                context = browser.new_context(base_url=api.base_url)
                page = context.new_page()
                polls: list[str] = []
                page.on("request", lambda r, polls=polls: polls.append(r.url) if r.url == status_url else None)
                if refused:
                    page.route("**/events", lambda route: route.fulfill(status=503, body="busy"))
                page.goto("/login")
                page.fill("input[name=username]", api.manager)
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                page.goto(f"/jobs/{api.job_id}")
                expect(page.locator("#job")).to_have_attribute("data-live", "polling" if refused else "events")
                rows = 300 if refused else 200
                set_job(api.job_id, state="scoring", rows_total=1000, rows_scored=rows)
                expect(page.locator("#job-state")).to_have_text("scoring", timeout=10_000)
                expect(page.locator("#job-progress-text")).to_contain_text(f"{rows} of 1,000 rows")
                assert bool(polls) == refused, polls
                assert csrf_of(page.content())  # the page is the signed-in job page, not a sign-in form
                context.close()
                set_job(api.job_id, state="extracting", rows_total=None, rows_scored=0)
        finally:
            browser.close()


def test_an_open_stream_does_not_hold_up_the_server_s_shutdown(live_api: LiveApi) -> None:
    """SIGTERM with a job page listening: the server stops within its grace period, not when the stream ends."""
    import signal
    import threading
    import time

    from app.cli import SHUTDOWN_GRACE_S

    api = live_api
    set_job(api.job_id, state="scoring")
    proc, base = serve_api()
    try:
        opened = threading.Event()

        def listen() -> None:
            headers = {"Authorization": f"Bearer {api.token}"}
            with (
                httpx.Client(base_url=base, headers=headers, timeout=60) as client,
                client.stream("GET", f"/api/v1/retro-tests/{api.job_id}/events") as stream,
            ):
                opened.set()
                for _ in stream.iter_lines():
                    pass

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert opened.wait(30)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=SHUTDOWN_GRACE_S + 15)
        assert time.monotonic() - stopping < SHUTDOWN_GRACE_S + 10
        listener.join(timeout=10)
        assert not listener.is_alive()  # the stream was closed, not left hanging
    finally:
        stop_process(proc)
