"""Every row scored as the model scores it in process, NULLs included, through every protocol.

A Hive table (the real Spark Thrift Server) with NULLs in every type the source maps to a model input, and a row
per day whose inputs are all NULL; a scikit-learn pipeline that imputes numbers and one-hot encodes categories,
NULL included. Retro tests run through V2 REST and V2 gRPC on a local MLServer, and through the Kubernetes test
operator with the Seldon protocol (Seldon Core v1), V2 gRPC through the Seldon Core v2 mesh and V2 gRPC to a
KServe InferenceService. Each must score every row, reject none, and match `pyfunc.predict` within 1e-9.
A model that really refuses rows (an integer input with NULLs) has exactly those rows rejected, with MLflow's
own message.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.core.model_types import TAG_DATE_COLUMN, TAG_ID_COLUMNS, TAG_TABLE, Feature
from app.integrations.history.port import HistoryQuery
from tests.conftest import HISTORY_START
from tests.hive_server import HiveServer, run_sql
from tests.k8s.conftest import job_row, k8s_settings, results_path, run

TABLE = "features.nullsy"
DAYS = 3
ROWS_PER_DAY = 800
NULL_RATE = 0.06
END = HISTORY_START + timedelta(days=DAYS - 1)
# Hive column types, and the model input each feeds (the signature infer_signature gives for data with NULLs).
COLUMNS = {
    "ti": ("TINYINT", "double"),
    "si": ("SMALLINT", "double"),
    "i": ("INT", "double"),
    "bi": ("BIGINT", "double"),
    "f": ("FLOAT", "float"),
    "d": ("DOUBLE", "double"),
    "dec": ("DECIMAL(12,4)", "double"),
    "s": ("STRING", "string"),
    "vc": ("VARCHAR(10)", "string"),
    "ch": ("CHAR(4)", "string"),
    "b": ("BOOLEAN", "boolean"),
}
NUMERIC = ["ti", "si", "i", "bi", "f", "d", "dec"]
CATEGORICAL = ["s", "vc", "ch", "b"]


def _day(seed: int, rows: int) -> pa.Table:
    """One day of history: every input NULL at NULL_RATE, and row 0 NULL in every input."""
    rng = np.random.default_rng(seed)

    def nulls() -> np.ndarray:
        mask = rng.random(rows) < NULL_RATE
        mask[0] = True
        return mask

    words = np.array(["red", "green", "blue", "cyan"])
    return pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "ti": pa.array(rng.integers(-100, 100, rows).astype(np.int8), mask=nulls()),
            "si": pa.array(rng.integers(-3000, 3000, rows).astype(np.int16), mask=nulls()),
            "i": pa.array(rng.integers(0, 10**6, rows).astype(np.int32), mask=nulls()),
            "bi": pa.array(rng.integers(0, 10**12, rows), mask=nulls()),
            "f": pa.array(rng.normal(size=rows).astype(np.float32), mask=nulls()),
            "d": pa.array(rng.normal(size=rows), mask=nulls()),
            "dec": pa.array([round(float(v), 4) for v in rng.normal(0, 100, rows)], pa.float64(), mask=nulls()).cast(
                pa.decimal128(12, 4)
            ),
            "s": pa.array(words[rng.integers(0, 4, rows)], mask=nulls()),
            "vc": pa.array(words[rng.integers(0, 4, rows)], mask=nulls()),
            "ch": pa.array(np.array(["ab", "cd", "efgh"])[rng.integers(0, 3, rows)], mask=nulls()),
            "b": pa.array(rng.random(rows) < 0.5, mask=nulls()),
        }
    )


def as_mlflow_builds_it(table: pa.Table, features: tuple[Feature, ...]) -> pd.DataFrame:
    """The DataFrame MLflow builds from the signature: NaN in float columns, None in string and boolean ones."""
    columns: dict[str, Any] = {}
    for f in features:
        col = table.column(f.name)
        if f.type in ("double", "float"):
            columns[f.name] = col.to_numpy()
        else:
            columns[f.name] = pd.Series(col.to_pylist(), dtype=object)
    return pd.DataFrame(columns)


@pytest.fixture(scope="module")
def null_history(hive: HiveServer, history: Path) -> str:
    """TABLE in the session's Hive: DAYS daily partitions of Parquet written here."""
    folder = history.joinpath(*TABLE.split("."))
    for i in range(DAYS):
        part = folder / f"day={(HISTORY_START + timedelta(days=i)).isoformat()}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(_day(seed=100 + i, rows=ROWS_PER_DAY), part / "part-0.parquet")
    cols = ", ".join(f"{name} {hive_type}" for name, (hive_type, _) in COLUMNS.items())
    run_sql(
        hive,
        f"CREATE TABLE {TABLE} (id BIGINT, {cols}, day DATE) USING parquet PARTITIONED BY (day) LOCATION '{folder}'",
        f"ALTER TABLE {TABLE} RECOVER PARTITIONS",
    )
    return TABLE


def register(name: str, *, signature_types: dict[str, str]) -> None:
    """Train an imputing, one-hot-encoding pipeline on data with NULLs and register it as version 1 of `name`."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, Schema
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    features = tuple(Feature(c, signature_types[c]) for c in COLUMNS)
    train = _day(seed=7, rows=3000)
    X = as_mlflow_builds_it(train, features)
    for c in CATEGORICAL:  # the encoder's missing category: training data held NULLs as NaN-free None
        X[c] = X[c].astype(object)
    y = ((X["d"].fillna(0) + (X["s"] == "red") * 0.8 + X["b"].fillna(False).astype(float)) > 0.6).astype(int)
    pre = ColumnTransformer(
        [
            ("num", SimpleImputer(strategy="median"), NUMERIC),
            ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
        ]
    )
    model = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=1000))]).fit(X, y)
    signature = ModelSignature(
        inputs=Schema([ColSpec(f.type, f.name) for f in features]),
        outputs=Schema([ColSpec("double", "p0"), ColSpec("double", "p1")]),
    )
    mlflow.set_experiment("retrotest-demo")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            pyfunc_predict_fn="predict_proba",
            serialization_format="cloudpickle",
            pip_requirements=["scikit-learn", "pandas", "numpy"],
        )
    mv = mlflow.register_model(info.model_uri, name)
    client = mlflow.MlflowClient()
    for key, value in ((TAG_TABLE, TABLE), (TAG_DATE_COLUMN, "day"), (TAG_ID_COLUMNS, "id")):
        client.set_model_version_tag(name, mv.version, key, value)


@pytest.fixture(scope="module")
def null_models(registry: dict[str, str], null_history: str) -> Iterator[None]:
    """nullsafe: every input as infer_signature gives it for data with NULLs; intinput: the BIGINT column
    declared long, which cannot hold a NULL in MLflow."""
    register("nullsafe", signature_types={c: t for c, (_, t) in COLUMNS.items()})
    register("intinput", signature_types={c: "long" if c == "bi" else t for c, (_, t) in COLUMNS.items()})
    yield


def source_rows(hive: HiveServer, features: tuple[Feature, ...]) -> pa.Table:
    """The period's rows as the job reads them: through HiveSource, cast to the model's input types."""
    from app.integrations.history.hive import HiveSource
    from tests.test_hive import hive_settings

    query = HistoryQuery(
        table=TABLE, date_column="day", id_columns=("id",), features=features, start=HISTORY_START, end=END
    )
    source = HiveSource(hive_settings(hive))
    return pa.Table.from_batches(list(source.batches(query, batch_rows=5000)))


def new_null_job(model_name: str, *, end: Any = END) -> uuid.UUID:
    from app.db import get_session_factory
    from tests.factories import make_retro_test

    with get_session_factory()() as s, s.begin():
        return make_retro_test(
            s,
            start=HISTORY_START,
            end=end,
            table=TABLE,
            model_name=model_name,
            date_column="day",
            id_columns=("id",),
            partner_prefix="nulls",
        )


def settings_for(deployer: str, protocol: str, hive: HiveServer) -> Any:
    options: dict[str, Any] = {
        "history_source": "hive",
        "hive_host": hive.host,
        "hive_port": hive.port,
        "score_protocol": protocol,
        "score_batch_rows": 500,  # several batches per day, so some carry no NULL in a column and some do
    }
    if deployer == "seldon":
        options["seldon_protocol"] = "seldon"
    return k8s_settings(deployer, **options)


@pytest.mark.parametrize(
    ("deployer", "protocol"),
    [
        ("local", "v2-rest"),
        ("local", "v2-grpc"),
        ("seldon", "seldon"),
        ("seldon_v2", "v2-grpc"),
        ("kserve", "v2-grpc"),
    ],
)
def test_every_row_with_nulls_scores_as_the_model_does_in_process(
    deployer: str, protocol: str, hive: HiveServer, null_models: None, retro_data: None
) -> None:
    from app.core.jobs import State

    job_id = new_null_job("nullsafe")
    state = run(job_id, settings_for(deployer, protocol, hive))

    job = job_row(job_id)
    assert state == State.succeeded, (job.error_code, job.error_message)
    assert job.score_protocol == protocol
    total = DAYS * ROWS_PER_DAY
    assert job.rows_read == job.rows_scored == total and job.rows_rejected == 0
    folder = results_path(job.result_location)
    assert not (folder / "rejects.csv.gz").exists()
    scores = pq.read_table(folder / "scores.parquet").to_pandas()
    assert len(scores) == total and not scores.duplicated(["id", "day"]).any()

    model = mlflow.pyfunc.load_model("models:/nullsafe/1")
    features = tuple(Feature(c, t) for c, (_, t) in COLUMNS.items())
    rows = source_rows(hive, features)
    assert rows.column("b").null_count and rows.column("ch").null_count and rows.column("dec").null_count
    expected = np.asarray(model.predict(as_mlflow_builds_it(rows, features)))
    reference = pd.DataFrame(
        {"id": rows.column("id").to_numpy(), "day": rows.column("day").to_pylist(), "e1": expected[:, 1]}
    )
    merged = reference.merge(scores, on=["id", "day"], how="outer", indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == total
    assert np.abs(merged.e1 - merged.p1).max() <= 1e-9
    # The rows whose every input is NULL were scored too, as the model scores them.
    all_null = merged[merged.id == 0]
    assert len(all_null) == DAYS and all_null.p1.notna().all()
    manifest = (folder / "manifest.internal.json").read_text()
    assert f'"protocol": "{protocol}"' in manifest


@pytest.mark.parametrize("protocol", ["v2-rest", "v2-grpc"])
def test_rows_the_model_refuses_are_isolated_with_its_own_message(
    protocol: str, hive: HiveServer, null_models: None, retro_data: None
) -> None:
    from app.core.jobs import State

    job_id = new_null_job("intinput", end=HISTORY_START)
    settings = settings_for("local", protocol, hive).model_copy(update={"max_rejected_ratio": 0.5})
    state = run(job_id, settings)

    job = job_row(job_id)
    assert state == State.succeeded, (job.error_code, job.error_message)
    features = tuple(Feature(c, t) for c, (_, t) in COLUMNS.items())
    rows = source_rows(hive, features).to_pandas()
    rows = rows[rows.day == HISTORY_START]
    # MLflow cannot hold a NULL in an integer input: exactly the rows with one are refused, by the model.
    refused = rows[rows.bi.isna()]
    assert job.rows_rejected == len(refused) > 0 and job.rows_scored == len(rows) - len(refused)
    rejects = pd.read_csv(results_path(job.result_location) / "rejects.csv.gz")
    assert sorted(zip(rejects.id, rejects.day, strict=True)) == sorted(
        zip(refused.id, refused.day.astype(str), strict=True)
    )
    assert rejects.reason.str.contains("Incompatible input types").all(), rejects.reason.iloc[0]
    assert job.error_code is None
