"""A small chaos run in CI: workers killed (once while publishing), Redis and PostgreSQL restarted, a flaky model
server, poison rows, cancel, API restart.

The full run (1,000,000 rows) is `python -m tests.chaos.run`; its closing report is what the targets are judged on.
CI checks every correctness target on a small job, and the time only loosely (a shared 2-core machine).
The run gets its own process: it sets up its own database, Redis and settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.integration  # starts PostgreSQL, Redis, workers and model servers of its own
def test_small_chaos_run_loses_and_duplicates_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRO_") or k.startswith("RETRO_TEST_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.chaos.run",
            "--rows",
            "600000",  # enough scoring time for the six scoring strikes to land while the job scores
            "--days",
            "12",
            "--kills",
            "2",
            "--batch",
            "5000",
            "--poison",
            "12",
            "--max-ratio",
            "4",
            "--timeout",
            "400",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr[-3000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, out
    report = json.loads(line[len("RESULT ") :])
    assert report["chaos_state"] == "succeeded", out
    assert report["rows_lost"] == 0 and report["rows_duplicated"] == 0, out
    assert report["poison_isolated"] == report["poison_rows"] > 0 and report["clean_rows_rejected"] == 0, out
    assert report["orphan_deployments"] == 0, out
    assert report["cancelled_job_state"] == "cancelled", out
    # Every blow landed: six while it scored (cancel, two kills, Redis, PostgreSQL, API), one while it published.
    assert report["strikes_done"] == report["strikes_planned"] == 7, out
    assert report["processes_exited_on_their_own"] == 0, out  # e.g. a worker ended by the Redis restart
    assert proc.returncode == 0, out
