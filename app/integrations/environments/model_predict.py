"""Score rows with a model in-process, inside the model's own environment: `python model_predict.py RESULT` reads
{"model_dir", "columns", "dtypes", "data"} as JSON on stdin and writes {"scores": [[...], ...]} to the file
RESULT, or {"error": {"type": ..., "message": ...}} when loading or scoring raised.

The worker runs this file with the Python of a model environment (app/integrations/environments/cache.py) to get the
scores the model gives in the stack it was logged with: the reference a deployment is checked against before a
partner's rows are scored (worker/validation.py). The model's code is untrusted: the worker starts this process
with a minimal environment, in a sandbox where it can (app/integrations/environments/sandbox.py), and takes from it only
the result file, never its output. It imports nothing of retrotest and keeps to what every Python from 3.6 and
every mlflow with pyfunc offers, since it runs in old environments.
"""

import json
import math
import sys
from typing import Any


def score(request: dict[str, Any]) -> list[list[Any]]:
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame(request["data"], columns=request["columns"])
    for column, dtype in request["dtypes"].items():
        if dtype in ("float64", "float32"):
            frame[column] = frame[column].astype(dtype)
        elif dtype == "object":
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        elif not frame[column].isna().any():
            frame[column] = frame[column].astype(dtype)
    model = mlflow.pyfunc.load_model(request["model_dir"])
    predictions = model.predict(frame)
    if isinstance(predictions, (pd.DataFrame, pd.Series)):
        predictions = predictions.to_numpy()
    values = np.asarray(predictions)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    rows = values.reshape(values.shape[0], -1).tolist()
    return [[None if isinstance(v, float) and math.isnan(v) else v for v in row] for row in rows]


def main() -> None:
    result_path = sys.argv[1]
    try:
        result: dict[str, Any] = {"scores": score(json.load(sys.stdin))}
    except BaseException as exc:  # the worker reads why from the result file, never from this process's output
        result = {"error": {"type": type(exc).__name__, "message": str(exc)[:2000]}}
    with open(result_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
