"""Old models served from their own environment: a model trained and logged two years ago (scikit-learn 1.3,
numpy 1.26, mlflow 2.9, in a Python of its own) is retro-tested by today's worker, through the REST API, a real
Celery worker, the environment built with uv, a real MLServer from that environment and real files."""

from __future__ import annotations

import io
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import Stack, start_stack
from tests.old_model import OldModel, register_disagreeing, register_model_folder
from tests.test_end_to_end import mlserver_processes_for, submit


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
        version = register_model_folder("unresolvable", broken, tags={})
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
    version = register_disagreeing(old_model, "disagrees", off_by=1e-6)
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
