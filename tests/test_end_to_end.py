"""Whole retro tests through the REST API, a real Celery worker, real MLServer and real files."""

from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import HISTORY_DAYS, HISTORY_START, ROWS_PER_DAY, Stack

END = HISTORY_START + timedelta(days=HISTORY_DAYS - 1)


def mlserver_processes_for(job_id: str) -> list[int]:
    """Pids of model servers started for this job (their cmdline holds the deployment folder)."""
    name = f"retro-{job_id.replace('-', '')[:24]}"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if name.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def submit(stack: Stack, partner: str, **overrides: Any) -> dict[str, Any]:
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": partner, "name": partner})
        body = {
            "partner_code": partner,
            "model_name": "churn",
            "model_alias": "champion",
            "period_start": HISTORY_START.isoformat(),
            "period_end": END.isoformat(),
            **overrides,
        }
        resp = c.post("/api/v1/retro-tests", json=body)
        assert resp.status_code == 202, resp.text
        return dict(resp.json())


def source_rows(history: Path, table: str = "features.customer_daily") -> pd.DataFrame:
    dataset = ds.dataset(history.joinpath(*table.split(".")), format="parquet", partitioning="hive")
    df = dataset.to_table().to_pandas()
    df["snapshot_date"] = pd.to_datetime(df["snapshot_date"]).dt.date
    return df


def test_scores_equal_the_model_in_process_and_every_row_is_there_once(stack: Stack, history: Path) -> None:
    import mlflow

    job = submit(stack, "e2e-main")
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert done["state"] == "succeeded", done
    expected_rows = HISTORY_DAYS * ROWS_PER_DAY
    progress = done["progress"]
    assert progress["rows_total"] == progress["rows_read"] == progress["rows_scored"] == expected_rows
    assert progress["chunks_done"] == progress["chunks_total"] == HISTORY_DAYS
    assert [s["state"] for s in done["stages"]] == [
        "queued",
        "resolving",
        "extracting",
        "preparing_environment",
        "deploying",
        "validating",
        "scoring",
        "publishing",
        "succeeded",
    ]
    # The server ran from the model's own pins, and scored its input example as mlflow does in-process.
    import sklearn

    env = done["environment"]
    assert env["packages"]["scikit-learn"] == sklearn.__version__ and env["server_version"] == "1.7.1"
    check = done["validation"]
    assert check["passed"] is True and check["rows"] == 20 and check["max_abs_diff"] <= 1e-9
    assert "input example" in check["source"]

    files = {f["name"]: f for f in done["files"]}
    assert set(files) == {
        "scores.parquet",
        "scores.csv.gz",
        "requirements.lock",
        "manifest.json",
        "manifest.internal.json",
        "report.html",
        "report.json",
    }
    with stack.client() as c:
        blobs = {name: c.get(f["download_url"]).content for name, f in files.items()}
    for name, f in files.items():
        assert hashlib.sha256(blobs[name]).hexdigest() == f["sha256"]
        assert len(blobs[name]) == f["bytes"]

    scores = pq.read_table(io.BytesIO(blobs["scores.parquet"])).to_pandas()
    assert list(scores.columns) == ["customer_id", "snapshot_date", "p_stay", "p_churn"]
    assert len(scores) == expected_rows
    assert not scores.duplicated(["customer_id", "snapshot_date"]).any()

    src = source_rows(history)
    model = mlflow.pyfunc.load_model("models:/churn/1")
    feature_names = [c["name"] for c in json.loads(blobs["manifest.internal.json"])["model"]["inputs"]]
    expected = np.asarray(model.predict(src[feature_names]))
    merged = (
        src[["customer_id", "snapshot_date"]]
        .assign(e_stay=expected[:, 0], e_churn=expected[:, 1])
        .merge(scores, on=["customer_id", "snapshot_date"], how="outer", indicator=True)
    )
    assert (merged["_merge"] == "both").all(), "result rows differ from source rows"
    diff = max(np.abs(merged.e_stay - merged.p_stay).max(), np.abs(merged.e_churn - merged.p_churn).max())
    assert diff <= 1e-9, diff

    csv = pacsv.read_csv(pa.py_buffer(__import__("gzip").decompress(blobs["scores.csv.gz"]))).to_pandas()
    assert len(csv) == expected_rows and list(csv.columns) == list(scores.columns)

    for_partner = json.loads(blobs["manifest.json"])  # what a partner's link serves: no internal details
    assert for_partner["model"] == {"name": "churn", "version": "1"} and "source" not in for_partner
    assert done["model_run_id"] not in blobs["manifest.json"].decode()
    assert {f["name"] for f in for_partner["files"]} == {  # requirements.lock is for staff (issue 26, N10)
        "scores.parquet",
        "scores.csv.gz",
        "report.html",
        "report.json",
    }
    manifest = json.loads(blobs["manifest.internal.json"])  # the full one, for staff
    assert manifest["model"]["name"] == "churn" and manifest["model"]["version"] == "1"
    assert manifest["model"]["run_id"] == done["model_run_id"]
    assert manifest["rows"] == {"total": expected_rows, "read": expected_rows, "scored": expected_rows, "rejected": 0}
    assert "BETWEEN $start AND $end" in manifest["source"]["query"]
    assert {f["name"]: f["sha256"] for f in manifest["files"]} == {
        n: files[n]["sha256"]
        for n in ("scores.parquet", "scores.csv.gz", "requirements.lock", "report.html", "report.json")
    }
    assert manifest["environment"]["packages"] == env["packages"] and manifest["validation"] == check
    assert f"scikit-learn=={sklearn.__version__}" in blobs["requirements.lock"].decode().splitlines()
    assert mlserver_processes_for(job["id"]) == []


def test_cancel_mid_scoring_stops_the_job_and_the_model_server(stack: Stack, big_history: str) -> None:
    job = submit(stack, "e2e-cancel", source={"table": big_history})
    running = stack.wait(job["id"], until={"scoring", "succeeded", "failed", "cancelled"}, timeout_s=120)
    assert running["state"] == "scoring", running
    assert mlserver_processes_for(job["id"]), "the model server should be running while scoring"
    with stack.client() as c:
        resp = c.post(f"/api/v1/retro-tests/{job['id']}/cancel")
        assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    ended = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=30)
    assert ended["state"] == "cancelled", ended
    assert ended["progress"]["rows_scored"] < ended["progress"]["rows_total"]
    assert ended["files"] == [] and ended["result_location"] is None
    assert mlserver_processes_for(job["id"]) == []


def test_rows_the_model_refuses_fail_the_job_over_the_reject_budget(stack: Stack, history: Path) -> None:
    # NULLs travel to the model; the churn model's scaler has no imputer, so it refuses the two rows with one.
    folder = history / "features" / "with_nulls" / f"snapshot_date={HISTORY_START.isoformat()}"
    folder.mkdir(parents=True)
    table = source_rows(history).query("snapshot_date == @HISTORY_START").head(50).drop(columns=["snapshot_date"])
    table.loc[[3, 7], "monthly_spend"] = None
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), folder / "part-0.parquet")
    job = submit(stack, "e2e-nulls", period_end=HISTORY_START.isoformat(), source={"table": "features.with_nulls"})
    ended = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert ended["state"] == "failed"
    assert ended["error"]["code"] == "too_many_rejected_rows"
    assert "2 row(s) were refused by the model" in ended["error"]["message"]
    assert ended["files"] == []


def test_missing_column_fails_before_any_deployment(stack: Stack, history: Path) -> None:
    folder = history / "features" / "no_plan" / f"snapshot_date={HISTORY_START.isoformat()}"
    folder.mkdir(parents=True)
    table = source_rows(history).head(10).drop(columns=["snapshot_date", "plan"])
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), folder / "part-0.parquet")
    job = submit(stack, "e2e-schema", source={"table": "features.no_plan"})
    ended = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"})
    assert ended["state"] == "failed"
    assert ended["error"]["code"] == "schema_mismatch"
    assert "plan" in ended["error"]["message"]
    assert "deploying" not in [s["state"] for s in ended["stages"]]


class WorkerDied(BaseException):
    """Stands for a worker process killed mid-chunk: nothing after it runs, no except clause catches it."""


def test_a_redelivered_job_skips_finished_chunks_and_writes_no_row_twice(
    database_url: str, registry: dict[str, str], history: Path
) -> None:
    from app.config import get_settings
    from app.core.jobs import RetroTest, State
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from tests.factories import make_retro_test
    from worker.pipeline import Adapters, run_retro_test

    settings = get_settings()
    sessions = get_session_factory()
    real_source = make_history_source(settings)
    calls: list[str] = []

    class Source:
        def __init__(self, die_on: str | None) -> None:
            self.die_on = die_on

        def __getattr__(self, name: str) -> Any:
            return getattr(real_source, name)

        def batches(self, query: Any, *, batch_rows: int) -> Any:
            calls.append(query.start.isoformat())
            if query.start.isoformat() == self.die_on:
                yield from real_source.batches(query, batch_rows=100)  # some rows are read and scored ...
                raise WorkerDied()  # ... then the process dies before the chunk is committed
            yield from real_source.batches(query, batch_rows=batch_rows)

    with sessions() as s, s.begin():
        job_id = make_retro_test(s, start=HISTORY_START, end=END, partner_prefix="redeliver")
    third_day = (HISTORY_START + timedelta(days=2)).isoformat()
    adapters = Adapters(
        registry=make_registry(settings),
        source=Source(third_day),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )
    with pytest.raises(WorkerDied):
        run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings)
    with sessions() as s:
        crashed = s.get(RetroTest, job_id)
        assert crashed is not None and crashed.state == State.scoring and crashed.chunks_done == 2
    assert mlserver_processes_for(str(job_id)) == []  # the deployment was torn down on the way out

    calls.clear()
    # The dead attempt still holds the lease until its heartbeat goes stale; then a new delivery may take over.
    assert run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings) == State.scoring
    assert calls == []
    with sessions() as s, s.begin():
        stranded = s.get(RetroTest, job_id)
        assert stranded is not None
        stranded.heartbeat_at = stranded.heartbeat_at - timedelta(seconds=settings.stale_after_s + 1)
    adapters.source = Source(None)  # type: ignore[assignment]
    assert run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings) == State.succeeded
    assert calls == [third_day, (HISTORY_START + timedelta(days=3)).isoformat()]
    with sessions() as s:
        finished = s.get(RetroTest, job_id)
        assert finished is not None and finished.attempts == 2
        assert finished.rows_read == finished.rows_scored == HISTORY_DAYS * ROWS_PER_DAY
        location = finished.result_location
    assert location is not None
    scores = pq.read_table(location.removeprefix("file://") + "/scores.parquet").to_pandas()
    assert len(scores) == HISTORY_DAYS * ROWS_PER_DAY
    assert not scores.duplicated(["customer_id", "snapshot_date"]).any()
    assert not os.path.exists(location.removeprefix("file://") + "/parts")


def test_a_job_whose_model_server_stays_down_fails_naming_the_cause_and_offers_no_results(
    database_url: str, registry: dict[str, str], history: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry budget, then the re-creation budget, spent: the job fails and its committed chunks stay hidden."""
    import worker.chunks
    from app.config import get_settings
    from app.core.jobs import RetroTest, State, job_prefix
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from tests.chaos.fault_proxy import Faults
    from tests.chaos.worker import FaultyDeployer
    from tests.factories import make_retro_test
    from worker.pipeline import Adapters, run_retro_test

    settings = get_settings().model_copy(
        # One batch in flight at a time: no batch of a later chunk is sent before the first chunk is committed.
        update={
            "score_retries": 2,
            "score_backoff_s": 0.01,
            "max_redeploys": 1,
            "partitions": 1,
            "score_window_batches": 1,
        }
    )
    sessions = get_session_factory()
    faults = Faults(unavailable=0.0, hang=0.0, reset=0.0, poison_input="")
    real_commit = worker.chunks.commit_chunk

    def commit_then_go_down(*args: Any, **kwargs: Any) -> bool:
        committed = real_commit(*args, **kwargs)
        faults.unavailable = 1.0  # after the first chunk, every request is answered 503, by every server made
        return committed

    monkeypatch.setattr(worker.chunks, "commit_chunk", commit_then_go_down)
    with sessions() as s, s.begin():
        job_id = make_retro_test(s, start=HISTORY_START, end=END, partner_prefix="down")
    adapters = Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=FaultyDeployer(make_deployer(settings), lambda: faults),
        store=make_result_store(settings),
    )
    assert run_retro_test(job_id=job_id, sessions=sessions, adapters=adapters, settings=settings) == State.failed
    with sessions() as s:
        job = s.get(RetroTest, job_id)
        assert job is not None and job.chunks_done >= 1  # some rows were scored before the server went down
        assert job.error_code == "model_server_down"
        message = job.error_message or ""
        assert "after 3 attempts" in message and "HTTP 503" in message, message
        assert "re-created 1 time(s) without help" in message, message
        assert job.result_location is None  # nothing is offered for download
        prefix = job_prefix(job)
    store = make_result_store(settings)
    with pytest.raises(FileNotFoundError):
        store.open_read(f"{prefix}/scores.parquet").close()
    assert faults.counts["unavailable"] >= 2 * 3  # each of the two servers got the whole retry budget
    assert mlserver_processes_for(str(job_id)) == []  # and both were torn down
