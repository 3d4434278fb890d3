"""Warm model servers (issue 31): the pool's rules on the database, and jobs that attach to a warm MLServer.

The pool's rows (app/retro_tests/warm_pool.py) are checked on the session's PostgreSQL; the jobs run on a stack of
their own (the API and a real Celery worker with RETRO_WARM_TTL_S on, its own queue) with real MLServer processes.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy.orm import Session

from app.clock import utcnow
from app.retro_tests import warm_pool
from tests.conftest import ROOT, Stack, start_stack
from tests.factories import make_retro_test
from tests.test_end_to_end import END, HISTORY_START, mlserver_processes_for, submit

KEY = "k" * 64
HOST = "host-a"


def _new(session: Session, name: str, job_id: uuid.UUID, *, key: str = KEY, host: str = HOST) -> None:
    new = warm_pool.NewWarm(name=name, key=key, deployer="local", host=host, model_name="churn", model_version="1")
    warm_pool.register(session, new=new, job_id=job_id, now=utcnow())
    warm_pool.mark_ready(session, name=name, endpoint={"name": name, "base_url": "http://x", "model_name": name})


def _job(session: Session) -> uuid.UUID:
    return make_retro_test(session, start=HISTORY_START, end=END)


def test_a_job_attaches_only_to_a_ready_deployment_of_its_key_and_host_with_room(db_session: Session) -> None:
    first, second, third = _job(db_session), _job(db_session), _job(db_session)
    now = utcnow()
    new = warm_pool.NewWarm(name="retro-a", key=KEY, deployer="local", host=HOST, model_name="churn", model_version="1")
    warm_pool.register(db_session, new=new, job_id=first, now=now)
    # Still starting (its first job has not checked it): nobody attaches.
    assert warm_pool.attach(db_session, key=KEY, host=HOST, job_id=second, share=2, now=now) is None
    warm_pool.mark_ready(db_session, name="retro-a", endpoint={"name": "retro-a", "base_url": "u", "model_name": "m"})
    assert warm_pool.attach(db_session, key="other" * 8, host=HOST, job_id=second, share=2, now=now) is None
    assert warm_pool.attach(db_session, key=KEY, host="host-b", job_id=second, share=2, now=now) is None
    assert warm_pool.attach(db_session, key=KEY, host=HOST, job_id=second, share=2, now=now) == {
        "name": "retro-a",
        "base_url": "u",
        "model_name": "m",
    }
    # Two jobs on it: full at share 2.
    assert warm_pool.attach(db_session, key=KEY, host=HOST, job_id=third, share=2, now=now) is None
    [entry] = warm_pool.entries(db_session)
    assert (entry.jobs, entry.jobs_served, entry.expires_at) == (2, 2, None)


def test_a_job_leaving_keeps_a_shared_deployment_and_the_last_one_starts_its_ttl(db_session: Session) -> None:
    first, second = _job(db_session), _job(db_session)
    now = utcnow()
    _new(db_session, "retro-a", first)
    assert warm_pool.attach(db_session, key=KEY, host=HOST, job_id=second, share=4, now=now) is not None
    # The first job is cancelled: the deployment stays for the second, with no expiry while it is in use.
    assert warm_pool.release(db_session, name="retro-a", job_id=first, ttl_s=60, now=now) is True
    assert warm_pool.entries(db_session)[0].expires_at is None
    assert warm_pool.evict(db_session, host=HOST, max_count=1, now=now + timedelta(hours=1)) == []
    assert warm_pool.release(db_session, name="retro-a", job_id=second, ttl_s=60, now=now) is True
    assert warm_pool.entries(db_session)[0].expires_at == now + timedelta(seconds=60)
    assert warm_pool.evict(db_session, host=HOST, max_count=4, now=now + timedelta(seconds=59)) == []
    assert warm_pool.evict(db_session, host=HOST, max_count=4, now=now + timedelta(seconds=61)) == [
        ("retro-a", "expired")
    ]
    assert warm_pool.entries(db_session) == []


def test_without_a_ttl_or_before_its_check_passed_a_deployment_goes_with_its_job(db_session: Session) -> None:
    first, second = _job(db_session), _job(db_session)
    now = utcnow()
    _new(db_session, "retro-a", first)
    assert warm_pool.release(db_session, name="retro-a", job_id=first, ttl_s=0, now=now) is False
    new = warm_pool.NewWarm(name="retro-b", key=KEY, deployer="local", host=HOST, model_name="churn", model_version="1")
    warm_pool.register(db_session, new=new, job_id=second, now=now)  # never marked ready: its check failed
    assert warm_pool.release(db_session, name="retro-b", job_id=second, ttl_s=60, now=now) is False
    assert warm_pool.entries(db_session) == []


def test_over_the_limit_idle_deployments_go_least_recently_used_first_never_busy_ones(db_session: Session) -> None:
    jobs = [_job(db_session) for _ in range(4)]
    start = utcnow()
    for i, job in enumerate(jobs):
        _new(db_session, f"retro-{i}", job)
    # 0 and 1 idle (0 used longest ago), 2 busy, 3 idle and newest.
    for i, at in ((0, 1), (1, 2), (3, 4)):
        warm_pool.release(db_session, name=f"retro-{i}", job_id=jobs[i], ttl_s=3600, now=start + timedelta(seconds=at))
    assert warm_pool.evict(db_session, host=HOST, max_count=2, now=start + timedelta(seconds=5)) == [
        ("retro-0", "evicted"),
        ("retro-1", "evicted"),
    ]
    assert {e.name for e in warm_pool.entries(db_session)} == {"retro-2", "retro-3"}
    # Another host's servers are not this host's to stop.
    assert warm_pool.evict(db_session, host="host-b", max_count=0, now=start) == []


def test_a_drained_deployment_takes_no_job_and_goes_when_its_last_job_leaves(db_session: Session) -> None:
    first, second = _job(db_session), _job(db_session)
    now = utcnow()
    _new(db_session, "retro-a", first)
    warm_pool.drain(db_session)
    assert warm_pool.attach(db_session, key=KEY, host=HOST, job_id=second, share=4, now=now) is None
    assert warm_pool.evict(db_session, host=HOST, max_count=4, now=now) == []  # in use
    assert warm_pool.release(db_session, name="retro-a", job_id=first, ttl_s=600, now=now) is False
    assert warm_pool.entries(db_session) == []


def test_a_job_that_ended_while_attached_is_detached_and_its_deployment_idles(db_session: Session) -> None:
    from app.core.jobs import RetroTest, State

    killed, running = _job(db_session), _job(db_session)
    now = utcnow()
    _new(db_session, "retro-a", killed)
    _new(db_session, "retro-b", running)
    db_session.get(RetroTest, killed).state = State.failed  # type: ignore[union-attr]
    db_session.flush()
    assert warm_pool.detach_ended_jobs(db_session, ttl_s=30, now=now) == 1
    by_name = {e.name: e for e in warm_pool.entries(db_session)}
    assert (by_name["retro-a"].jobs, by_name["retro-a"].expires_at) == (0, now + timedelta(seconds=30))
    assert (by_name["retro-b"].jobs, by_name["retro-b"].expires_at) == (1, None)


# --- jobs on a real worker with the pool on ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_stack(database_url: str, registry: dict[str, str], history: Path) -> Iterator[Stack]:
    """A stack with the pool on and its own queue (the session's stack has the pool off)."""
    s = start_stack("warm", RETRO_WARM_TTL_S="600", RETRO_QUEUE_NAME=f"warm-{uuid.uuid4().hex[:8]}")
    try:
        yield s
    finally:
        s.stop()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RETRO_WARM_TTL_S": "600"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def _manifest(stack: Stack, job: dict[str, Any]) -> dict[str, Any]:
    [manifest] = [f for f in job["files"] if f["name"] == "manifest.internal.json"]
    with stack.client() as c:
        return dict(json.loads(c.get(manifest["download_url"]).content))


def _scores(stack: Stack, job: dict[str, Any]) -> Any:
    [scores] = [f for f in job["files"] if f["name"] == "scores.parquet"]
    with stack.client() as c:
        table = pq.read_table(io.BytesIO(c.get(scores["download_url"]).content)).to_pandas()
    return table.sort_values(["customer_id", "snapshot_date"]).reset_index(drop=True)


def test_the_second_job_of_a_model_scores_on_the_first_ones_server_checked_again(warm_stack: Stack) -> None:
    first = submit(warm_stack, "warm-first", output_formats=["parquet"])
    first = warm_stack.wait(first["id"], until={"succeeded", "failed", "cancelled"})
    assert first["state"] == "succeeded", first
    assert first["deployment_warm"] is False
    servers = mlserver_processes_for(first["id"])
    assert servers, "the first job's model server should still run, warm"

    second = submit(warm_stack, "warm-second", output_formats=["parquet"])
    second = warm_stack.wait(second["id"], until={"succeeded", "failed", "cancelled"})
    assert second["state"] == "succeeded", second
    assert second["deployment_warm"] is True
    assert second["validation"]["passed"] is True  # the reference check ran again on the warm server
    assert "deploying" in [s["state"] for s in second["stages"]]
    assert mlserver_processes_for(second["id"]) == []  # no server of its own
    assert mlserver_processes_for(first["id"]) == servers  # the same process served both
    assert _manifest(warm_stack, first)["scoring"]["deployment"] == "new"
    assert _manifest(warm_stack, second)["scoring"]["deployment"] == "warm"
    assert _scores(warm_stack, first)[["p_stay", "p_churn"]].equals(_scores(warm_stack, second)[["p_stay", "p_churn"]])

    listed = _cli("servers", "list")
    assert listed.returncode == 0, listed.stderr
    assert "retro-" + first["id"].replace("-", "")[:24] in listed.stdout and "churn/1" in listed.stdout

    drained = _cli("servers", "drain")
    assert drained.returncode == 0, drained.stderr
    assert "stopped 1 idle warm model server" in drained.stdout
    deadline = time.monotonic() + 30
    while mlserver_processes_for(first["id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mlserver_processes_for(first["id"]) == []
    assert "no warm model servers" in _cli("servers", "list").stdout


def test_a_warm_server_that_died_while_idle_is_replaced_and_the_job_succeeds(warm_stack: Stack) -> None:
    first = warm_stack.wait(submit(warm_stack, "warm-dies")["id"], until={"succeeded", "failed", "cancelled"})
    assert first["state"] == "succeeded", first
    for pid in mlserver_processes_for(first["id"]):
        os.kill(pid, signal.SIGKILL)

    second = warm_stack.wait(submit(warm_stack, "warm-dies-2")["id"], until={"succeeded", "failed", "cancelled"})
    assert second["state"] == "succeeded", second
    # It attached, found the server gone, and started its own, which stays warm in the pool instead.
    assert second["deployment_warm"] is False
    assert mlserver_processes_for(second["id"])
    progress = second["progress"]
    assert progress["rows_total"] == progress["rows_scored"]
    with Session(bind=_engine()) as s:
        assert [e.name for e in warm_pool.entries(s)] == ["retro-" + second["id"].replace("-", "")[:24]]
    assert _cli("servers", "drain").returncode == 0


def _engine() -> Any:
    from app.db import get_engine

    return get_engine()


# --- two jobs on one warm server, in this process: one is cancelled while both score ------------------------------


class Gate:
    """A history source whose second chunk query waits until the test opens the gate: the job is scoring then."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._calls = 0
        self.reached = threading.Event()  # the job is reading its second chunk: it scores
        self.open = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def batches(self, query: Any, *, batch_rows: int) -> Iterator[Any]:
        self._calls += 1
        if self._calls == 2:
            self.reached.set()
            assert self.open.wait(120), "the test never opened the gate"
        yield from self._inner.batches(query, batch_rows=batch_rows)


def _run_in_process(job_id: uuid.UUID, settings: Any, *, source: Any = None) -> Any:
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters, run_retro_test

    adapters = Adapters(
        registry=make_registry(settings),
        source=source or make_history_source(settings),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )
    return run_retro_test(job_id=job_id, sessions=get_session_factory(), adapters=adapters, settings=settings)


def _row(job_id: uuid.UUID) -> Any:
    from app.core.jobs import RetroTest
    from app.db import get_session_factory

    with get_session_factory()() as s:
        return s.get(RetroTest, job_id)


def _wait(check: Any, *, what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def test_cancelling_one_of_two_jobs_on_a_warm_server_leaves_the_other_scoring_to_success(
    database_url: str, registry: dict[str, str], history: Path
) -> None:
    from app.config import Settings
    from app.core.jobs import RetroTest, State
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source
    from worker.warm import WarmPool

    settings = Settings(warm_ttl_s=600, heartbeat_interval_s=0.3)
    sessions = get_session_factory()

    def new_job() -> uuid.UUID:
        with sessions.begin() as s:
            return make_retro_test(s, start=HISTORY_START, end=END, partner_prefix="warm-share")

    pool = WarmPool(sessions=sessions, deployer=make_deployer(settings), settings=settings)
    try:
        first = new_job()
        assert _run_in_process(first, settings) == State.succeeded, _row(first).error_message
        server = _row(first).deployment_name
        pids = mlserver_processes_for(str(first))
        assert pids, "the first job's server should stay, warm"

        gates = {"cancelled": Gate(make_history_source(settings)), "kept": Gate(make_history_source(settings))}
        jobs = {name: new_job() for name in gates}
        with ThreadPoolExecutor(2) as threads:
            ends = {name: threads.submit(_run_in_process, jobs[name], settings, source=gates[name]) for name in gates}
            for name, job_id in jobs.items():  # both attached to the warm server and score their first chunk
                assert gates[name].reached.wait(120), f"the {name} job never reached its second chunk"
                _wait(lambda j=job_id: _row(j).state == State.scoring, what=f"the {name} job is not scoring")
                assert (_row(job_id).deployment_name, _row(job_id).deployment_warm) == (server, True)
            assert [e.jobs for e in _entries()] == [2]

            with sessions.begin() as s:
                s.get(RetroTest, jobs["cancelled"]).cancel_requested = True  # type: ignore[union-attr]
            gates["cancelled"].open.set()
            assert ends["cancelled"].result(timeout=120) == State.cancelled
            # The server is the other job's still: running, in the pool, with one job on it.
            assert mlserver_processes_for(str(first)) == pids
            assert [(e.name, e.jobs) for e in _entries()] == [(server, 1)]

            gates["kept"].open.set()
            assert ends["kept"].result(timeout=120) == State.succeeded, _row(jobs["kept"]).error_message
        kept = _row(jobs["kept"])
        assert kept.rows_scored == kept.rows_total and kept.rows_rejected == 0
        assert [(e.name, e.jobs) for e in _entries()] == [(server, 0)]
    finally:
        pool.drain()
    assert mlserver_processes_for(str(first)) == []


def _entries() -> list[warm_pool.PoolEntry]:
    with Session(bind=_engine()) as s:
        return warm_pool.entries(s)


def test_a_local_server_over_the_memory_budget_is_stopped_when_its_job_leaves_it_idle(
    database_url: str, registry: dict[str, str], history: Path
) -> None:
    from app.config import Settings
    from app.core.jobs import State
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer

    sessions = get_session_factory()
    with sessions.begin() as s:
        job_id = make_retro_test(s, start=HISTORY_START, end=END, partner_prefix="warm-memory")
    # An MLServer holds well over 1 MB: idle, it is over the budget at once.
    settings = Settings(warm_ttl_s=600, warm_max_memory_mb=1)
    assert make_deployer(settings).memory_bytes("retro-none") == 0  # type: ignore[attr-defined]
    assert _run_in_process(job_id, settings) == State.succeeded, _row(job_id).error_message
    assert _row(job_id).deployment_warm is False
    assert mlserver_processes_for(str(job_id)) == []
    assert _entries() == []


def test_a_job_whose_own_name_serves_other_jobs_starts_its_deployment_under_another(database_url: str) -> None:
    from app.config import Settings
    from app.core.model_types import ModelVersionInfo
    from app.db import get_session_factory
    from app.integrations.deployers.port import deployment_name
    from worker.warm import WarmPool, pool_host

    settings = Settings(warm_ttl_s=600)
    sessions = get_session_factory()
    with sessions.begin() as s:
        job, other = _job(s), _job(s)
    own, key = deployment_name(job), uuid.uuid4().hex * 2
    model = ModelVersionInfo(name="churn", version="1", run_id="r", source="", artifact_uri="", inputs=(), outputs=())
    pool = WarmPool(sessions=sessions, deployer=None, settings=settings)  # type: ignore[arg-type]
    second = ""
    try:
        # An earlier attempt of the job started `own`, and another job scores on it now.
        assert pool.register(name=own, key=key, job_id=job, model=model) == own
        with sessions.begin() as s:
            warm_pool.mark_ready(s, name=own, endpoint={"name": own, "base_url": "u", "model_name": own})
            assert warm_pool.attach(s, key=key, host=pool_host(settings), job_id=other, share=4, now=utcnow())
        # The job's next attempt starts a deployment (its own was full, say) under another name: `own` keeps the
        # other job, and is not replaced under it.
        second = pool.register(name=own, key=key, job_id=job, model=model)
        assert second != own and second.startswith("retro-")
        with sessions() as s:
            jobs = {e.name: e.jobs for e in warm_pool.entries(s)}
        assert (jobs[own], jobs[second]) == (1, 1)
    finally:
        with sessions.begin() as s:
            for name in (own, second):
                warm_pool.remove(s, name=name)
