"""Scoring over the Open Inference Protocol (V2) REST API, as served by MLServer, Seldon and KServe, and over
the Seldon protocol (Seldon Core v1 with `protocol: seldon`).

Null rule: JSON has no NaN and MLServer refuses nulls, so a row with a null in any model input is
not sent. It is returned as a rejected row naming the columns; the job decides, by its budget of
rejected rows (default 0), whether that fails the job. Every other row gets exactly one score.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from app.errors import ModelServerDown, ScoringFailed
from app.integrations.deployers import Deployment
from app.integrations.registry import Feature
from app.metrics import (
    ROWS_REJECTED,
    ROWS_SCORED,
    SCORING_HEDGED_REQUESTS,
    SCORING_REQUEST_ERRORS,
    SCORING_REQUEST_SECONDS,
)

# How often a waiting request asks again whether it is late: a request sent before any answer came is hedged
# soon after the first answers show what an answer takes, not only after the floor.
HEDGE_RECHECK_S = 0.05


class BatchRejected(ScoringFailed):
    """The model server refused a batch as invalid (4xx): retrying cannot help."""

    code = "batch_rejected"


class ScoringStopped(ScoringFailed):
    """The caller asked the scorer to stop between retries (a cancel, a lost lease); the caller knows why."""


@dataclass(frozen=True)
class ScoredBatch:
    """Scores for the sent rows (in order) and the rows that were not sent, with reasons."""

    scored_rows: pa.RecordBatch  # the input rows that were scored
    scores: pa.Table  # one row per scored row, columns named by score_columns
    rejected_rows: pa.RecordBatch
    reject_reasons: list[str]


class Scorer(Protocol):
    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        """Score one batch; raise ScoringFailed once retries are spent."""


def split_nulls(
    batch: pa.RecordBatch, features: tuple[Feature, ...]
) -> tuple[pa.RecordBatch, pa.RecordBatch, list[str]]:
    """Split a batch into rows whose features are all present and rows with a null, with reasons."""
    null_masks = {f.name: batch.column(f.name).is_null() for f in features if batch.column(f.name).null_count}
    if not null_masks:
        return batch, batch.slice(0, 0), []
    any_null = None
    for mask in null_masks.values():
        any_null = mask if any_null is None else pc.or_(any_null, mask)
    assert any_null is not None
    bad = batch.filter(any_null)
    masks_np = {name: m.filter(any_null).to_numpy(zero_copy_only=False) for name, m in null_masks.items()}
    reasons = [
        "null in model input(s): " + ", ".join(name for name, m in masks_np.items() if m[i])
        for i in range(bad.num_rows)
    ]
    return batch.filter(pc.invert(any_null)), bad, reasons


def encode_v2(batch: pa.RecordBatch, features: tuple[Feature, ...]) -> bytes:
    """A V2 inference request, built column by column."""
    inputs: list[dict[str, Any]] = []
    n = batch.num_rows
    for f in features:
        col = batch.column(f.name)
        if f.v2_datatype == "BYTES":
            data: Any = col.to_pylist()
            params = {"content_type": "str"}
        else:
            data = col.to_numpy(zero_copy_only=False)
            params = {}
        entry: dict[str, Any] = {"name": f.name, "datatype": f.v2_datatype, "shape": [n, 1], "data": data}
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    return orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_v2(body: bytes, *, rows: int, output_names: tuple[str, ...]) -> pa.Table:
    """Named score columns from a V2 response: one column per output, or per output column."""
    payload = orjson.loads(body)
    outputs = payload.get("outputs") or []
    parts = []
    for out in outputs:
        data = np.asarray(out["data"])
        shape = out.get("shape") or [len(data)]
        if shape[0] != rows or data.size % rows:
            raise ScoringFailed(f"the model server returned {shape[0]} results for {rows} rows")
        parts.append((out.get("name", "output"), data.reshape(rows, data.size // rows)))
    if not parts:
        raise ScoringFailed("the model server returned no outputs")
    return _score_columns(parts, output_names)


def _score_columns(parts: Sequence[tuple[str, np.ndarray]], output_names: tuple[str, ...]) -> pa.Table:
    """Name the result columns: the signature's output names when they fit, else score / score_j / output_j."""
    columns: dict[str, np.ndarray] = {}
    width_total = sum(arr.shape[1] for _, arr in parts)
    if len(output_names) == width_total:
        names = iter(output_names)  # the signature names every output column: use those names
        for _, arr in parts:
            for j in range(arr.shape[1]):
                columns[next(names)] = arr[:, j]
    elif len(parts) == 1:
        arr = parts[0][1]
        if arr.shape[1] == 1:
            columns["score"] = arr[:, 0]
        else:
            for j in range(arr.shape[1]):
                columns[f"score_{j}"] = arr[:, j]
    else:
        for name, arr in parts:
            for j in range(arr.shape[1]):
                columns[name if arr.shape[1] == 1 else f"{name}_{j}"] = arr[:, j]
    return pa.table(columns)


def encode_seldon(batch: pa.RecordBatch, features: tuple[Feature, ...]) -> bytes:
    """A Seldon protocol request: {"data": {"names": [...], "ndarray": [[row], ...]}}."""
    columns = [batch.column(f.name).to_pylist() for f in features]
    return orjson.dumps({"data": {"names": [f.name for f in features], "ndarray": list(zip(*columns, strict=True))}})


def decode_seldon(body: bytes, *, rows: int, output_names: tuple[str, ...]) -> pa.Table:
    """Named score columns from a Seldon protocol response (data.ndarray or data.tensor), named as for V2."""
    payload = orjson.loads(body)
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        raise ScoringFailed("the model server's Seldon response has no data")
    if "ndarray" in data:
        arr = np.asarray(data["ndarray"])
    elif isinstance(data.get("tensor"), dict):
        arr = np.asarray(data["tensor"].get("values") or []).reshape(data["tensor"].get("shape") or [-1])
    else:
        raise ScoringFailed("the model server's Seldon response has neither data.ndarray nor data.tensor")
    got = arr.shape[0] if arr.ndim else 0
    if got != rows:
        raise ScoringFailed(f"the model server returned {got} results for {rows} rows")
    return _score_columns([("output", arr.reshape(rows, -1))], output_names)


class LatencyTracker:
    """Recent answer times by request size, for read timeouts and hedging delays that follow the server.

    Requests are grouped by size (rows, in powers of two), so a 10-row request isolating a poison row is not
    judged by the answer times of 5,000-row batches; a group with fewer than `warmup` answers borrows those of
    the nearest larger group that has them, or all of them.
    - Read timeout: `factor` x the slowest recent answer, at least floor_s, doubled on each retry, never more
      than ceiling_s (RETRO_SCORE_TIMEOUT_S). Before `warmup` answers, ceiling_s. A server that slows down for
      everyone sees retries with longer timeouts, not failures: only the retry budget ends a batch.
    - Hedging delay: a request still unanswered after `hedge_factor` x the 90th percentile of recent answers is
      sent a second time, and the first answer wins: a hung or lost request costs about one slow answer.
      Before the warm-up, after floor_s (RETRO_SCORE_TIMEOUT_FLOOR_S): a hang among the first requests of a
      job (or of a resumed attempt) costs a second, not the ceiling.
    """

    def __init__(
        self,
        *,
        ceiling_s: float,
        floor_s: float,
        factor: float = 4.0,
        hedge_factor: float = 2.0,
        hedge_floor_s: float = 0.02,
        window: int = 50,
        warmup: int = 3,
    ) -> None:
        self._ceiling_s = ceiling_s
        self._floor_s = min(floor_s, ceiling_s)
        self._factor = factor
        self._hedge_factor = hedge_factor
        self._hedge_floor_s = hedge_floor_s
        self._window = window
        self._warmup = warmup
        self._all: deque[float] = deque(maxlen=window)
        self._by_size: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def observe(self, seconds: float, *, rows: int) -> None:
        with self._lock:
            self._all.append(seconds)
            self._by_size.setdefault(rows.bit_length(), deque(maxlen=self._window)).append(seconds)

    def _recent(self, rows: int) -> list[float]:
        """The answer times of this size, else of the nearest larger size with enough of them (an answer takes
        no longer for fewer rows), else of every size."""
        with self._lock:
            warm = [size for size, group in self._by_size.items() if len(group) >= self._warmup]
            size = min((w for w in warm if w >= rows.bit_length()), default=None)
            if size is not None:
                return list(self._by_size[size])
            return list(self._all) if len(self._all) >= self._warmup else []

    def timeout_s(self, *, rows: int, attempt: int) -> float:
        recent = self._recent(rows)
        if not recent:
            return self._ceiling_s
        return float(min(self._ceiling_s, max(self._floor_s, self._factor * max(recent)) * 2**attempt))

    def hedge_after_s(self, *, rows: int) -> float:
        recent = sorted(self._recent(rows))
        if not recent:
            return self._floor_s
        p90 = recent[min(len(recent) - 1, int(0.9 * len(recent)))]
        return max(self._hedge_floor_s, self._hedge_factor * p90)


class V2Scorer:
    """An httpx client for one deployment: retries on connection errors, timeouts and 5xx, hedged requests, and
    parallel isolation of the rows a server refuses.

    The request path and body are the hooks _endpoint/_encode/_decode; SeldonScorer changes only those.
    """

    protocol = "v2"

    def __init__(
        self,
        *,
        deployment: Deployment,
        features: tuple[Feature, ...],
        output_names: tuple[str, ...],
        timeout_s: float,
        retries: int,
        backoff_s: float,
        max_connections: int = 8,
        should_stop: Callable[[], bool] = lambda: False,
        timeout_floor_s: float = 1.0,
        isolation_fanout: int = 8,
    ) -> None:
        self._url = self._endpoint(deployment)
        self._latency = LatencyTracker(ceiling_s=timeout_s, floor_s=timeout_floor_s)
        self._ceiling_s = timeout_s
        self._should_stop = should_stop
        self._features = features
        self._output_names = output_names
        self._retries = retries
        self._backoff_s = backoff_s
        self._fanout = max(2, isolation_fanout)
        # Room for every batch in flight, the parts being isolated (2 x fanout: a refused part is cut while its
        # siblings are still out), and a hedge for each of them.
        connections = 2 * (max_connections + 2 * self._fanout)
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"content-type": "application/json", **deployment.headers},
        )
        # Requests run on these threads so that a late one can be hedged; a request given up by its caller
        # keeps its thread until its own read timeout.
        self._requests = ThreadPoolExecutor(max_workers=2 * connections, thread_name_prefix="score-request")
        self._parts = ThreadPoolExecutor(max_workers=2 * self._fanout, thread_name_prefix="score-isolate")

    def close(self) -> None:
        self._parts.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> V2Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _endpoint(deployment: Deployment) -> str:
        return f"{deployment.base_url}/v2/models/{deployment.model_name}/infer"

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        return encode_v2(batch, self._features)

    def _decode(self, body: bytes, *, rows: int) -> pa.Table:
        return decode_v2(body, rows=rows, output_names=self._output_names)

    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        good, bad, reasons = split_nulls(batch, self._features)
        scored: list[tuple[pa.RecordBatch, pa.Table]] = []
        refused: list[tuple[pa.RecordBatch, str]] = []
        if good.num_rows:
            self._score_isolating(good, scored, refused)
        rejected = [bad, *(rows for rows, _ in refused)]
        reasons = reasons + [reason for rows, reason in refused for _ in range(rows.num_rows)]
        result = ScoredBatch(
            scored_rows=_concat_batches([rows for rows, _ in scored], batch.schema),
            scores=pa.concat_tables([t for _, t in scored]) if scored else pa.table({}),
            rejected_rows=_concat_batches(rejected, batch.schema),
            reject_reasons=reasons,
        )
        ROWS_SCORED.labels(self.protocol).inc(result.scored_rows.num_rows)
        ROWS_REJECTED.labels(self.protocol).inc(result.rejected_rows.num_rows)
        return result

    def _score_isolating(
        self,
        batch: pa.RecordBatch,
        scored: list[tuple[pa.RecordBatch, pa.Table]],
        refused: list[tuple[pa.RecordBatch, str]],
    ) -> None:
        """Score a batch; when the server refuses it as invalid, find the refused rows, keeping source order.

        A refused batch is cut into `isolation_fanout` parts scored side by side, and each refused part is cut
        again as soon as its answer comes, without waiting for its siblings: a poison row in 5,000 costs 5
        requests in a row, and a hung request for a clean part delays only that part.
        """
        outcome = self._try(batch)
        if not isinstance(outcome, str):
            scored.append((batch, outcome))
            return
        found: list[tuple[int, pa.RecordBatch, pa.Table | str]] = []  # (offset, rows, scores or reason)
        pending: dict[Future[pa.Table | str], tuple[int, pa.RecordBatch]] = {}

        def cut(offset: int, rows: pa.RecordBatch) -> None:
            for at, piece in _split(rows, self._fanout):
                pending[self._parts.submit(self._try, piece)] = (offset + at, piece)

        cut(0, batch)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                offset, piece = pending.pop(future)
                result = future.result()
                if isinstance(result, str) and piece.num_rows > 1:
                    cut(offset, piece)
                else:
                    found.append((offset, piece, result))  # scored, or a refused row on its own: isolated
        for _, rows, result in sorted(found, key=lambda f: f[0]):
            if isinstance(result, str):
                refused.append((rows, result))
            else:
                scored.append((rows, result))

    def _try(self, batch: pa.RecordBatch) -> pa.Table | str:
        """The scores of a batch, or the server's reason for refusing it as invalid."""
        try:
            body = self._post(self._encode(batch), rows=batch.num_rows)
        except BatchRejected as exc:
            return exc.detail
        return self._decode(body, rows=batch.num_rows)

    def _post(self, body: bytes, *, rows: int) -> bytes:
        last_error = ""
        for attempt in range(self._retries + 1):
            if attempt:
                # Exponential backoff with full jitter, so many batches do not retry in lockstep.
                time.sleep(random.uniform(0, self._backoff_s * 2 ** (attempt - 1)))
                if self._should_stop():  # no point retrying for a job that was cancelled or moved on
                    raise ScoringStopped(f"stopped retrying against {self._url}; last error: {last_error}")
            try:
                resp = self._send(body, rows=rows, attempt=attempt)
            except httpx.TransportError as exc:
                SCORING_REQUEST_ERRORS.labels(self.protocol, "transport").inc()
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 200:
                return resp.content
            SCORING_REQUEST_ERRORS.labels(self.protocol, str(resp.status_code)).inc()
            if resp.status_code in (400, 422):  # the data: split the batch to find the rows
                raise BatchRejected(f"the model server refused the row(s) ({resp.status_code}): {_message(resp)}")
            if 400 <= resp.status_code < 500:  # the request itself (wrong model, auth, size): no retry helps
                raise ScoringFailed(f"the model server answered {resp.status_code} at {self._url}: {_message(resp)}")
            last_error = f"HTTP {resp.status_code}: {_message(resp)}"
        raise ModelServerDown(
            f"scoring failed after {self._retries + 1} attempts against {self._url}; last error: {last_error}"
        )

    def _send(self, body: bytes, *, rows: int, attempt: int) -> httpx.Response:
        """One attempt: the request, and a second copy of it if the first is late; the first 200 wins."""
        timeout_s = self._latency.timeout_s(rows=rows, attempt=attempt)
        first = self._requests.submit(self._timed_post, body, rows=rows, timeout_s=timeout_s)
        if not self._late(first, rows=rows, timeout_s=timeout_s):
            return first.result()
        SCORING_HEDGED_REQUESTS.labels(self.protocol).inc()
        second = self._requests.submit(self._timed_post, body, rows=rows, timeout_s=timeout_s)
        # The first to end decides, even with an error: waiting on the other might mean waiting out a hang.
        done, _ = wait([first, second], return_when=FIRST_COMPLETED)
        return next((f for f in done if _answered_200(f)), next(iter(done))).result()

    def _late(self, request: Future[httpx.Response], *, rows: int, timeout_s: float) -> bool:
        """Wait for a request until it is answered (False) or late enough to hedge (True).

        What counts as late is asked again every HEDGE_RECHECK_S: a request sent before any answer came (the
        first of a job or of a resumed attempt) waits the floor only until its siblings' answers show what an
        answer takes. A request is late at half its read timeout at the latest: when recent answers were slow
        (a busy server, a timeout cut to the ceiling), a hang costs half the timeout, not all of it and a retry.
        """
        started = time.perf_counter()
        while True:
            hedge_after_s = min(self._latency.hedge_after_s(rows=rows), timeout_s / 2)
            left = hedge_after_s - (time.perf_counter() - started)
            if left <= 0:
                return not request.done()
            if wait([request], timeout=min(left, HEDGE_RECHECK_S)).done:
                return False

    def _timed_post(self, body: bytes, *, rows: int, timeout_s: float) -> httpx.Response:
        started = time.perf_counter()
        try:
            resp = self._client.post(
                self._url,
                content=body,
                timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=self._ceiling_s),
            )
        finally:
            seconds = time.perf_counter() - started
            SCORING_REQUEST_SECONDS.labels(self.protocol).observe(seconds)
        if resp.status_code == 200:
            self._latency.observe(seconds, rows=rows)
        return resp


class SeldonScorer(V2Scorer):
    """The Seldon protocol: POST /api/v1.0/predictions with data.names and data.ndarray.

    The same client, null rule and retry loop as V2Scorer; only the path and the bodies differ.
    """

    protocol = "seldon"

    @staticmethod
    def _endpoint(deployment: Deployment) -> str:
        return f"{deployment.base_url}/api/v1.0/predictions"

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        return encode_seldon(batch, self._features)

    def _decode(self, body: bytes, *, rows: int) -> pa.Table:
        return decode_seldon(body, rows=rows, output_names=self._output_names)


# The scorer for each Deployment.protocol.
SCORERS: dict[str, type[V2Scorer]] = {"v2": V2Scorer, "seldon": SeldonScorer}


def _split(batch: pa.RecordBatch, parts: int) -> list[tuple[int, pa.RecordBatch]]:
    """A batch cut into at most `parts` slices of near-equal size, each with its offset in the batch."""
    n = batch.num_rows
    bounds = [n * i // min(parts, n) for i in range(min(parts, n) + 1)]
    return [(a, batch.slice(a, b - a)) for a, b in itertools.pairwise(bounds)]


def _answered_200(request: Future[httpx.Response]) -> bool:
    return request.exception() is None and request.result().status_code == 200


def _concat_batches(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    """One record batch from several with the same schema (an empty one for none)."""
    batches = [b for b in batches if b.num_rows]
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=schema)
    return pa.Table.from_batches(batches, schema=schema).combine_chunks().to_batches()[0]


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        status = body.get("status")
        seldon_info = status.get("info") if isinstance(status, dict) else None  # Seldon's error body
        return str(body.get("error") or body.get("detail") or seldon_info or body)[:500]
    return str(body)[:500]
