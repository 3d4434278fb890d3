"""Sample data for the demo and the tests: a registered churn model and synthetic feature history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.core.model_types import TAG_DATE_COLUMN, TAG_ID_COLUMNS, TAG_TABLE

DEMO_MODEL = "churn"
DEMO_TABLE = "features.customer_daily"
PLANS = ["basic", "plus", "pro", "business"]
NUMERIC = ["tenure_months", "monthly_spend", "data_gb", "voice_minutes", "sms_count", "support_calls", "late_payments"]


@dataclass(frozen=True)
class HistoryStats:
    rows: int
    days: int
    start: date
    end: date


def _day_table(day: date, rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.arange(rows, dtype=np.int64) + 1
    return pa.table(
        {
            "customer_id": ids,
            "snapshot_date": pa.array([day] * rows, pa.date32()),
            "tenure_months": rng.integers(0, 120, rows, dtype=np.int64),
            "monthly_spend": rng.gamma(2.0, 20.0, rows),
            "data_gb": rng.exponential(8.0, rows),
            "voice_minutes": rng.integers(0, 3000, rows, dtype=np.int64),
            "sms_count": rng.integers(0, 500, rows, dtype=np.int64),
            "support_calls": rng.poisson(0.7, rows).astype(np.int64),
            "late_payments": rng.poisson(0.3, rows).astype(np.int64),
            "roaming": rng.random(rows) < 0.1,
            "plan": pa.array(np.array(PLANS)[rng.integers(0, len(PLANS), rows)]),
        }
    )


def write_history(*, root: Path, table: str = DEMO_TABLE, start: date, days: int, rows_per_day: int) -> HistoryStats:
    """Write synthetic history partitioned by day (snapshot_date=YYYY-MM-DD/part.parquet), one day at a time."""
    folder = root.joinpath(*table.split("."))
    for i in range(days):
        day = start + timedelta(days=i)
        part = folder / f"snapshot_date={day.isoformat()}"
        part.mkdir(parents=True, exist_ok=True)
        tbl = _day_table(day, rows_per_day, seed=i).drop_columns(["snapshot_date"])
        pq.write_table(tbl, part / "part-0.parquet")
    return HistoryStats(rows=days * rows_per_day, days=days, start=start, end=start + timedelta(days=days - 1))


def register_demo_model(
    *,
    tracking_uri: str,
    artifact_root: Path | None,
    name: str = DEMO_MODEL,
    table: str = DEMO_TABLE,
    with_signature: bool = True,
) -> str:
    """Train a small churn classifier, log it with signature and source tags, register it; return the version."""
    import cloudpickle
    import mlflow
    import pandas as pd
    import sklearn
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    df = _day_table(date(2020, 1, 1), 5000, seed=12345).to_pandas()
    X = df[[*NUMERIC, "roaming", "plan"]].copy()
    X["roaming"] = X["roaming"].astype(bool)
    logit = 0.03 * X.support_calls * 10 + 0.5 * X.late_payments - 0.02 * X.tenure_months + (X.plan == "basic") * 0.8
    y = (logit + np.random.default_rng(1).normal(0, 0.5, len(X)) > 0).astype(int)
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), NUMERIC),
            ("flag", "passthrough", ["roaming"]),
            ("plan", OneHotEncoder(handle_unknown="ignore"), ["plan"]),
        ]
    )
    model = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=500))]).fit(X, y)
    signature = (
        infer_signature(X, pd.DataFrame(model.predict_proba(X), columns=["p_stay", "p_churn"]))
        if with_signature
        else None
    )
    experiment = mlflow.get_experiment_by_name("retrotest-demo")
    if experiment is None:
        # Without an artifact root, the tracking server's own: mlflow-artifacts:/ when it proxies artifacts.
        location = artifact_root.resolve().as_uri() if artifact_root else None
        mlflow.create_experiment("retrotest-demo", artifact_location=location)
    mlflow.set_experiment("retrotest-demo")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            pyfunc_predict_fn="predict_proba",
            # Pinned as the model was trained, as mlflow infers them for a real model (without the seconds it
            # takes to infer them): the model's environment is rebuilt from these (RETRO_MODEL_ENV=model).
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"scikit-learn=={sklearn.__version__}",
                f"pandas=={pd.__version__}",
                f"numpy=={np.__version__}",
                f"cloudpickle=={cloudpickle.__version__}",
            ],
            # The reference the deployment is checked against before scoring (worker/validation.py).
            input_example=X.head(20) if with_signature else None,
        )
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    mv = mlflow.register_model(info.model_uri, name)
    for key, value in ((TAG_TABLE, table), (TAG_DATE_COLUMN, "snapshot_date"), (TAG_ID_COLUMNS, "customer_id")):
        client.set_model_version_tag(name, mv.version, key, value)
    client.set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)
