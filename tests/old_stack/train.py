"""Run by an old stack's Python (scikit-learn 1.3, numpy 1.26, mlflow 2.9): train a model as a data scientist did
two years ago, save it with mlflow, and score the retro test's history with it in-process.

    python train.py <model_dir> <history_table_dir> <expected.parquet>
"""

import sys
from pathlib import Path

import mlflow.sklearn
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = ["tenure_months", "monthly_spend", "data_gb", "support_calls", "late_payments"]


def main() -> None:
    model_dir, history_dir, expected_path = sys.argv[1:4]
    rng = np.random.default_rng(2024)
    n = 4000
    X = pd.DataFrame(
        {
            "tenure_months": rng.integers(0, 120, n),
            "monthly_spend": rng.gamma(2.0, 20.0, n),
            "data_gb": rng.exponential(8.0, n),
            "support_calls": rng.poisson(0.7, n),
            "late_payments": rng.poisson(0.3, n),
        }
    )
    y = 0.3 * X.support_calls + 0.5 * X.late_payments - 0.02 * X.tenure_months + rng.normal(0, 0.3, n)
    model = make_pipeline(StandardScaler(), HistGradientBoostingRegressor(max_iter=60, random_state=0)).fit(X, y)
    mlflow.sklearn.save_model(
        model, model_dir, signature=infer_signature(X, model.predict(X)), input_example=X.head(10)
    )
    frames = []
    for part in sorted(Path(history_dir).glob("snapshot_date=*/*.parquet")):
        day = pd.read_parquet(part, columns=["customer_id", *FEATURES])
        day["snapshot_date"] = part.parent.name.split("=", 1)[1]
        frames.append(day)
    history = pd.concat(frames, ignore_index=True)
    history["expected"] = model.predict(history[FEATURES])
    history[["customer_id", "snapshot_date", *FEATURES, "expected"]].to_parquet(expected_path)


if __name__ == "__main__":
    main()
