"""Scoring a deployment batch by batch: V2 gRPC (binary tensors), V2 REST (JSON) and the Seldon protocol.

One mechanism for every protocol (BatchScorer): bounded concurrency, retries with backoff, read timeouts and
hedging that follow the server's answer times, and isolation of the rows the model refuses. Each protocol is a
subclass that only says how a batch goes on the wire and how an answer is read (app/integrations/scoring/codecs.py).

Nulls travel to the model (see protocols.py for the rule): no row is held back for being null. A row is rejected
only when the model refuses it, with the model's own message; the job decides, by its budget of rejected rows
(default 0), whether that fails the job. Every other row gets exactly one score.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import ClassVar, Protocol

import httpx
import pyarrow as pa

from app.config import Settings
from app.core.model_types import Feature
from app.errors import ModelServerDown, ScoringFailed
from app.integrations.deployers.port import Deployment
from app.integrations.scoring.codecs import (
    GRPC_MODEL_INFER,
    decode_seldon,
    decode_v2_grpc,
    decode_v2_json,
    encode_seldon,
    encode_v2_grpc,
    encode_v2_json,
    model_message,
    v2_inputs,
)
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


class ScoringStopped(ScoringFailed):
    """The caller asked the scorer to stop between retries (a cancel, a lost lease); the caller knows why."""


@dataclass(frozen=True)
class ScoredBatch:
    """Scores for the rows the model scored (in order) and the rows it refused, with its reasons."""

    scored_rows: pa.RecordBatch  # the input rows that were scored
    scores: pa.Table  # one row per scored row, columns named by score_columns
    rejected_rows: pa.RecordBatch
    reject_reasons: list[str]
    # A batch of several models (app/integrations/scoring/several.py): a row is in rejected_rows once for each
    # model that refused it, named in reject_models; `unscored` holds the rows no model scored; model_counts the
    # (scored, rejected) rows of each model.
    reject_models: list[str] | None = None
    unscored: pa.RecordBatch | None = None
    model_counts: tuple[tuple[int, int], ...] | None = None

    @property
    def not_scored(self) -> pa.RecordBatch:
        """The rows that are not in the results: no model scored them."""
        return self.unscored if self.unscored is not None else self.rejected_rows


class Scorer(Protocol):
    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        """Score one batch; raise ScoringFailed once retries are spent."""


@dataclass(frozen=True)
class Reply:
    """What one request brought back: scores, the model's refusal, a failure worth retrying, or one that is not."""

    body: bytes | None = None  # the answer, when the server scored the batch
    refused: str | None = None  # the model refused these rows (a 4xx or the model's own exception): its message
    retry: str | None = None  # the server or the network failed; another try may work
    fatal: str | None = None  # the request itself is wrong (model name, auth, size): no retry helps


@dataclass(frozen=True)
class Tuning:
    """How LatencyTracker turns recent answer times into timeouts and hedging delays (see there)."""

    factor: float = 4.0
    hedge_factor: float = 2.0
    hedge_floor_s: float = 0.02
    window: int = 50
    warmup: int = 3


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

    def __init__(self, *, ceiling_s: float, floor_s: float, tuning: Tuning = Tuning()) -> None:
        self._ceiling_s = ceiling_s
        self._floor_s = min(floor_s, ceiling_s)
        self._factor = tuning.factor
        self._hedge_factor = tuning.hedge_factor
        self._hedge_floor_s = tuning.hedge_floor_s
        self._window = tuning.window
        self._warmup = tuning.warmup
        self._all: deque[float] = deque(maxlen=tuning.window)
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


@dataclass(frozen=True)
class ScoringOptions:
    """How a scorer sends: timeouts, retries, requests in flight, isolation (RETRO_SCORE_*)."""

    timeout_s: float  # the longest a request may take, on any attempt
    retries: int
    backoff_s: float
    max_connections: int = 8  # batches in flight
    timeout_floor_s: float = 1.0
    isolation_fanout: int = 8

    @classmethod
    def from_settings(cls, settings: Settings) -> ScoringOptions:
        return cls(
            timeout_s=settings.score_timeout_s,
            retries=settings.score_retries,
            backoff_s=settings.score_backoff_s,
            max_connections=settings.score_concurrency,
            timeout_floor_s=settings.score_timeout_floor_s,
        )


class BatchScorer:
    """The scoring mechanism for one deployment, whatever the protocol: retries on failures worth retrying,
    hedged requests, and parallel isolation of the rows the model refuses.

    A protocol is a subclass that says how a batch is encoded (_encode), sent once (_exchange) and read back
    (_decode); the rest is shared.
    """

    protocol: ClassVar[str]

    def __init__(
        self,
        *,
        deployment: Deployment,
        features: tuple[Feature, ...],
        output_names: tuple[str, ...],
        options: ScoringOptions,
        should_stop: Callable[[], bool] = lambda: False,
        server_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self._deployment = deployment
        self._server_gone = server_gone
        self._latency = LatencyTracker(ceiling_s=options.timeout_s, floor_s=options.timeout_floor_s)
        self._ceiling_s = options.timeout_s
        self._should_stop = should_stop
        self._features = features
        self._output_names = output_names
        self._retries = options.retries
        self._backoff_s = options.backoff_s
        self._fanout = max(2, options.isolation_fanout)
        # Room for every batch in flight, the parts being isolated (2 x fanout: a refused part is cut while its
        # siblings are still out), and a hedge for each of them.
        self._connections = 2 * (options.max_connections + 2 * self._fanout)
        self._open(deployment)
        # Requests run on these threads so that a late one can be hedged; a request given up by its caller
        # keeps its thread until its own read timeout.
        self._requests = ThreadPoolExecutor(max_workers=2 * self._connections, thread_name_prefix="score-request")
        self._parts = ThreadPoolExecutor(max_workers=2 * self._fanout, thread_name_prefix="score-isolate")

    # What each protocol defines.
    def _open(self, deployment: Deployment) -> None:
        """Make the client or channel that reaches the deployment (closed again in close())."""
        raise NotImplementedError

    @property
    def target(self) -> str:
        """Where requests go, for messages."""
        raise NotImplementedError

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        raise NotImplementedError

    def _exchange(self, payload: bytes, *, timeout_s: float) -> Reply:
        """Send one request and classify what came back; never raises for what the server or network does."""
        raise NotImplementedError

    def _decode(self, body: bytes, *, rows: int) -> pa.Table:
        raise NotImplementedError

    # The shared mechanism.
    def close(self) -> None:
        self._parts.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> BatchScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        scored: list[tuple[pa.RecordBatch, pa.Table]] = []
        refused: list[tuple[pa.RecordBatch, str]] = []
        if batch.num_rows:
            self._score_isolating(batch, scored, refused)
        result = ScoredBatch(
            scored_rows=_concat_batches([rows for rows, _ in scored], batch.schema),
            scores=pa.concat_tables([t for _, t in scored]) if scored else pa.table({}),
            rejected_rows=_concat_batches([rows for rows, _ in refused], batch.schema),
            reject_reasons=[reason for rows, reason in refused for _ in range(rows.num_rows)],
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
        """Score a batch; when the model refuses it, find the refused rows, keeping source order.

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
        """The scores of a batch, or the model's reason for refusing it."""
        reply = self._call(self._encode(batch), rows=batch.num_rows)
        if reply.refused is not None:
            return reply.refused
        assert reply.body is not None
        return self._decode(reply.body, rows=batch.num_rows)

    def _call(self, payload: bytes, *, rows: int) -> Reply:
        """An answer or a refusal, retrying what is worth retrying; raises once that budget is spent."""
        last_error = ""
        for attempt in range(self._retries + 1):
            if attempt:
                # Exponential backoff with full jitter, so many batches do not retry in lockstep.
                time.sleep(random.uniform(0, self._backoff_s * 2 ** (attempt - 1)))
                if self._should_stop():  # no point retrying for a job that was cancelled or moved on
                    raise ScoringStopped(f"stopped retrying against {self.target}; last error: {last_error}")
            reply = self._send(payload, rows=rows, attempt=attempt)
            if reply.body is not None or reply.refused is not None:
                return reply
            if reply.fatal is not None:
                raise ScoringFailed(reply.fatal)
            last_error = reply.retry or "no answer"
            if self._server_gone():  # retries cannot bring back a server that exited: re-create it now
                raise ModelServerDown(f"the model server behind {self.target} has exited; last error: {last_error}")
        raise ModelServerDown(
            f"scoring failed after {self._retries + 1} attempts against {self.target}; last error: {last_error}"
        )

    def _send(self, payload: bytes, *, rows: int, attempt: int) -> Reply:
        """One attempt: the request, and a second copy of it if the first is late; the first answer wins."""
        timeout_s = self._latency.timeout_s(rows=rows, attempt=attempt)
        first = self._requests.submit(self._timed, payload, rows=rows, timeout_s=timeout_s)
        if not self._late(first, rows=rows, timeout_s=timeout_s):
            return first.result()
        SCORING_HEDGED_REQUESTS.labels(self.protocol).inc()
        second = self._requests.submit(self._timed, payload, rows=rows, timeout_s=timeout_s)
        # The first to end decides, even with an error: waiting on the other might mean waiting out a hang.
        done, _ = wait([first, second], return_when=FIRST_COMPLETED)
        return next((f for f in done if f.result().body is not None), next(iter(done))).result()

    def _late(self, request: Future[Reply], *, rows: int, timeout_s: float) -> bool:
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

    def _timed(self, payload: bytes, *, rows: int, timeout_s: float) -> Reply:
        started = time.perf_counter()
        try:
            reply = self._exchange(payload, timeout_s=timeout_s)
        finally:
            seconds = time.perf_counter() - started
            SCORING_REQUEST_SECONDS.labels(self.protocol).observe(seconds)
        if reply.body is not None:
            self._latency.observe(seconds, rows=rows)
        return reply


class V2RestScorer(BatchScorer):
    """The Open Inference Protocol (V2) over REST: POST /v2/models/{name}/infer with JSON tensors."""

    protocol = "v2-rest"

    def _open(self, deployment: Deployment) -> None:
        self._url = self._endpoint(deployment)
        self._client = httpx.Client(
            timeout=httpx.Timeout(self._ceiling_s, connect=min(self._ceiling_s, 10.0)),
            limits=httpx.Limits(max_connections=self._connections, max_keepalive_connections=self._connections),
            headers={"content-type": "application/json", **deployment.headers},
        )

    def close(self) -> None:
        super().close()
        self._client.close()

    @property
    def target(self) -> str:
        return self._url

    @staticmethod
    def _endpoint(deployment: Deployment) -> str:
        return f"{deployment.base_url}/v2/models/{deployment.model_name}/infer"

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        return encode_v2_json(v2_inputs(batch, self._features), rows=batch.num_rows)

    def _decode(self, body: bytes, *, rows: int) -> pa.Table:
        return decode_v2_json(body, rows=rows, output_names=self._output_names)

    def _exchange(self, payload: bytes, *, timeout_s: float) -> Reply:
        try:
            resp = self._client.post(
                self._url,
                content=payload,
                timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0), pool=self._ceiling_s),
            )
        except httpx.TransportError as exc:
            SCORING_REQUEST_ERRORS.labels(self.protocol, "transport").inc()
            return Reply(retry=f"{type(exc).__name__}: {exc}")
        if resp.status_code == 200:
            return Reply(body=resp.content)
        SCORING_REQUEST_ERRORS.labels(self.protocol, str(resp.status_code)).inc()
        # 400/422: the server refused the data. 500: the model (or the decoding of its inputs) raised on these
        # rows; MLServer answers 500 for any exception in predict. A server that is unwell says 502/503/504.
        if resp.status_code in (400, 422, 500):
            return Reply(refused=f"the model refused the row(s) ({resp.status_code}): {_message(resp)}")
        if 400 <= resp.status_code < 500:
            return Reply(fatal=f"the model server answered {resp.status_code} at {self._url}: {_message(resp)}")
        return Reply(retry=f"HTTP {resp.status_code}: {_message(resp)}")


class SeldonScorer(V2RestScorer):
    """The Seldon protocol: POST /api/v1.0/predictions with data.names and data.ndarray.

    The same client, retries and isolation as V2 REST; only the path and the bodies differ.
    """

    protocol = "seldon"

    @staticmethod
    def _endpoint(deployment: Deployment) -> str:
        return f"{deployment.base_url}/api/v1.0/predictions"

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        return encode_seldon(batch, self._features)

    def _decode(self, body: bytes, *, rows: int) -> pa.Table:
        return decode_seldon(body, rows=rows, output_names=self._output_names)


class V2GrpcScorer(BatchScorer):
    """The Open Inference Protocol (V2) over gRPC: ModelInfer with raw_input_contents / raw_output_contents.

    Binary tensors both ways (a NaN is just a float), on one long-lived HTTP/2 channel that carries every request
    in flight; no JSON is built or parsed on either side.
    """

    protocol = "v2-grpc"

    # gRPC status codes by what they mean for a batch: the model refused it (MLServer answers INTERNAL with the
    # model's exception), it is worth another try, or no retry can help (the rest).
    _REFUSED = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "INTERNAL")
    _RETRY = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED", "UNKNOWN")

    def _open(self, deployment: Deployment) -> None:
        import grpc  # only a gRPC job loads it

        if not deployment.grpc_target:
            raise ScoringFailed(f"the deployment {deployment.name} offers no gRPC endpoint")
        self._target = deployment.grpc_target
        self._rpc_error = grpc.RpcError
        self._channel = grpc.insecure_channel(
            self._target,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
                ("grpc.enable_retries", 0),  # retries and hedging are this class's own
                ("grpc.keepalive_time_ms", 30_000),
            ],
        )
        self._infer = self._channel.unary_unary(GRPC_MODEL_INFER)
        self._metadata = tuple((k.lower(), v) for k, v in deployment.headers.items())

    def close(self) -> None:
        super().close()
        self._channel.close()

    @property
    def target(self) -> str:
        return f"grpc://{self._target}"

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        tensors = v2_inputs(batch, self._features)
        return encode_v2_grpc(tensors, rows=batch.num_rows, model_name=self._deployment.model_name)

    def _decode(self, body: bytes, *, rows: int) -> pa.Table:
        return decode_v2_grpc(body, rows=rows, output_names=self._output_names)

    def _exchange(self, payload: bytes, *, timeout_s: float) -> Reply:
        try:
            body = self._infer(payload, timeout=timeout_s, metadata=self._metadata)
        except self._rpc_error as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            SCORING_REQUEST_ERRORS.labels(self.protocol, code).inc()
            if code in self._REFUSED:
                return Reply(refused=f"the model refused the row(s) ({code}): {model_message(details or '')}")
            if code in self._RETRY:
                return Reply(retry=f"gRPC {code}: {details}")
            return Reply(fatal=f"the model server answered {code} at {self.target}: {details}")
        return Reply(body=bytes(body))


# The scorer class for each RETRO_SCORE_PROTOCOL.
SCORERS: dict[str, type[BatchScorer]] = {"v2-grpc": V2GrpcScorer, "v2-rest": V2RestScorer, "seldon": SeldonScorer}


def choose_protocol(deployment: Deployment, setting: str) -> str:
    """The protocol to score a deployment with: the setting, or the fastest the deployment serves ("auto")."""
    served = deployment.protocols
    if setting == "auto":
        return served[0]
    if setting not in served:
        raise ScoringFailed(
            f"RETRO_SCORE_PROTOCOL={setting}, but the deployment serves only {', '.join(served)}; "
            "choose one of those or auto"
        )
    return setting


def _split(batch: pa.RecordBatch, parts: int) -> list[tuple[int, pa.RecordBatch]]:
    """A batch cut into at most `parts` slices of near-equal size, each with its offset in the batch."""
    n = batch.num_rows
    bounds = [n * i // min(parts, n) for i in range(min(parts, n) + 1)]
    return [(a, batch.slice(a, b - a)) for a, b in itertools.pairwise(bounds)]


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
        return model_message(resp.text)
    if isinstance(body, dict):
        status = body.get("status")
        seldon_info = status.get("info") if isinstance(status, dict) else None  # Seldon's error body
        return str(body.get("error") or body.get("detail") or seldon_info or body)[:500]
    return str(body)[:500]
