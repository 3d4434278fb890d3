"""The V2 gRPC client against a real gRPC server on loopback that answers as MLServer does (raw tensors in and
out, INTERNAL with the model's message when the model raises), scripted per request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pyarrow as pa
import pytest

from app.core.model_types import Feature
from app.errors import ModelServerDown, ScoringFailed
from app.integrations.deployers.port import Deployment
from app.integrations.scoring.scorers import ScoringOptions, V2GrpcScorer
from app.integrations.scoring.v2_grpc import inference_pb2 as pb

FEATURES = (Feature("x", "double"), Feature("plan", "string"))
POISON = -1.0  # a row holding this x makes the model raise, as a validating model would


class Script:
    """What the server answers, one entry per request: a gRPC status code, or OK (the default)."""

    def __init__(self) -> None:
        self.answers: list[grpc.StatusCode] = []
        self.requests: list[pb.ModelInferRequest] = []
        self.lock = threading.Lock()


@pytest.fixture()
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    def infer(raw: bytes, context: grpc.ServicerContext) -> bytes:
        request = pb.ModelInferRequest.FromString(raw)
        with script.lock:
            script.requests.append(request)
            answer = script.answers.pop(0) if script.answers else grpc.StatusCode.OK
        if answer != grpc.StatusCode.OK:
            context.abort(answer, f"scripted {answer.name}")
        x = np.frombuffer(request.raw_input_contents[0], "<f8")
        if (x == POISON).any():
            context.abort(grpc.StatusCode.INTERNAL, "ValueError: x must not be negative")
        response = pb.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="p", datatype="FP64", shape=[len(x), 1])
        response.raw_output_contents.append(np.nan_to_num(x * 2, nan=-9.0).astype("<f8").tobytes())
        return response.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=16))
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", script
    grpc_server.stop(grace=None)


def scorer(target: str, retries: int = 3) -> V2GrpcScorer:
    return V2GrpcScorer(
        deployment=Deployment(name="m", base_url="http://unused", model_name="m", grpc_target=target),
        features=FEATURES,
        output_names=("p",),
        options=ScoringOptions(timeout_s=5, retries=retries, backoff_s=0.01),
    )


def batch(xs: list[float | None]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(
        {"x": pa.array(xs, pa.float64()), "plan": pa.array([None if i % 2 else "basic" for i in range(len(xs))])}
    )


def test_rows_go_as_raw_tensors_and_a_null_as_nan(server: tuple[str, Script]) -> None:
    target, script = server
    with scorer(target) as s:
        result = s.score(batch([1.5, None, 0.25]))
    assert result.scores.to_pydict() == {"p": [3.0, -9.0, 0.5]} and result.rejected_rows.num_rows == 0
    [request] = script.requests
    assert request.model_name == "m" and [i.datatype for i in request.inputs] == ["FP64", "BYTES"]
    assert request.inputs[1].parameters["content_type"].string_param == "pd_json"  # the string column holds a null


def test_unavailable_is_retried_and_a_fatal_status_fails_at_once(server: tuple[str, Script]) -> None:
    target, script = server
    script.answers = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    with scorer(target) as s:
        assert s.score(batch([1.0, 2.0])).scores.num_rows == 2
    assert len(script.requests) == 3
    script.answers = [grpc.StatusCode.NOT_FOUND]
    with scorer(target) as s, pytest.raises(ScoringFailed, match=r"answered NOT_FOUND .*scripted NOT_FOUND"):
        s.score(batch([1.0]))
    script.answers = [grpc.StatusCode.UNAVAILABLE] * 2
    with scorer(target, retries=1) as s, pytest.raises(ModelServerDown, match=r"after 2 attempts.*UNAVAILABLE"):
        s.score(batch([1.0]))


def test_rows_the_model_refuses_are_isolated_with_its_message(server: tuple[str, Script]) -> None:
    target, _ = server
    xs = [float(i) for i in range(40)]
    xs[7] = xs[30] = POISON
    with scorer(target) as s:
        result = s.score(batch(xs))
    kept = [x for x in xs if x != POISON]
    assert result.scored_rows.column("x").to_pylist() == kept
    assert result.scores.column("p").to_pylist() == [2 * x for x in kept]
    assert result.rejected_rows.column("x").to_pylist() == [POISON, POISON]
    assert result.reject_reasons == ["the model refused the row(s) (INTERNAL): ValueError: x must not be negative"] * 2


def test_a_server_that_is_not_there_is_down_not_refusing() -> None:
    with scorer("127.0.0.1:9", retries=1) as s, pytest.raises(ModelServerDown, match="UNAVAILABLE"):
        s.score(batch([1.0]))
