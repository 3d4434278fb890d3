"""Point-in-time scoring of a population in Hive (the Spark Thrift Server): the staged population joined where the
history is gives the same rows as DuckDB's join over the same files; a whole job scores it like the model in
process and drops its staging table, also when it was cancelled or its worker killed; the reaper drops what a
job that can no longer run left."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.integrations.history.hive import HiveSource
from app.integrations.history.local import LocalParquetSource
from app.integrations.history.port import STAGING_PREFIX, HistoryQuery, PopulationJoin, staging_table
from app.retro_tests.population import PopulationColumns, PopulationUpload, read_population
from tests.conftest import Stack, start_process, start_stack
from tests.hive_server import HiveServer, run_sql
from tests.test_hive import MODEL_FEATURES, hive_settings
from tests.test_population import (
    POP_DAYS,
    POP_IDS,
    POP_START,
    POP_TABLE,
    csv_bytes,
    population_frame,
    request_json,
    snapshots,  # noqa: F401  (the fixture)
)

SCRATCH = "retro_scratch_test"


@pytest.fixture(scope="module")
def hive_snapshots(hive: HiveServer, snapshots: Path) -> str:  # noqa: F811
    cols = ", ".join(f"{f.name} {'DOUBLE' if f.type == 'double' else 'BIGINT'}" for f in MODEL_FEATURES[:7])
    run_sql(
        hive,
        f"CREATE TABLE IF NOT EXISTS {POP_TABLE} (customer_id BIGINT, {cols}, roaming BOOLEAN, plan STRING, "
        f"snapshot_date DATE) USING parquet PARTITIONED BY (snapshot_date) LOCATION '{snapshots}'",
        f"ALTER TABLE {POP_TABLE} RECOVER PARTITIONS",
    )
    return POP_TABLE


def point_in_time(population_file: Path, *, lookback_days: int, table: str | None = None) -> HistoryQuery:
    return HistoryQuery(
        table=POP_TABLE,
        date_column="snapshot_date",
        id_columns=("customer_id",),
        features=MODEL_FEATURES,
        start=POP_START,
        end=POP_START + timedelta(days=POP_DAYS - 1),
        population=PopulationJoin(
            file=str(population_file),
            as_of_column="as_of",
            outcome_column="outcome",
            lookback_days=lookback_days,
            staging_table=table,
        ),
    )


def frame(batches: Iterator[pa.RecordBatch]) -> pd.DataFrame:
    out = pa.Table.from_batches(list(batches)).to_pandas()
    return out.sort_values(["customer_id", "as_of"]).reset_index(drop=True)


@pytest.mark.parametrize("lookback_days", [0, 1])
def test_hive_joins_the_staged_population_as_duckdb_does(
    hive: HiveServer, hive_snapshots: str, history: Path, tmp_path: Path, lookback_days: int
) -> None:
    population = population_frame(12_000, seed=lookback_days)
    checked = read_population(
        PopulationUpload(data=csv_bytes(population), filename="p.csv"),
        columns=PopulationColumns(id_columns=("customer_id",), as_of_column="as_of", outcome_column="outcome"),
        start=POP_START,
        end=POP_START + timedelta(days=POP_DAYS - 1),
        max_bytes=10**8,
        max_rows=10**6,
    )
    file = tmp_path / "population.parquet"
    file.write_bytes(checked.parquet)
    table = staging_table(SCRATCH, uuid.uuid4())
    query = point_in_time(file, lookback_days=lookback_days, table=table)
    source = HiveSource(hive_settings(hive))
    local = LocalParquetSource(root=history)
    source.check_schema(query)
    source.stage(query)
    try:
        assert table in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)
        by_day = source.rows_by_day(query)
        assert by_day == local.rows_by_day(query)
        got, want = frame(source.batches(query, batch_rows=5_000)), frame(local.batches(query, batch_rows=5_000))
        assert len(got) == sum(by_day.values()) > 0
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
        # Lookback 0: as-of dates between snapshots have none; lookback 1: only ids without history are left.
        unmatched = frame(source.unmatched(query, batch_rows=5_000))
        assert sorted(unmatched.customer_id) == sorted(frame(local.unmatched(query, batch_rows=5_000)).customer_id)
        assert len(unmatched) + len(got) == len(population)
        if lookback_days:
            assert (unmatched.customer_id > POP_IDS).all()
        else:
            assert (
                (unmatched.customer_id > POP_IDS) | unmatched.as_of.map(lambda d: (d - POP_START).days % 2 == 1)
            ).all()
    finally:
        source.drop_staging(table)
    assert table not in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)


def test_the_reaper_drops_staging_tables_of_ended_and_missing_jobs(
    hive: HiveServer, tmp_path: Path, db_session
) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.orm import sessionmaker

    from worker.reaper import reap_staging

    population = population_frame(50)
    file = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pandas(population, preserve_index=False), file)
    source = HiveSource(hive_settings(hive))
    orphan = staging_table(SCRATCH, uuid.uuid4())  # a job the database does not know: its worker was killed
    source.stage(point_in_time(file, lookback_days=0, table=orphan))
    sessions = sessionmaker(bind=db_session.connection())
    dropped = reap_staging(source=source, sessions=sessions, database=SCRATCH)
    assert orphan in dropped
    assert orphan not in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)


# --- whole jobs: the API, a real worker on Hive, a real model server ---


@pytest.fixture(scope="module")
def pop_hive_env(hive: HiveServer) -> dict[str, str]:
    """The settings of the stack's processes (a worker started again in a test gets the same)."""
    return {
        "RETRO_HISTORY_SOURCE": "hive",
        "RETRO_HIVE_HOST": hive.host,
        "RETRO_HIVE_PORT": str(hive.port),
        "RETRO_HIVE_SCRATCH_DATABASE": SCRATCH,
        "RETRO_QUEUE_NAME": os.environ["RETRO_QUEUE_NAME"] + "-pop-hive",
        "RETRO_WORKER_METRICS_PORT": "0",
    }


@pytest.fixture(scope="module")
def pop_hive_stack(pop_hive_env: dict[str, str], stack: Stack, hive_snapshots: str) -> Iterator[Stack]:
    s = start_stack("pop-hive", **pop_hive_env)
    yield s
    s.stop()


def submit_population(stack: Stack, partner: str, population: pd.DataFrame, **overrides: object) -> dict:  # type: ignore[type-arg]
    with stack.client() as c:
        c.post("/api/v1/partners", json={"code": partner, "name": partner})
        resp = c.post(
            "/api/v1/retro-tests/with-population",
            data={"request": request_json(partner, **overrides)},
            files={"population": ("p.csv", csv_bytes(population), "text/csv")},
        )
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def test_a_population_job_on_hive_scores_like_the_model_and_drops_its_staging_table(
    pop_hive_stack: Stack,
    hive: HiveServer,
    snapshots: Path,  # noqa: F811
) -> None:
    import mlflow
    from sklearn.metrics import roc_auc_score

    population = population_frame(20_000, seed=3)
    job = submit_population(pop_hive_stack, "pop-hive", population, lookback_days=1)
    done = pop_hive_stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=400)
    assert done["state"] == "succeeded", (done["error"], pop_hive_stack.tail())
    source = HiveSource(hive_settings(hive))
    assert staging_table(SCRATCH, uuid.UUID(job["id"])) not in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)
    files = {f["name"]: f for f in done["files"]}
    with pop_hive_stack.client() as c:
        scores = pq.read_table(io.BytesIO(c.get(files["scores.parquet"]["download_url"]).content)).to_pandas()
        report = json.loads(c.get(files["report.json"]["download_url"]).content)
    matched = population[population.customer_id <= POP_IDS]
    assert len(scores) == len(matched) and report["rows"]["unmatched"] == len(population) - len(matched)
    src = pq.read_table(snapshots, partitioning="hive").to_pandas()
    src["snapshot_date"] = pd.to_datetime(src["snapshot_date"]).dt.date
    scores["snapshot_date"] = pd.to_datetime(scores["snapshot_date"]).dt.date
    rows = scores.merge(src, on=["customer_id", "snapshot_date"])
    assert len(rows) == len(scores)
    assert (rows.snapshot_date == rows.as_of.map(lambda d: d - timedelta(days=(d - POP_START).days % 2))).all()
    model = mlflow.pyfunc.load_model("models:/churn/1")
    expected = np.asarray(model.predict(rows[[f.name for f in MODEL_FEATURES]]))[:, 1]
    assert np.abs(expected - rows.p_churn.to_numpy()).max() <= 1e-9
    y, s = scores.outcome.to_numpy(), scores.p_churn.to_numpy()
    assert report["quality"]["overall"]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_a_cancelled_population_job_on_hive_leaves_no_staging_table(pop_hive_stack: Stack, hive: HiveServer) -> None:
    population = population_frame(20_000, seed=4)
    job = submit_population(pop_hive_stack, "pop-hive-cancel", population)
    pop_hive_stack.wait(job["id"], until={"extracting", "preparing_environment", "deploying", "validating"})
    with pop_hive_stack.client() as c:
        assert c.post(f"/api/v1/retro-tests/{job['id']}/cancel").status_code == 202
    done = pop_hive_stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=300)
    assert done["state"] == "cancelled", done
    source = HiveSource(hive_settings(hive))
    assert staging_table(SCRATCH, uuid.UUID(job["id"])) not in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)


def test_a_population_job_whose_worker_is_killed_resumes_and_leaves_no_staging_table(
    pop_hive_stack: Stack, pop_hive_env: dict[str, str], hive: HiveServer
) -> None:
    """The worker dies (SIGKILL, as an OOM kill would) with the staging table in Hive; the worker started again
    takes the job up, stages afresh, scores every matched row once and drops the table."""
    population = population_frame(20_000, seed=5)
    job = submit_population(pop_hive_stack, "pop-hive-killed", population, lookback_days=1)
    source = HiveSource(hive_settings(hive))
    table = staging_table(SCRATCH, uuid.UUID(job["id"]))
    pop_hive_stack.wait(job["id"], until={"preparing_environment", "deploying", "validating", "scoring"})
    assert table in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)  # staged while extracting
    worker = pop_hive_stack.procs[1]
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool: nothing of it runs a finally clause
    worker.wait()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RETRO_PUBLIC_BASE_URL": pop_hive_stack.base_url, **pop_hive_env}
    log = pop_hive_stack.logs / "worker-restarted.log"
    pop_hive_stack.procs.append(
        start_process([sys.executable, "-m", "app.cli", "worker", "--name", "restarted"], env=env, log=log)
    )
    done = pop_hive_stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=400)
    assert done["state"] == "succeeded", (done["error"], pop_hive_stack.tail())
    assert done["attempts"] == 2
    matched = population[population.customer_id <= POP_IDS]
    assert done["progress"]["rows_scored"] == len(matched)
    with pop_hive_stack.client() as c:
        scores_file = next(f for f in done["files"] if f["name"] == "scores.parquet")
        scores = pq.read_table(io.BytesIO(c.get(scores_file["download_url"]).content)).to_pandas()
    assert len(scores) == len(matched) and not scores.duplicated(["customer_id", "as_of"]).any()
    assert table not in source.staging_tables(SCRATCH, prefix=STAGING_PREFIX)
