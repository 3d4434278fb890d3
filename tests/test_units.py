"""Pure functions of the pipeline, the scorer and validation."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.identifiers import check_name, check_table
from app.core.model_types import Feature
from app.errors import Invalid, InvalidPeriod, PeriodTooLong
from app.integrations.scoring.codecs import (
    decode_v2_grpc,
    decode_v2_json,
    encode_v2_grpc,
    encode_v2_json,
    length_prefixed,
    model_message,
    v2_inputs,
)
from app.integrations.scoring.v2_grpc import inference_pb2
from app.retro_tests.service import check_period
from worker.chunks import plan_days

FEATURES = (Feature("x", "double"), Feature("n", "long"), Feature("flag", "boolean"), Feature("plan", "string"))


def test_plan_days_cover_the_period_once() -> None:
    chunks = plan_days(date(2026, 1, 30), date(2026, 2, 8), 3)
    assert [c.key for c in chunks] == ["2026-01-30", "2026-02-02", "2026-02-05", "2026-02-08"]
    assert chunks[-1].start == chunks[-1].end == date(2026, 2, 8)
    days = sum((c.end - c.start).days + 1 for c in chunks)
    assert days == 10


@pytest.mark.parametrize(
    ("start", "end", "error"),
    [
        (date(2026, 3, 2), date(2026, 3, 1), InvalidPeriod),
        (date(2026, 3, 1), date(2026, 3, 11), InvalidPeriod),  # after "today"
        (date(2025, 1, 1), date(2026, 3, 1), PeriodTooLong),
    ],
)
def test_check_period_refuses(start: date, end: date, error: type[Exception]) -> None:
    with pytest.raises(error):
        check_period(start=start, end=end, max_days=366, today=date(2026, 3, 10))


def test_check_period_accepts_a_year_ending_today() -> None:
    check_period(start=date(2025, 3, 10), end=date(2026, 3, 10), max_days=366, today=date(2026, 3, 10))


@pytest.mark.parametrize("bad", ["a b", "x;drop", "`x`", "x--", "1abc", "", "é", "a" * 129, "x'y"])
def test_identifiers_refuse_anything_but_plain_names(bad: str) -> None:
    with pytest.raises(Invalid):
        check_name(bad, what="column")


def test_table_names() -> None:
    assert check_table("db.t_1") == ("db", "t_1")
    for bad in ("a.b.c", "a..b", "a.b;", ".a"):
        with pytest.raises(Invalid):
            check_table(bad)


def _batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {
            "x": pa.array([1.5, None, 0.1], pa.float64()),
            "n": pa.array([1, 2, None], pa.int64()),
            "flag": pa.array([True, False, True]),
            "plan": pa.array(["a", "b", "c"]),
        }
    )


def _json(batch: pa.RecordBatch) -> dict[str, dict]:  # type: ignore[type-arg]
    body = orjson.loads(encode_v2_json(v2_inputs(batch, FEATURES), rows=batch.num_rows))
    return {i["name"]: i for i in body["inputs"]}


def test_encode_v2_is_columnwise_with_exact_floats() -> None:
    by_name = _json(_batch().slice(0, 1))
    assert by_name["x"] == {"name": "x", "datatype": "FP64", "shape": [1, 1], "data": [1.5]}
    assert by_name["n"]["datatype"] == "INT64" and by_name["flag"]["datatype"] == "BOOL"
    assert by_name["plan"]["data"] == ["a"] and by_name["plan"]["parameters"] == {"content_type": "str"}
    value = 0.1 + 0.2
    assert (
        orjson.loads(orjson.dumps(np.array([value]), option=orjson.OPT_SERIALIZE_NUMPY))[0] == value
    )  # JSON keeps every bit of a double


def test_nulls_travel_as_the_null_of_their_column() -> None:
    batch = pa.RecordBatch.from_pydict(
        {
            "x": pa.array([None, 0.5], pa.float64()),
            "n": pa.array([None, 2], pa.int64()),
            "flag": pa.array([None, False]),
            "plan": pa.array([None, "b"]),
        }
    )
    by_name = _json(batch)
    assert by_name["x"]["datatype"] == "FP64" and by_name["x"]["data"] == [None, 0.5]  # NaN as JSON null
    # A BOOL or INT tensor cannot hold a null (MLServer reads a null BOOL as False): JSON values, pd_json.
    for name, second in (("n", "2"), ("flag", "false"), ("plan", '"b"')):
        assert by_name[name]["datatype"] == "BYTES"
        assert by_name[name]["parameters"] == {"content_type": "pd_json"}
        assert by_name[name]["data"] == ["null", second]
    # A column without nulls in this batch keeps its own datatype, whatever other batches held.
    assert _json(batch.slice(1))["flag"]["datatype"] == "BOOL"


def test_grpc_requests_carry_raw_little_endian_tensors_and_nan() -> None:
    batch = pa.RecordBatch.from_pydict(
        {
            "x": pa.array([None, 0.1], pa.float64()),
            "n": pa.array([7, 2**40], pa.int64()),
            "flag": pa.array([True, None]),
            "plan": pa.array(["ab", "ü"]),
        }
    )
    request = inference_pb2.ModelInferRequest.FromString(
        encode_v2_grpc(v2_inputs(batch, FEATURES), rows=2, model_name="m")
    )
    assert request.model_name == "m" and [i.name for i in request.inputs] == ["x", "n", "flag", "plan"]
    assert [list(i.shape) for i in request.inputs] == [[2, 1]] * 4
    x, n, flag, plan = request.raw_input_contents
    assert np.isnan(np.frombuffer(x, "<f8")[0]) and np.frombuffer(x, "<f8")[1] == 0.1
    assert np.frombuffer(n, "<i8").tolist() == [7, 2**40]
    assert (
        request.inputs[2].datatype == "BYTES" and request.inputs[2].parameters["content_type"].string_param == "pd_json"
    )
    assert flag == b"\x04\x00\x00\x00true\x04\x00\x00\x00null"
    assert plan == b"\x02\x00\x00\x00ab\x02\x00\x00\x00" + "ü".encode()


@given(texts=st.lists(st.text(max_size=12), max_size=40), start=st.integers(0, 40), stop=st.integers(0, 40))
def test_a_raw_bytes_tensor_is_each_strings_length_then_its_utf8_bytes(texts: list[str], start: int, stop: int) -> None:
    """The numpy encoding equals the protocol's definition, element by element, on slices of an array too."""
    array = pa.array(texts, pa.string()).slice(start, max(0, stop - start))
    expected = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in array.to_pylist())
    assert length_prefixed(array) == expected
    assert length_prefixed(array.cast(pa.large_string())) == expected


def test_decode_v2_grpc_reads_raw_and_typed_outputs() -> None:
    raw = inference_pb2.ModelInferResponse()
    raw.outputs.add(name="o", datatype="FP64", shape=[2, 2])
    raw.raw_output_contents.append(np.array([0.1, 0.9, 0.2, 0.8], "<f8").tobytes())
    table = decode_v2_grpc(raw.SerializeToString(), rows=2, output_names=("p0", "p1"))
    assert table.to_pydict() == {"p0": [0.1, 0.2], "p1": [0.9, 0.8]}
    typed = inference_pb2.ModelInferResponse()
    typed.outputs.add(name="o", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.0, 0.0])
    assert decode_v2_grpc(typed.SerializeToString(), rows=2, output_names=()).column_names == ["score"]
    with pytest.raises(Exception, match="2 results for 3 rows"):
        decode_v2_grpc(raw.SerializeToString(), rows=3, output_names=())


def test_decode_v2_names_score_columns() -> None:
    two = orjson.dumps({"outputs": [{"name": "o", "shape": [2, 2], "datatype": "FP64", "data": [0.1, 0.9, 0.2, 0.8]}]})
    assert decode_v2_json(two, rows=2, output_names=("p0", "p1")).to_pydict() == {"p0": [0.1, 0.2], "p1": [0.9, 0.8]}
    assert decode_v2_json(two, rows=2, output_names=()).column_names == ["score_0", "score_1"]
    one = orjson.dumps({"outputs": [{"name": "o", "shape": [2], "datatype": "FP64", "data": [1, 0]}]})
    assert decode_v2_json(one, rows=2, output_names=()).column_names == ["score"]


def test_decode_v2_refuses_a_wrong_row_count() -> None:
    body = orjson.dumps({"outputs": [{"name": "o", "shape": [3], "datatype": "FP64", "data": [1, 0, 1]}]})
    with pytest.raises(Exception, match="3 results for 2 rows"):
        decode_v2_json(body, rows=2, output_names=())


def test_model_message_is_the_exception_a_traceback_ends_with() -> None:
    traceback = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise ValueError('a')\n"
        "ValueError: first\n\nDuring handling...\nmlflow.exceptions.MlflowException: Failed to enforce schema\n"
        "of data 'x'"
    )
    assert model_message(traceback) == "MlflowException: Failed to enforce schema of data 'x'"
    assert model_message("Internal Server Error") == "Internal Server Error"
    assert len(model_message("x" * 2000)) == 500


def test_model_artifacts_on_this_file_system_are_found_without_mlflow(tmp_path: Path) -> None:
    from app.integrations.registry.mlflow import _local_path

    model = tmp_path / "my model"
    model.mkdir()
    assert _local_path(model.as_uri()) == model  # file:///... with the space quoted
    assert _local_path(str(model)) == model
    assert _local_path(f"file://localhost{model}") == model
    assert _local_path((tmp_path / "gone").as_uri()) is None  # not there: mlflow says why
    assert _local_path("s3://bucket/models/m-1/artifacts") is None
    assert _local_path("mlflow-artifacts:/models/m-1/artifacts") is None
