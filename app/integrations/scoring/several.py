"""Scoring each batch with several models, for a job that compares them: one Scorer over one scorer per model.

A row is in the results when at least one model scored it, with each model's outputs under its column prefix and
nulls where a model refused it; each refusal is a reject of its own, naming the model. The job's rows then still
add up (read = rows in the results + rows no model scored), and every (row, model) pair is either a score or a
reject: counted per model in `model_counts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.integrations.scoring.scorers import ScoredBatch, Scorer

_ROW = "__retro_row"  # each row's place in its batch, carried through every model's scorer


@dataclass(frozen=True)
class ComparedScorer:
    """One model's scorer, where its columns start in the results, and its name as rejects give it."""

    scorer: Scorer
    column_prefix: str
    label: str
    outputs: tuple[str, ...] = ()  # its declared outputs: its columns before it has scored a row


class ModelsScorer:
    """Scores a batch with every model, side by side, and joins the answers row by row."""

    def __init__(self, models: Sequence[ComparedScorer]) -> None:
        self._models = list(models)
        # Each model's columns as it first answered: a batch it refused entirely still has them (as nulls), so
        # every part of the job has the same columns.
        self._schemas: list[pa.Schema | None] = [None] * len(self._models)
        # Each batch's models are asked at once; the batches in flight are the pipeline's (score_concurrency).
        self._pool = ThreadPoolExecutor(max_workers=4 * len(self._models), thread_name_prefix="score-model")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        n = batch.num_rows
        tagged = batch.append_column(_ROW, pa.array(np.arange(n, dtype=np.int64)))
        results = [f.result() for f in [self._pool.submit(m.scorer.score, tagged) for m in self._models]]
        any_scored = np.zeros(n, dtype=bool)
        places: list[np.ndarray] = []
        for result in results:
            where = np.full(n, -1, dtype=np.int64)
            rows = result.scored_rows.column(_ROW).to_numpy()
            where[rows] = np.arange(len(rows), dtype=np.int64)
            any_scored |= where >= 0
            places.append(where)
        kept = pa.array(any_scored)
        columns: dict[str, pa.Array | pa.ChunkedArray] = {}
        kept_rows = int(any_scored.sum())
        for n, (model, result, where) in enumerate(zip(self._models, results, places, strict=True)):
            take = pa.array(where[any_scored], mask=where[any_scored] < 0)
            if result.scores.num_columns and self._schemas[n] is None:
                self._schemas[n] = result.scores.schema
            schema = self._schemas[n] or pa.schema([(o, pa.float64()) for o in model.outputs])
            for field in schema:
                if field.name in result.scores.column_names:
                    columns[model.column_prefix + field.name] = result.scores.column(field.name).take(take)
                else:  # it refused every row of this batch
                    columns[model.column_prefix + field.name] = pa.nulls(kept_rows, field.type)
        refused, reasons, labels = [], [], []
        for model, result in zip(self._models, results, strict=True):
            if result.rejected_rows.num_rows:
                refused.append(result.rejected_rows.drop_columns([_ROW]))
                reasons += result.reject_reasons
                labels += [model.label] * result.rejected_rows.num_rows
        return ScoredBatch(
            scored_rows=batch.filter(kept),
            scores=pa.table(columns) if columns else pa.table({}),
            rejected_rows=_concat(refused, batch.schema),
            reject_reasons=reasons,
            reject_models=labels,
            unscored=batch.filter(pc.invert(kept)),
            model_counts=tuple((r.scored_rows.num_rows, r.rejected_rows.num_rows) for r in results),
        )


def _concat(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.RecordBatch:
    if not batches:
        return pa.RecordBatch.from_pylist([], schema)
    return pa.Table.from_batches(batches, schema).combine_chunks().to_batches()[0]
