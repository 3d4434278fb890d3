"""Beat during a Redis outage, on a Redis server of the test's own: each repeated error is one line per window and
then a "repeated N times" count, not a line per tick and per reconnect attempt (issue 32: ~3,800 lines in 30 s)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from app.demo import stop_process
from tests.chaos.run import start_redis
from tests.conftest import free_port, start_process

OUTAGE_S = 20
WINDOW_S = 6


def _records(log: Path, since: int) -> list[dict[str, str]]:
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()[since:] if line.startswith("{")]


def _wait_for(log: Path, text: str, *, since: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in r["message"] for r in _records(log, since)):
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.3)


@pytest.mark.usefixtures("database_url")
def test_beat_writes_a_repeated_error_once_per_window_with_a_count(tmp_path: Path) -> None:
    port = free_port()
    redis = start_redis(port, tmp_path)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RETRO_VAR_DIR": str(tmp_path / "var"),
        "RETRO_BROKER_URL": f"redis://127.0.0.1:{port}/0",
        "RETRO_RECONCILE_INTERVAL_S": "1",  # a tick a second: 30 times what a default beat sends
        "RETRO_REAPER_INTERVAL_S": "1",
        "RETRO_LOG_REPEAT_WINDOW_S": str(WINDOW_S),
    }
    log = tmp_path / "beat.log"
    beat = start_process([sys.executable, "-m", "app.cli", "beat"], env=env, log=log)
    try:
        _wait_for(log, "Connected to", since=0)
        _wait_for(log, "Sending due task reconcile-jobs", since=0)
        before = len(log.read_text(errors="replace").splitlines())
        os.killpg(redis.pid, signal.SIGKILL)
        redis.wait()
        time.sleep(OUTAGE_S)
        during = _records(log, before)
        redis = start_redis(port, tmp_path)
        _wait_for(log, "Connected to", since=before, timeout_s=60)
    finally:
        stop_process(beat)
        os.killpg(redis.pid, signal.SIGKILL)
        redis.wait()

    problems = [r for r in during if r["level"] in ("WARNING", "ERROR", "CRITICAL")]
    alike = Counter(re.sub(r"\d+(\.\d+)?|\(repeated.*", "#", r["message"]) for r in problems)
    text_lines = sum(r["message"].count("\n") + r.get("exception", "").count("\n") + 1 for r in during)
    print(
        f"{len(during)} records ({text_lines} lines as text) in a {OUTAGE_S}-s outage, {len(problems)} warnings/errors"
    )
    assert alike, during
    # Each kind of error: its first line, then one line per window at most (a count, or itself again).
    most = OUTAGE_S // WINDOW_S + 2
    assert max(alike.values()) <= most, alike.most_common(5)
    repeated = [int(m.group(1)) for r in problems if (m := re.search(r"\(repeated (\d+) times", r["message"]))]
    assert repeated and max(repeated) >= WINDOW_S // 2, [r["message"] for r in problems]


def test_alike_errors_are_written_once_per_window_then_counted() -> None:
    import io
    import logging

    from app.logging_setup import RepeatLimitingHandler

    stream = io.StringIO()
    handler = RepeatLimitingHandler(stream, window_s=0.3)
    log = logging.getLogger("celery.test_repeats")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        for attempt in range(1, 11):
            log.error("Cannot connect: trying again in %d s (%d/100)", attempt, attempt)
        log.info("an info line is never held back")
        time.sleep(0.35)
        log.info("connected")  # the window is over: its count comes first
        logging.getLogger("app.db").addHandler(handler)
        for _ in range(2):  # our own modules log state changes: never held back
            logging.getLogger("app.db").warning("the database answers again after 3.9 s")
        logging.getLogger("app.db").removeHandler(handler)
    finally:
        log.removeHandler(handler)
        handler.close()
    assert stream.getvalue().splitlines() == [
        "Cannot connect: trying again in 1 s (1/100)",
        "an info line is never held back",
        "Cannot connect: trying again in 1 s (1/100) (repeated 9 times in 0.3 s)",
        "connected",
        "the database answers again after 3.9 s",
        "the database answers again after 3.9 s",
    ]
