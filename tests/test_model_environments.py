"""Old models served from their own environment: a model trained and logged two years ago (scikit-learn 1.3,
numpy 1.26, mlflow 2.9, in a Python of its own) is retro-tested by today's worker, through the REST API, a real
Celery worker, the environment built with uv, a real MLServer from that environment and real files."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from app.integrations.environments import discover_pythons
from tests.conftest import _TMP, Stack, start_stack
from tests.test_end_to_end import mlserver_processes_for, submit

OLD_STACK = [
    "mlflow==2.9.2",
    "scikit-learn==1.3.2",
    "numpy==1.26.4",
    "pandas==2.1.4",
    "pyarrow==14.0.2",
    "setuptools<70",
]
TRAIN = Path(__file__).parent / "old_stack" / "train.py"
TABLE = "features.customer_daily"
SOURCE_TAGS = {
    "retro.source.table": TABLE,
    "retro.source.date_column": "snapshot_date",
    "retro.source.id_columns": "customer_id",
}


@dataclass(frozen=True)
class OldModel:
    name: str
    python: str  # the old stack's Python version
    expected: pd.DataFrame  # customer_id, snapshot_date, expected: the model's scores in its own environment
    model_dir: Path


def _old_python() -> str:
    """A Python other than the worker's where the machine has one (3.10), so the test shows the interpreter chosen."""
    pythons = discover_pythons()
    for minor in ("3.10", "3.11"):
        for p in pythons:
            if p.version.startswith(minor + "."):
                return p.path
    raise RuntimeError(f"no Python 3.10 or 3.11 on this machine: {pythons}")


def _uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    return found


def _register(name: str, model_dir: Path, tags: dict[str, str], extra: dict[str, Path] | None = None) -> str:
    """Register a model folder saved by another mlflow as a version in the session's registry."""
    import mlflow

    tracking = os.environ["RETRO_MLFLOW_TRACKING_URI"]
    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    experiment = client.get_experiment_by_name("retrotest-demo")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("retrotest-demo")
    run = client.create_run(experiment_id)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    for path, local in (extra or {}).items():
        client.log_artifact(run.info.run_id, str(local), str(path))
    client.set_terminated(run.info.run_id)
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    for key, value in {**SOURCE_TAGS, **tags}.items():
        client.set_model_version_tag(name, mv.version, key, value)
    return str(mv.version)


@pytest.fixture(scope="session")
def old_model(registry: dict[str, str], history: Path) -> OldModel:
    """The old stack built with uv, a model trained in it, and its own scores of the session's history."""
    root = _TMP / "old-stack"
    python = _old_python()
    uv = _uv()
    subprocess.run([uv, "venv", "--quiet", "--python", python, str(root / "venv")], check=True)
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(root / "venv" / "bin" / "python"), *OLD_STACK],
        check=True,
        env={**os.environ, "VIRTUAL_ENV": ""},
    )
    model_dir, expected = root / "model", root / "expected.parquet"
    subprocess.run(
        [
            str(root / "venv" / "bin" / "python"),
            str(TRAIN),
            str(model_dir),
            str(history.joinpath(*TABLE.split("."))),
            str(expected),
        ],
        check=True,
        capture_output=True,
    )
    version = subprocess.run(
        [str(root / "venv" / "bin" / "python"), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    _register("legacy_churn", model_dir, tags={})
    frame = pd.read_parquet(expected)
    frame["snapshot_date"] = pd.to_datetime(frame["snapshot_date"]).dt.date
    return OldModel(name="legacy_churn", python=version, expected=frame, model_dir=model_dir)


def _scores(stack: Stack, job: dict) -> tuple[pd.DataFrame, dict]:  # type: ignore[type-arg]
    files = {f["name"]: f for f in job["files"]}
    with stack.client() as c:
        scores = pq.read_table(io.BytesIO(c.get(files["scores.parquet"]["download_url"]).content)).to_pandas()
        manifest = c.get(files["manifest.internal.json"]["download_url"]).json()
    return scores, manifest


def _stage_seconds(job: dict, state: str) -> float:  # type: ignore[type-arg]
    return next(s["seconds"] for s in job["stages"] if s["state"] == state)


def test_an_old_model_scores_in_its_own_environment_exactly_as_in_process(stack: Stack, old_model: OldModel) -> None:
    job = submit(stack, "env-old", model_name=old_model.name, model_alias=None, model_version="1")
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=600)
    assert done["state"] == "succeeded", (done["error"], stack.tail())

    scores, manifest = _scores(stack, done)
    env = manifest["environment"]
    assert env["python"] == old_model.python and env["python_requested"] == old_model.python
    assert env["packages"]["scikit-learn"] == "1.3.2" and env["packages"]["numpy"] == "1.26.4"
    assert env["packages"]["mlflow"] == "2.9.2"
    # MLServer 1.7.1 needs protobuf >= 5, mlflow 2.9.2 protobuf < 5: the newest release that resolves is older.
    assert env["server_version"] == "1.6.1" and env["packages"]["mlserver"] == "1.6.1"
    assert manifest["validation"]["passed"] is True and "input example" in manifest["validation"]["source"]

    merged = old_model.expected.merge(scores, on=["customer_id", "snapshot_date"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == len(old_model.expected)
    score_column = [c for c in scores.columns if c not in ("customer_id", "snapshot_date")]
    assert len(score_column) == 1
    diff = np.abs(merged["expected"] - merged[score_column[0]]).max()
    assert diff <= 1e-9, diff
    assert mlserver_processes_for(done["id"]) == []
    print(f"\nfirst job: environment prepared in {_stage_seconds(done, 'preparing_environment'):.1f} s")

    # A second job of the same model finds the environment in the worker's cache.
    again = submit(stack, "env-old-2", model_name=old_model.name, model_alias=None, model_version="1")
    second = stack.wait(again["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=600)
    assert second["state"] == "succeeded", second["error"]
    assert second["environment"]["reused"] is True and second["environment"]["key"] == done["environment"]["key"]
    took = _stage_seconds(second, "preparing_environment")
    print(f"second job: environment reused in {took:.1f} s")
    assert took < 30, took  # seconds, not a build; not a timing test: a build here takes minutes on a cold cache


@pytest.fixture(scope="module")
def worker_env_stack(stack: Stack, old_model: OldModel) -> Iterator[Stack]:
    """A second API and worker that serve every model from the worker's own packages (RETRO_MODEL_ENV=worker)."""
    s = start_stack("worker-env", RETRO_MODEL_ENV="worker", RETRO_QUEUE_NAME=f"worker-env-{uuid.uuid4().hex[:8]}")
    yield s
    s.stop()


def test_without_its_environment_the_old_model_does_not_load_and_the_job_names_why(
    worker_env_stack: Stack, old_model: OldModel
) -> None:
    """What goes wrong without this: today's scikit-learn cannot unpickle the old model; the job says so."""
    job = submit(worker_env_stack, "env-worker", model_name=old_model.name, model_alias=None, model_version="1")
    done = worker_env_stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=300)
    assert done["state"] == "failed", done
    assert done["environment"] is None
    error = done["error"]
    assert error["code"] == "deployment_failed", error
    # The model's own exception, not the tail of a log (CancelledError) the account manager cannot act on.
    assert "AttributeError: Can't get attribute '__pyx_unpickle_" in error["message"], error
    assert "CancelledError" not in error["message"]
    assert done["files"] == [] and mlserver_processes_for(done["id"]) == []


def test_a_model_whose_requirements_cannot_be_resolved_fails_while_preparing_naming_the_package(
    stack: Stack, old_model: OldModel
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / "model"
        shutil.copytree(old_model.model_dir, broken)
        with (broken / "requirements.txt").open("a") as fh:
            fh.write("\nretrotest-no-such-package==1.0\n")
        version = _register("unresolvable", broken, tags={})
    job = submit(stack, "env-unresolvable", model_name="unresolvable", model_alias=None, model_version=version)
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=300)
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "environment_failed", done["error"]
    assert "retrotest-no-such-package" in done["error"]["message"]
    states = [s["state"] for s in done["stages"]]
    assert states[-2:] == ["preparing_environment", "failed"] and "deploying" not in states
    assert done["files"] == [] and mlserver_processes_for(done["id"]) == []


def test_a_model_that_disagrees_with_its_reference_fails_while_validating(stack: Stack, old_model: OldModel) -> None:
    """A retro.reference artifact whose expected scores are off by 1e-6 from what the model gives in its own stack."""
    features = ["tenure_months", "monthly_spend", "data_gb", "support_calls", "late_payments"]
    with tempfile.TemporaryDirectory() as tmp:
        reference = old_model.expected.head(25)[features].assign(
            expected=old_model.expected.head(25)["expected"] + 1e-6
        )
        path = Path(tmp) / "reference.parquet"
        reference.to_parquet(path)
        version = _register(
            "disagrees",
            old_model.model_dir,
            tags={"retro.reference": "reference/reference.parquet"},
            extra={Path("reference"): path},
        )
    job = submit(stack, "env-disagrees", model_name="disagrees", model_alias=None, model_version=version)
    done = stack.wait(job["id"], until={"succeeded", "failed", "cancelled"}, timeout_s=600)
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "reference_mismatch", done["error"]
    assert "retro.reference" in done["error"]["message"] and "row 0: expected" in done["error"]["message"]
    check = done["validation"]
    assert check["passed"] is False and check["rows"] == 25 and len(check["mismatches"]) == 5
    # Off by the 1e-6 added, and by nothing else: the deployment gives the old stack's scores to the last digit.
    assert abs(check["max_abs_diff"] - 1e-6) < 1e-9, check
    states = [s["state"] for s in done["stages"]]
    assert states[-2:] == ["validating", "failed"] and "scoring" not in states
    assert done["progress"]["rows_scored"] == 0
    assert done["files"] == [] and mlserver_processes_for(done["id"]) == []
