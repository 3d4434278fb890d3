"""The old model every environment test shares: scikit-learn 1.3.2 / numpy 1.26.4 / mlflow 2.9.2 on Python 3.10
(tests/old_stack/train.py), built once per test session.

The fixture is registered once, by tests/conftest.py: a test module that imported it as well would make a second
session fixture of the same name, run again into the same folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from app.integrations.environments.cache import discover_pythons
from tests.conftest import _TMP

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


def register_model_folder(
    name: str, model_dir: Path, tags: dict[str, str], extra: dict[str, Path] | None = None
) -> str:
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
    subprocess.run([uv, "venv", "--quiet", "--clear", "--python", python, str(root / "venv")], check=True)
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
    register_model_folder("legacy_churn", model_dir, tags={})
    frame = pd.read_parquet(expected)
    frame["snapshot_date"] = pd.to_datetime(frame["snapshot_date"]).dt.date
    return OldModel(name="legacy_churn", python=version, expected=frame, model_dir=model_dir)


def register_disagreeing(old_model: OldModel, name: str, *, off_by: float) -> str:
    """The old model registered as `name` with a retro.reference artifact whose expected scores are off by `off_by`
    from what it gives in its own stack: its reference check fails. Returns the version."""
    import tempfile

    features = ["tenure_months", "monthly_spend", "data_gb", "support_calls", "late_payments"]
    head = old_model.expected.head(25)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.parquet"
        head[features].assign(expected=head["expected"] + off_by).to_parquet(path)
        return register_model_folder(
            name,
            old_model.model_dir,
            tags={"retro.reference": "reference/reference.parquet"},
            extra={Path("reference"): path},
        )
