"""Metrics and logs: the API's /metrics, JSON log lines with the job id, beat and the worker's metrics port."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from app.logging_setup import JobIdFilter, JsonFormatter, job_context
from tests.conftest import REDIS_URL, free_port, start_process, stop_process


def test_the_api_serves_job_counts_from_the_database(client: Any) -> None:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for state in ("queued", "scoring", "succeeded", "failed", "cancelled"):
        assert f'retrotest_jobs{{state="{state}"}}' in text
    assert 'retrotest_job_rows{kind="scored"}' in text
    assert "retrotest_jobs_holding_deployment" in text
    assert "retrotest_database_up 1.0" in text


def test_log_lines_are_json_with_the_job_id_while_a_job_runs() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.observability")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        with job_context("5d0c2b8e-0000-4000-8000-000000000001"):
            logger.info("scored %d rows", 5000)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("outside any job")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "scored 5000 rows" and inside["level"] == "INFO"
    assert inside["job_id"] == "5d0c2b8e-0000-4000-8000-000000000001" and inside["logger"] == "tests.observability"
    assert "job_id" not in outside and "RuntimeError: boom" in outside["exception"]


def test_beat_runs_the_reaper_and_the_worker_serves_its_childrens_metrics(database_url: str, tmp_path: Path) -> None:
    import redis as redis_lib

    from app.queue import REAP_DEPLOYMENTS, celery_client

    queue = f"retrotest-beat-{secrets.token_hex(4)}"
    port = free_port()
    env = {
        **os.environ,
        "RETRO_QUEUE_NAME": queue,
        "RETRO_REAPER_INTERVAL_S": "1",
        "RETRO_RECONCILE_INTERVAL_S": "3600",  # not this test's business: leave other tests' jobs alone
        "RETRO_WORKER_METRICS_PORT": str(port),
        "RETRO_VAR_DIR": str(tmp_path / "var"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    exe = [sys.executable, "-m", "app.cli"]
    procs = [
        start_process([*exe, "beat"], env=env, log=tmp_path / "beat.log"),
        start_process([*exe, "worker"], env=env, log=tmp_path / "worker.log"),
    ]
    try:
        # A reaper sent to the job queue runs in the worker's forked child; the parent serves what it counted.
        celery_client().send_task(REAP_DEPLOYMENTS, queue=queue)
        deadline = time.monotonic() + 180
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.HTTPError:
                text = ""
            runs = [line for line in text.splitlines() if line.startswith("retrotest_reaper_runs_total")]
            if runs and float(runs[0].split()[-1]) >= 1:
                break
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.3)
        # Beat sends the reaper every second to its own control queue, and runs it there itself.
        while not any("retrotest.reap_deployments" in m and "succeeded" in m for m in _messages(tmp_path / "beat.log")):
            assert time.monotonic() < deadline, (tmp_path / "beat.log").read_text()[-3000:]
            time.sleep(0.3)
    finally:
        for proc in procs:
            stop_process(proc)
        redis = redis_lib.Redis.from_url(REDIS_URL)
        redis.delete(queue, f"{queue}.control")
    assert any("Sending due task reap-deployments" in m for m in _messages(tmp_path / "beat.log"))
    for log in ("beat.log", "worker.log"):
        lines = [json.loads(line) for line in (tmp_path / log).read_text().splitlines() if line.startswith("{")]
        assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines), log


def _messages(path: Path) -> list[str]:
    """The messages of the JSON log lines in a process's log file."""
    return [json.loads(line)["message"] for line in path.read_text().splitlines() if line.startswith("{")]
