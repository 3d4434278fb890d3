"""Recovery without beat: a worker killed mid-job and started again picks its job back up at once and leaves no
temporary files of the killed processes behind, and a model server killed mid-scoring is re-created at once instead
of after a run of retries against a closed port."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import HISTORY_DAYS, Stack, start_process, start_stack
from tests.old_model import OldModel
from tests.test_end_to_end import mlserver_processes_for, submit

BIG_ROWS = HISTORY_DAYS * 150_000


@pytest.fixture(scope="module")
def lone_stack(
    database_url: str, registry: dict[str, str], history: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, dict[str, str]]]:
    """An API and one worker on a queue of their own, and no beat: nothing else would recover their jobs.

    With a TMPDIR and RETRO_VAR_DIR of their own, so a test sees every temporary file the worker leaves there.
    """
    own = tmp_path_factory.mktemp("recovery")
    (own / "tmp").mkdir()
    overrides = {
        "RETRO_QUEUE_NAME": f"recovery-{uuid.uuid4().hex[:8]}",
        "RETRO_HEARTBEAT_INTERVAL_S": "1",
        "TMPDIR": str(own / "tmp"),
        "RETRO_VAR_DIR": str(own / "var"),
        "RETRO_ENV_CACHE_DIR": os.environ["RETRO_ENV_CACHE_DIR"],  # built once per test run
    }
    s = start_stack(f"recovery-{uuid.uuid4().hex[:6]}", **overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETRO_PUBLIC_BASE_URL": s.base_url, **overrides}
    yield s, env
    s.stop()


def _wait(stack: Stack, job_id: str, until: Any, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    with stack.client() as c:
        while True:
            job = c.get(f"/api/v1/retro-tests/{job_id}").json()
            if until(job):
                return dict(job)
            assert time.monotonic() < deadline, f"{job}\n{stack.tail()}"
            time.sleep(0.2)


def _finished(job: dict[str, Any]) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def _temporary_files(env: dict[str, str]) -> set[Path]:
    """Model copies and multiprocessing folders anywhere under the stack's TMPDIR and RETRO_VAR_DIR."""
    found: set[Path] = set()
    for root in (Path(env["TMPDIR"]), Path(env["RETRO_VAR_DIR"])):
        for pattern in ("retro-model-*", "pymp-*"):
            found.update(root.rglob(pattern))
    return found


def test_a_worker_killed_mid_job_and_restarted_resumes_its_job_without_beat(
    lone_stack: tuple[Stack, dict[str, str]], big_history: str, old_model: OldModel
) -> None:
    """A job comparing two models (issue 30): after the restart, every (row, model) pair is scored exactly once."""
    stack, env = lone_stack
    two_models = [{"name": "churn", "version": "1"}, {"name": old_model.name, "version": "1"}]
    job = submit(
        stack, "recovery-worker", source={"table": big_history}, model_name=None, model_alias=None, models=two_models
    )
    _wait(stack, job["id"], lambda j: j["progress"]["rows_scored"] >= BIG_ROWS // 3)
    worker = stack.procs[1]
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool processes, as an OOM kill or a lost node would
    worker.wait()
    left_by_killed = _temporary_files(env)
    assert any(p.name.startswith("retro-model-") for p in left_by_killed), left_by_killed  # the job's model copy
    log = stack.logs / "worker-restarted.log"
    stack.procs.append(
        start_process([sys.executable, "-m", "app.cli", "worker", "--name", "restarted"], env=env, log=log)
    )
    done = _wait(stack, job["id"], _finished, timeout_s=300)
    assert done["state"] == "succeeded", (done["error"], stack.tail())
    assert done["progress"]["rows_scored"] == done["progress"]["rows_total"] == BIG_ROWS
    assert done["attempts"] == 2
    assert "held by a process on this host that died; sending it again" in log.read_text()
    assert next(f["rows"] for f in done["files"] if f["name"] == "scores.parquet") == BIG_ROWS
    assert [m["rows_scored"] for m in done["models"]] == [BIG_ROWS, BIG_ROWS]
    scores = _download_scores(stack, done)
    assert len(scores) == BIG_ROWS and not scores.duplicated(["customer_id", "snapshot_date"]).any()
    model_columns = [c for c in scores.columns if c.startswith(("churn_v1_", f"{old_model.name}_v1_"))]
    assert len(model_columns) == 3 and scores[model_columns].notna().all().all()
    assert mlserver_processes_for(done["id"]) == []
    # Nothing the killed processes left is there any more (issue 32); the restarted worker's copy went with its job.
    remaining = _temporary_files(env)
    assert not left_by_killed & remaining, sorted(left_by_killed & remaining)
    assert not [p for p in remaining if p.name.startswith("retro-model-")], remaining


def _download_scores(stack: Stack, job: dict[str, Any]) -> pd.DataFrame:
    url = next(f["download_url"] for f in job["files"] if f["name"] == "scores.parquet")
    with stack.client() as c:
        return pq.read_table(io.BytesIO(c.get(url).content)).to_pandas()


def test_a_model_server_killed_mid_scoring_is_re_created_at_once(
    lone_stack: tuple[Stack, dict[str, str]], big_history: str
) -> None:
    stack, _ = lone_stack
    job = submit(stack, "recovery-server", source={"table": big_history})
    _wait(stack, job["id"], lambda j: j["progress"]["rows_scored"] >= BIG_ROWS // 3)
    servers = mlserver_processes_for(job["id"])
    assert servers
    # Recognised from the process being gone, not after the retries against a closed port ran out.
    worker_log = _killed_and_re_created(stack, job["id"], servers, says="has exited")
    assert "scoring failed after" not in worker_log


def _killed_and_re_created(stack: Stack, job_id: str, servers: list[int], *, says: str) -> str:
    """SIGKILL the job's model servers; the job succeeds with every row, its worker having said `says` and
    re-created the server once; returns the workers' log."""
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    done = _wait(stack, job_id, _finished, timeout_s=300)
    assert done["state"] == "succeeded", (done["error"], stack.tail())
    assert done["progress"]["rows_scored"] == BIG_ROWS
    worker_log = "".join(log.read_text() for log in stack.logs.glob("worker*.log"))
    assert says in worker_log and "re-creating it (1 of" in worker_log, worker_log[-3000:]
    return worker_log


def test_a_model_server_killed_while_it_starts_is_re_created(
    lone_stack: tuple[Stack, dict[str, str]], big_history: str
) -> None:
    """The soak found a job failed 'the model server exited while starting' when its server was killed before it
    was ready: a server killed from outside names no exception, and is re-created like one lost mid-scoring."""
    stack, _ = lone_stack
    job = submit(stack, "recovery-start", source={"table": big_history})
    deadline = time.monotonic() + 120
    servers: list[int] = []
    while not servers and time.monotonic() < deadline:
        servers = mlserver_processes_for(job["id"])
        time.sleep(0.05)
    assert servers, stack.tail()
    _killed_and_re_created(stack, job["id"], servers, says="exited while starting")
