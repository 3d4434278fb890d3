"""The V2 client's retry policy against a real HTTP server on loopback that misbehaves on purpose."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from app.core.model_types import Feature
from app.errors import ModelServerDown, ScoringFailed
from app.integrations.deployers.port import Deployment
from app.integrations.scoring.scorers import ScoringOptions, V2RestScorer

FEATURES = (Feature("x", "double"),)


class Script:
    """What the server answers, one entry per request: a status code, or 'hang'."""

    def __init__(self) -> None:
        self.answers: list[int | str] = []
        self.requests = 0
        self.lock = threading.Lock()  # the server answers on several threads
        self.poison = -1.0  # a batch holding this value is refused with 400, as a validating model would


@pytest.fixture()
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with script.lock:
                script.requests += 1
                answer = script.answers.pop(0) if script.answers else 200
            if answer == 200 and script.poison in body["inputs"][0]["data"]:
                answer = 400
            if answer == "hang":
                time.sleep(1.5)
                return
            if answer == 200:
                xs = body["inputs"][0]["data"]
                payload = {
                    "outputs": [{"name": "o", "shape": [len(xs), 1], "datatype": "FP64", "data": [v * 2 for v in xs]}]
                }
            else:
                payload = {"error": f"scripted failure {answer}"}
            data = json.dumps(payload).encode()
            self.send_response(int(answer))
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    httpd.shutdown()


def scorer(url: str, retries: int = 3, *, timeout_s: float = 0.5, timeout_floor_s: float = 1.0) -> V2RestScorer:
    return V2RestScorer(
        deployment=Deployment(name="m", base_url=url, model_name="m"),
        features=FEATURES,
        output_names=(),
        options=ScoringOptions(timeout_s=timeout_s, retries=retries, backoff_s=0.01, timeout_floor_s=timeout_floor_s),
    )


BATCH = pa.RecordBatch.from_pydict({"x": pa.array([1.0, 2.5], pa.float64())})


def test_5xx_and_hangs_are_retried_then_scored(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [503, "hang", 502]
    with scorer(url) as s:
        result = s.score(BATCH)
    assert result.scores.to_pydict() == {"score": [2.0, 5.0]}
    assert script.requests == 4


def test_a_400_is_bisected_until_the_refused_rows_stand_alone(server: tuple[str, Script]) -> None:
    url, script = server
    script.poison = 2.5
    batch = pa.RecordBatch.from_pydict({"x": pa.array([1.0, 2.5, 3.0, 4.0, 2.5, 6.0], pa.float64())})
    with scorer(url) as s:
        result = s.score(batch)
    assert result.scored_rows.column("x").to_pylist() == [1.0, 3.0, 4.0, 6.0]
    assert result.scores.to_pydict() == {"score": [2.0, 6.0, 8.0, 12.0]}
    assert result.rejected_rows.column("x").to_pylist() == [2.5, 2.5]
    assert all("refused the row(s) (400)" in r and "scripted failure 400" in r for r in result.reject_reasons)


def test_a_500_is_the_model_raising_on_the_rows_its_message_read_from_the_traceback(
    server: tuple[str, Script],
) -> None:
    # MLServer answers 500 when the model raises in predict; with debug on, the body is the traceback.
    url, script = server
    script.answers = [500]  # the whole batch once; each row alone then scores
    with scorer(url) as s:
        result = s.score(BATCH)
    assert result.scores.to_pydict() == {"score": [2.0, 5.0]} and result.rejected_rows.num_rows == 0
    assert script.requests == 3  # no retry of the 500: the batch was cut at once


def test_other_4xx_fail_the_batch_at_once_with_the_servers_message(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [404]
    with scorer(url) as s, pytest.raises(ScoringFailed, match=r"answered 404.*scripted failure 404"):
        s.score(BATCH)
    assert script.requests == 1


def test_retry_budget_ends_in_a_clear_failure(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [503, 503, 503]
    with scorer(url, retries=2) as s, pytest.raises(ModelServerDown, match=r"after 3 attempts.*HTTP 503"):
        s.score(BATCH)


def test_connection_refused_is_retried_and_reported() -> None:
    with scorer("http://127.0.0.1:9", retries=1) as s, pytest.raises(ScoringFailed, match="ConnectError"):
        s.score(BATCH)


def test_once_the_server_has_answered_a_hang_costs_a_few_normal_answers_not_the_full_timeout(
    server: tuple[str, Script],
) -> None:
    url, script = server
    # The hang (1.5 s) would be waited out in full under a fixed timeout of 30 s.
    with scorer(url, retries=2, timeout_s=30.0, timeout_floor_s=0.2) as s:
        for _ in range(10):  # the warm-up: answers in a few milliseconds
            s.score(BATCH)
        elapsed = _score_through_a_hang(s, script)
    assert elapsed < 1.4, elapsed


def test_read_timeouts_follow_the_slowest_recent_answer_of_the_same_size_within_their_bounds() -> None:
    from app.integrations.scoring.scorers import LatencyTracker, Tuning

    t = LatencyTracker(ceiling_s=60.0, floor_s=1.0, tuning=Tuning(factor=8.0, window=5, warmup=3))
    assert t.timeout_s(rows=5000, attempt=0) == 60.0  # nothing seen yet: the configured timeout
    assert t.hedge_after_s(rows=5000) == 1.0  # and a late request is hedged after the floor
    for seconds in (0.05, 0.02, 0.03):
        t.observe(seconds, rows=5000)
    assert t.timeout_s(rows=5000, attempt=0) == 1.0  # 8 x 0.05 is below the floor
    assert t.timeout_s(rows=5000, attempt=2) == 4.0  # doubled per retry
    t.observe(0.5, rows=5000)
    assert t.timeout_s(rows=5000, attempt=0) == 4.0
    assert t.timeout_s(rows=5000, attempt=5) == 60.0  # never above the ceiling
    assert t.timeout_s(rows=10, attempt=0) == 4.0  # a size not seen yet borrows from a larger one
    for _ in range(5):  # the slow answer leaves the window
        t.observe(0.01, rows=5000)
    assert t.timeout_s(rows=5000, attempt=0) == 1.0


def test_hedging_waits_for_twice_the_90th_percentile_of_answers_of_the_same_size() -> None:
    from app.integrations.scoring.scorers import LatencyTracker, Tuning

    t = LatencyTracker(ceiling_s=60.0, floor_s=1.0, tuning=Tuning(window=10, warmup=3))
    for seconds in (0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.4):
        t.observe(seconds, rows=5000)
    for seconds in (0.004, 0.005, 0.006):
        t.observe(seconds, rows=20)
    assert t.hedge_after_s(rows=4097) == pytest.approx(0.8)  # 2 x the slowest of ten
    assert t.hedge_after_s(rows=17) == 0.02  # small requests: 2 x 6 ms, raised to the 20 ms floor
    # Sizes not seen yet borrow from the nearest larger size seen (no slower), or, larger than any, from all.
    assert t.hedge_after_s(rows=3) == 0.02
    assert t.hedge_after_s(rows=600) == pytest.approx(0.8)
    for seconds in (0.005,) * 7:  # the last ten answers of any size: 2 x p90 of them
        t.observe(seconds, rows=20)
    assert t.hedge_after_s(rows=100_000) == 0.02
    assert t.hedge_after_s(rows=4097) == pytest.approx(0.8)  # its own size is unchanged


def test_a_late_request_is_hedged_and_the_first_answer_wins(server: tuple[str, Script]) -> None:
    url, script = server
    with scorer(url, retries=0, timeout_s=30.0) as s:  # no retry: only the hedge can save the hung request
        for _ in range(5):  # the warm-up: answers in a few milliseconds
            s.score(BATCH)
        elapsed = _score_through_a_hang(s, script)
    assert elapsed < 1.0, elapsed


def test_refused_rows_are_isolated_part_by_part_in_parallel_and_the_rest_keep_their_order(
    server: tuple[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(V2RestScorer, "_late", lambda self, request, **_: False)  # exact request counts: no hedges
    url, script = server
    script.poison = 2.5
    xs = [float(i) for i in range(1000)]
    xs[3] = xs[777] = 2.5
    batch = pa.RecordBatch.from_pydict({"x": pa.array(xs, pa.float64())})
    with scorer(url) as s:
        result = s.score(batch)
    kept = [x for i, x in enumerate(xs) if i not in (3, 777)]
    assert result.scored_rows.column("x").to_pylist() == kept
    assert result.scores.column("score").to_pylist() == [2 * x for x in kept]
    assert result.rejected_rows.column("x").to_pylist() == [2.5, 2.5]
    # 1000 rows cut in eighths: 125, 16, 2, 1. Binary halving would need 2 x 10 requests per poison row.
    assert script.requests == 1 + 8 + 2 * (8 + 8 + 2)


def _score_through_a_hang(s: V2RestScorer, script: Script) -> float:
    """Score BATCH while its first request hangs (1.5 s); checks the scores and that a copy was sent; the seconds."""
    hedged_before = _hedged()
    script.answers = ["hang"]
    started = time.perf_counter()
    result = s.score(BATCH)
    elapsed = time.perf_counter() - started
    assert result.scores.to_pydict() == {"score": [2.0, 5.0]}
    assert _hedged() - hedged_before >= 1  # the hung request was sent again before its timeout
    return elapsed


def _hedged() -> float:
    from app.metrics import SCORING_HEDGED_REQUESTS

    return float(SCORING_HEDGED_REQUESTS.labels("v2-rest")._value.get())


def test_a_hang_among_the_first_requests_is_hedged_after_the_floor_not_the_ceiling(
    server: tuple[str, Script],
) -> None:
    url, script = server
    with scorer(url, retries=0, timeout_s=30.0, timeout_floor_s=0.2) as s:
        elapsed = _score_through_a_hang(s, script)  # the first request: nothing is known of the server yet
    assert elapsed < 1.0, elapsed


def test_a_hang_among_the_first_requests_is_hedged_once_its_siblings_answers_show_it_is_late(
    server: tuple[str, Script],
) -> None:
    url, script = server
    script.answers = ["hang"]
    with scorer(url, retries=0, timeout_s=30.0, timeout_floor_s=1.0) as s:
        hung: dict[str, float] = {}

        def score_the_first() -> None:
            started = time.perf_counter()
            assert s.score(BATCH).scores.to_pydict() == {"score": [2.0, 5.0]}
            hung["seconds"] = time.perf_counter() - started

        first = threading.Thread(target=score_the_first)
        first.start()
        while script.requests < 1:  # sent, and hanging, before anything was known of the server
            time.sleep(0.005)
        for _ in range(5):  # its siblings answer in a few milliseconds
            s.score(BATCH)
        first.join()
    assert hung["seconds"] < 0.6, hung  # not the floor (1 s) nor the hang (1.5 s)


def test_when_recent_answers_were_slow_a_hang_is_hedged_at_half_its_read_timeout(server: tuple[str, Script]) -> None:
    url, script = server
    with scorer(url, retries=0, timeout_s=1.2) as s:  # no retry: only the hedge can save the hung request
        for _ in range(5):  # a busy server: answers of 0.7 s; twice their 90th percentile is past the timeout
            s._latency.observe(0.7, rows=BATCH.num_rows)
        elapsed = _score_through_a_hang(s, script)
    assert elapsed < 1.0, elapsed  # hedged at 0.6 s
