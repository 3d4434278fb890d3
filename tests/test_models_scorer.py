"""Scoring each batch with several models (app/integrations/scoring/several.py): a row refused by one model keeps
the others' scores, with nulls in the refusing model's columns and a reject naming it; a row every model refused is
left out of the results; every (row, model) pair is a score or a reject. No service."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given
from hypothesis import strategies as st

from app.integrations.scoring.scorers import ScoredBatch
from app.integrations.scoring.several import ComparedScorer, ModelsScorer


class Refusing:
    """A model that scores id * factor, and refuses the ids given, one reason each."""

    def __init__(self, factor: float, refuses: set[int]) -> None:
        self.factor, self.refuses = factor, refuses

    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        ids = batch.column("id").to_pylist()
        refused = pa.array([i in self.refuses for i in ids], pa.bool_())
        scored = batch.filter(pc.invert(refused))
        return ScoredBatch(
            scored_rows=scored,
            scores=pa.table({"score": [i * self.factor for i in scored.column("id").to_pylist()]}),
            rejected_rows=batch.filter(refused),
            reject_reasons=[f"no {i}" for i in ids if i in self.refuses],
        )


def _scorer(*refuses: set[int]) -> ModelsScorer:
    return ModelsScorer(
        [
            ComparedScorer(scorer=Refusing(10.0**n, r), column_prefix=f"m{n}_", label=f"m v{n}")
            for n, r in enumerate(refuses)
        ]
    )


def test_a_row_refused_by_one_model_keeps_the_other_s_score() -> None:
    batch = pa.RecordBatch.from_pydict({"id": [1, 2, 3, 4], "x": [0.1, 0.2, 0.3, 0.4]})
    result = _scorer({2, 4}, {3, 4}).score(batch)
    assert result.scored_rows.column("id").to_pylist() == [1, 2, 3]
    assert result.scored_rows.schema == batch.schema  # nothing of the join's own left in the rows
    assert result.scores.to_pydict() == {"m0_score": [1.0, None, 3.0], "m1_score": [10.0, 20.0, None]}
    assert result.not_scored.column("id").to_pylist() == [4]
    rejects = zip(
        result.rejected_rows.column("id").to_pylist(), result.reject_models, result.reject_reasons, strict=True
    )
    assert list(rejects) == [
        (2, "m v0", "no 2"),
        (4, "m v0", "no 4"),
        (3, "m v1", "no 3"),
        (4, "m v1", "no 4"),
    ]
    assert result.model_counts == ((2, 2), (2, 2))


@given(
    ids=st.lists(st.integers(0, 50), min_size=0, max_size=30, unique=True),
    refused=st.lists(st.sets(st.integers(0, 50)), min_size=2, max_size=4),
)
def test_every_row_and_model_pair_is_a_score_or_a_reject(ids: list[int], refused: list[set[int]]) -> None:
    batch = pa.RecordBatch.from_pydict({"id": pa.array(ids, pa.int64())})
    result = _scorer(*refused).score(batch)
    assert result.scored_rows.num_rows + result.not_scored.num_rows == len(ids)
    rejects = list(zip(result.rejected_rows.column("id").to_pylist(), result.reject_models, strict=True))
    for n, refuses in enumerate(refused):
        column = result.scores.column(f"m{n}_score").to_pylist() if result.scored_rows.num_rows else []
        scored_ids = [
            i for i, s in zip(result.scored_rows.column("id").to_pylist(), column, strict=True) if s is not None
        ]
        mine = [i for i, label in rejects if label == f"m v{n}"]
        assert sorted(scored_ids + mine) == sorted(ids)  # each row once: scored or refused by this model
        assert set(mine) == refuses & set(ids)
        assert result.model_counts is not None and result.model_counts[n] == (len(scored_ids), len(mine))
    every = set.intersection(*refused) & set(ids)
    assert sorted(result.not_scored.column("id").to_pylist()) == sorted(every)


class AnswersNothingWhenItRefusesAll(Refusing):
    """As the real scorers do: a batch with no row scored has no score columns at all."""

    def score(self, batch: pa.RecordBatch) -> ScoredBatch:
        result = super().score(batch)
        return result if result.scored_rows.num_rows else replace(result, scores=pa.table({}))


def test_a_batch_one_model_refused_entirely_still_has_its_columns() -> None:
    """Every part of the job must have the same columns: the model's, as nulls, in the types it first answered."""
    scorer = ModelsScorer(
        [
            ComparedScorer(scorer=Refusing(1.0, set()), column_prefix="a_", label="a v1"),
            ComparedScorer(
                scorer=AnswersNothingWhenItRefusesAll(2.0, {3, 4}), column_prefix="b_", label="b v1", outputs=("score",)
            ),
        ]
    )
    first = scorer.score(pa.RecordBatch.from_pydict({"id": [1, 2]}))
    second = scorer.score(pa.RecordBatch.from_pydict({"id": [3, 4]}))
    assert first.scores.schema == second.scores.schema
    assert second.scores.to_pydict() == {"a_score": [3.0, 4.0], "b_score": [None, None]}
