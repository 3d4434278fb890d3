"""The Seldon protocol client against a real HTTP server on loopback that answers as Seldon Core v1 does."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pyarrow as pa
import pytest

from app.core.model_types import Feature
from app.errors import ScoringFailed
from app.integrations.deployers.port import Deployment
from app.integrations.scoring.codecs import decode_seldon, encode_seldon
from app.integrations.scoring.scorers import (
    SCORERS,
    BatchScorer,
    ScoringOptions,
    SeldonScorer,
    V2GrpcScorer,
    choose_protocol,
)

FEATURES = (Feature("x", "double"), Feature("plan", "string"), Feature("n", "long"))
BATCH = pa.RecordBatch.from_pydict(
    {
        "x": pa.array([1.5, None, 0.1], pa.float64()),
        "plan": pa.array(["basic", "pro", "plus"]),
        "n": pa.array([1, 2, 3], pa.int64()),
    }
)


class Seldon:
    """A scripted Seldon predictions endpoint: answers by status code, one per request; 200 doubles x.

    A request holding a row whose plan is `refused_plan` is answered 400, as a validating model would.
    """

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.refused_plan: str | None = None
        self.lock = threading.Lock()  # the server answers on several threads


@pytest.fixture()
def seldon() -> Iterator[tuple[str, Seldon]]:
    script = Seldon()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with script.lock:
                script.requests.append((self.path, body))
                answer = script.answers.pop(0) if script.answers else 200
            if any(row[1] == script.refused_plan for row in body["data"]["ndarray"]):
                answer = 400
            if answer == 200:
                rows = body["data"]["ndarray"]
                payload: dict[str, Any] = {
                    "data": {
                        "names": ["t:0", "t:1"],
                        "ndarray": [[(r[0] or 0.0) * 2, 1 - (r[0] or 0.0) * 2] for r in rows],
                    },
                    "meta": {},
                }
            else:
                payload = {"status": {"code": -1, "info": f"scripted failure {answer}", "status": "FAILURE"}}
            data = json.dumps(payload).encode()
            self.send_response(answer)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()


def scorer(url: str, *, output_names: tuple[str, ...] = ("p", "q"), retries: int = 3) -> BatchScorer:
    deployment = Deployment(name="m", base_url=url, model_name="m", protocol="seldon")
    return SCORERS[choose_protocol(deployment, "auto")](
        deployment=deployment,
        features=FEATURES,
        output_names=output_names,
        options=ScoringOptions(timeout_s=2, retries=retries, backoff_s=0.01),
    )


def test_rows_go_as_names_and_ndarray_with_nulls_as_json_null(seldon: tuple[str, Seldon]) -> None:
    url, script = seldon
    with scorer(url) as s:
        assert isinstance(s, SeldonScorer)
        result = s.score(BATCH)
    [(path, body)] = script.requests
    assert path == "/api/v1.0/predictions"
    ndarray = [[1.5, "basic", 1], [None, "pro", 2], [0.1, "plus", 3]]
    assert body == {"data": {"names": ["x", "plan", "n"], "ndarray": ndarray}}
    assert result.scores.to_pydict() == {"p": [3.0, 0.0, 0.2], "q": [-2.0, 1.0, 0.8]}
    assert result.rejected_rows.num_rows == 0


def test_5xx_is_retried_and_other_4xx_fail_at_once_with_seldons_message(seldon: tuple[str, Seldon]) -> None:
    url, script = seldon
    script.answers = [503, 502]
    with scorer(url) as s:
        assert s.score(BATCH).scores.num_rows == 3
    assert len(script.requests) == 3
    script.answers = [404]
    with scorer(url) as s, pytest.raises(ScoringFailed, match=r"answered 404 .*scripted failure 404"):
        s.score(BATCH)
    script.answers = [503, 503]
    with scorer(url, retries=1) as s, pytest.raises(ScoringFailed, match=r"after 2 attempts.*HTTP 503: scripted"):
        s.score(BATCH)


def test_a_400_isolates_the_refused_row_with_seldons_message(seldon: tuple[str, Seldon]) -> None:
    url, script = seldon
    script.refused_plan = "plus"  # the batch is refused; alone, the first two rows pass and the third does not
    with scorer(url) as s:
        result = s.score(BATCH)
    assert result.scores.to_pydict() == {"p": [3.0, 0.0], "q": [-2.0, 1.0]}
    assert result.rejected_rows.column("plan").to_pylist() == ["plus"]
    assert result.reject_reasons[0].endswith("(400): scripted failure 400")
    # The three single rows are sent side by side, in any order.
    assert sorted(len(body["data"]["ndarray"]) for _, body in script.requests) == [1, 1, 1, 3]


def test_floats_go_exactly_and_responses_are_named_like_v2() -> None:
    batch = pa.RecordBatch.from_pydict({"x": pa.array([0.1, 1 / 3], pa.float64())})
    body = orjson.loads(encode_seldon(batch, (Feature("x", "double"),)))
    assert body["data"]["ndarray"] == [[0.1], [1 / 3]]
    flat = orjson.dumps({"data": {"ndarray": [0.5, 0.25]}})
    assert decode_seldon(flat, rows=2, output_names=()).to_pydict() == {"score": [0.5, 0.25]}
    tensor = orjson.dumps({"data": {"tensor": {"shape": [2, 2], "values": [1, 2, 3, 4]}}})
    assert decode_seldon(tensor, rows=2, output_names=()).to_pydict() == {"score_0": [1, 3], "score_1": [2, 4]}
    with pytest.raises(ScoringFailed, match="returned 1 results for 2 rows"):
        decode_seldon(orjson.dumps({"data": {"ndarray": [[1, 2]]}}), rows=2, output_names=())
    with pytest.raises(ScoringFailed, match=r"neither data\.ndarray nor data\.tensor"):
        decode_seldon(orjson.dumps({"data": {"jsonData": {}}}), rows=2, output_names=())


def test_auto_speaks_the_fastest_protocol_a_deployment_serves() -> None:
    rest_only = Deployment(name="m", base_url="http://h", model_name="m")
    both = Deployment(name="m", base_url="http://h", model_name="m", grpc_target="h:9000")
    seldon = Deployment(name="m", base_url="http://h", model_name="m", protocol="seldon")
    assert [choose_protocol(d, "auto") for d in (rest_only, both, seldon)] == ["v2-rest", "v2-grpc", "seldon"]
    assert SCORERS[choose_protocol(both, "auto")] is V2GrpcScorer
    assert choose_protocol(both, "v2-rest") == "v2-rest"
    with pytest.raises(ScoringFailed, match="serves only v2-rest"):
        choose_protocol(rest_only, "v2-grpc")
    with pytest.raises(ScoringFailed, match="serves only seldon"):
        choose_protocol(seldon, "v2-rest")
