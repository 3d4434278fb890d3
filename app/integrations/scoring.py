"""Scoring over the Open Inference Protocol (V2) REST API, as served by MLServer, Seldon and KServe.

Null rule: JSON has no NaN and MLServer refuses nulls, so a row with a null in any model input is
not sent. It is returned as a rejected row naming the columns; the job decides, by its budget of
rejected rows (default 0), whether that fails the job. Every other row gets exactly one score.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from app.errors import ScoringFailed
from app.integrations.deployers import Deployment
from app.integrations.registry import Feature


class BatchRejected(ScoringFailed):
    """The model server refused a batch as invalid (4xx): retrying cannot help."""

    code = "batch_rejected"


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
    columns: dict[str, np.ndarray] = {}
    width_total = 0
    parts = []
    for out in outputs:
        data = np.asarray(out["data"])
        shape = out.get("shape") or [len(data)]
        if shape[0] != rows or data.size % rows:
            raise ScoringFailed(f"the model server returned {shape[0]} results for {rows} rows")
        width = data.size // rows
        parts.append((out.get("name", "output"), data.reshape(rows, width)))
        width_total += width
    if not parts:
        raise ScoringFailed("the model server returned no outputs")
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


class V2Scorer:
    """An httpx client for one deployment, with retries on connection errors, timeouts and 5xx."""

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
    ) -> None:
        self._url = f"{deployment.base_url}/v2/models/{deployment.model_name}/infer"
        self._features = features
        self._output_names = output_names
        self._retries = retries
        self._backoff_s = backoff_s
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"content-type": "application/json", **deployment.headers},
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> V2Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        good, bad, reasons = split_nulls(batch, self._features)
        if good.num_rows == 0:
            scores = pa.table({})
        else:
            body = self._post(encode_v2(good, self._features))
            scores = decode_v2(body, rows=good.num_rows, output_names=self._output_names)
        return ScoredBatch(scored_rows=good, scores=scores, rejected_rows=bad, reject_reasons=reasons)

    def _post(self, body: bytes) -> bytes:
        last_error = ""
        for attempt in range(self._retries + 1):
            if attempt:
                # Exponential backoff with full jitter, so many batches do not retry in lockstep.
                time.sleep(random.uniform(0, self._backoff_s * 2 ** (attempt - 1)))
            try:
                resp = self._client.post(self._url, content=body)
            except httpx.TransportError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 200:
                return resp.content
            if 400 <= resp.status_code < 500:
                raise BatchRejected(f"the model server refused the batch ({resp.status_code}): {_message(resp)}")
            last_error = f"HTTP {resp.status_code}: {_message(resp)}"
        raise ScoringFailed(
            f"scoring failed after {self._retries + 1} attempts against {self._url}; last error: {last_error}"
        )


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)[:500]
    return str(body)[:500]
