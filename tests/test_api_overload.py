"""Overload: more concurrent requests than the API has threads and connections are all answered, never stuck.

The API runs as a real server process with a one-connection pool. Before the fix, a request kept its database
connection while it waited for a thread to serialize its answer, and every thread waited for that connection:
nothing moved until the pool timed out. Now a request holds a connection only while it runs on a thread, so the
requests just queue. The test asserts outcomes (every answer a 200), not timings.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import httpx
import pytest

from tests.conftest import _TMP, free_port, make_user, start_process, stop_process, wait_until_ready
from tests.factories import make_retro_test

# Many times as many requests at once as the server has threads (THREADS) and connections (one).
THREADS = 4
CONCURRENT_REQUESTS = 120
SHED_LIMIT = 8  # requests in flight the shedding API serves at once


@dataclass
class TinyPoolApi:
    base_url: str
    token: str
    job_id: uuid.UUID
    partner_code: str


@pytest.fixture(scope="module")
def tiny_pool_api(database_url: str) -> Iterator[TinyPoolApi]:
    """The API as its own process with one database connection and no bound on requests in flight."""
    yield from _tiny_pool_api(max_in_flight=0)


@pytest.fixture(scope="module")
def shedding_api(database_url: str) -> Iterator[TinyPoolApi]:
    """The same API with at most SHED_LIMIT requests in flight (RETRO_API_MAX_IN_FLIGHT)."""
    yield from _tiny_pool_api(max_in_flight=SHED_LIMIT)


def _tiny_pool_api(*, max_in_flight: int) -> Iterator[TinyPoolApi]:
    """The API as its own process with one database connection, and a committed job and admin token to read."""
    from sqlalchemy import delete

    from app.auth.models import User
    from app.core.jobs import RetroTest
    from app.core.partners import Partner
    from app.db import get_session_factory

    username = f"overload-{uuid.uuid4().hex[:8]}"
    with get_session_factory()() as session:
        token = make_user(session, username, role="admin")
        start = date.today() - timedelta(days=40)
        job_id = make_retro_test(session, start=start, end=start, partner_prefix="overload")
        job = session.get(RetroTest, job_id)
        assert job is not None
        partner_id = job.partner_id
        partner = session.get(Partner, partner_id)
        assert partner is not None
        partner_code = partner.code
        session.commit()

    port = free_port()
    env = {
        **os.environ,
        "RETRO_API_THREADS": str(THREADS),
        "RETRO_DB_POOL_SIZE": "1",
        "RETRO_DB_MAX_OVERFLOW": "0",
        "RETRO_DB_POOL_TIMEOUT_S": "20",
        "RETRO_API_MAX_IN_FLIGHT": str(max_in_flight),
    }
    log = _TMP / f"overload-api-{port}.log"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--skip-migrations", "--workers", "1"]
    proc = start_process(cmd, env=env, log=log)
    try:
        wait_until_ready(
            f"http://127.0.0.1:{port}/ready", procs=[proc], timeout_s=90, logs=lambda: log.read_text(errors="replace")
        )
        yield TinyPoolApi(f"http://127.0.0.1:{port}", token, job_id, partner_code)
    finally:
        stop_process(proc)
        with get_session_factory()() as session:
            session.execute(delete(RetroTest).where(RetroTest.id == job_id))
            session.execute(delete(Partner).where(Partner.id == partner_id))
            session.execute(delete(User).where(User.username == username))
            session.commit()


async def _get_all(api: TinyPoolApi, paths: list[str]) -> list[int | str]:
    """GET every path at once; each answer's status, or the error that stood in for it."""
    limits = httpx.Limits(max_connections=len(paths))
    headers = {"Authorization": f"Bearer {api.token}"}
    async with httpx.AsyncClient(base_url=api.base_url, headers=headers, limits=limits, timeout=120) as client:

        async def one(path: str) -> int | str:
            try:
                return (await client.get(path)).status_code
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"

        return list(await asyncio.gather(*(one(p) for p in paths)))


def test_more_concurrent_reads_than_threads_on_a_one_connection_pool_all_answer(tiny_pool_api: TinyPoolApi) -> None:
    api = tiny_pool_api
    paths = [
        f"/api/v1/retro-tests/{api.job_id}",
        f"/api/v1/retro-tests?partner={api.partner_code}&limit=50",
        "/api/v1/me",  # an endpoint that returns a model through FastAPI's own serialization
    ]
    statuses = asyncio.run(_get_all(api, [paths[i % len(paths)] for i in range(CONCURRENT_REQUESTS)]))
    assert statuses == [200] * CONCURRENT_REQUESTS, sorted({str(s) for s in statuses})


def test_past_the_bound_requests_are_shed_with_retry_after_and_the_probes_still_answer(
    shedding_api: TinyPoolApi,
) -> None:
    """120 reads at once against a bound of 8 (issue 32): the ones past it are answered 503 with Retry-After instead
    of queueing behind a one-connection pool; everything else is a 200, and /health answers throughout."""
    api = shedding_api

    async def run() -> list[tuple[str, int, str | None]]:
        limits = httpx.Limits(max_connections=CONCURRENT_REQUESTS + 20)
        headers = {"Authorization": f"Bearer {api.token}"}
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, limits=limits, timeout=120) as client:

            async def one(path: str) -> tuple[str, int, str | None]:
                resp = await client.get(path)
                return path, resp.status_code, resp.headers.get("retry-after")

            reads = [f"/api/v1/retro-tests?partner={api.partner_code}&limit=50"] * CONCURRENT_REQUESTS
            return list(await asyncio.gather(*(one(p) for p in [*reads, *["/health"] * 20])))

    answers = asyncio.run(run())
    health = [status for path, status, _ in answers if path == "/health"]
    reads = [(status, retry) for path, status, retry in answers if path != "/health"]
    assert health == [200] * 20
    shed = [retry for status, retry in reads if status == 503]
    assert shed and all(retry == "1" for retry in shed), sorted({s for s, _ in reads})
    assert all(status in (200, 503) for status, _ in reads), sorted({s for s, _ in reads})
    assert sum(status == 200 for status, _ in reads) >= SHED_LIMIT
    # Once the burst is over the process serves again.
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {api.token}"}, timeout=30) as c:
        assert c.get(f"/api/v1/retro-tests/{api.job_id}").status_code == 200


def test_the_bound_shrinks_while_reads_wait_and_grows_back_when_they_are_fast() -> None:
    """The adaptive bound: reads answered later than the target cut it (never below the floor, at most once per
    target), fast ones add one each up to the configured limit; a stream's or an upload's time does not count."""
    from app.load_shedding import InFlightLimit

    delay = {"s": 0.0}

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await asyncio.sleep(delay["s"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def noop(_message):  # type: ignore[no-untyped-def]
        return None

    limit = InFlightLimit(app, limit=16, floor=4, target_s=0.05)

    async def call(path: str = "/api/v1/retro-tests", method: str = "GET") -> None:
        await limit({"type": "http", "path": path, "method": method, "headers": []}, noop, noop)

    async def run() -> list[int]:
        bounds = []
        delay["s"] = 0.07  # slower than the target
        for _ in range(8):
            await call()
            bounds.append(limit.bound)
        await call(method="POST")  # an upload's time says nothing about the queue
        await call(path=f"/api/v1/retro-tests/{uuid.uuid4()}/events")
        bounds.append(limit.bound)
        delay["s"] = 0.0
        for _ in range(200):  # a busy machine may make a few of them slower than half the target
            await call()
        bounds.append(limit.bound)
        return bounds

    bounds = asyncio.run(run())
    assert bounds[0] == 12 and bounds[7] == 4 and bounds[:8] == sorted(bounds[:8], reverse=True)
    assert bounds[8] == 4  # neither the POST nor the stream moved it
    assert bounds[9] == 16  # back to the limit, and no further
