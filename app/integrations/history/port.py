"""The history port: what a feature history source is (HistorySource) and the query, checks and conversions every
source shares. The sources: local.py (DuckDB over Parquet, the embedded default) and hive.py (HiveServer2)."""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Protocol

import pyarrow as pa

from app.core.identifiers import check_name, check_table
from app.core.model_types import Feature
from app.errors import SchemaMismatch
from app.i18n import _

log = logging.getLogger(__name__)

# Which source column types can feed which model input types without losing information.
_COMPATIBLE: dict[str, tuple[str, ...]] = {
    "double": ("floating", "integer", "decimal"),
    "float": ("floating", "integer", "decimal"),
    "long": ("integer",),
    "integer": ("integer",),
    "boolean": ("boolean",),
    "string": ("string",),
}


@dataclass(frozen=True)
class PopulationJoin:
    """The partner's population a point-in-time query reads: each row gets its id's latest snapshot on or before
    its as-of date, at most lookback_days before it."""

    file: str  # the checked Parquet copy, as a local path (DuckDB reads it)
    as_of_column: str
    outcome_column: str | None
    lookback_days: int
    staging_table: str | None = None  # the copy in the scratch database (Hive), once the worker made it

    def __post_init__(self) -> None:
        check_name(self.as_of_column, what="as_of_column")
        if self.outcome_column is not None:
            check_name(self.outcome_column, what="outcome_column")
        if self.staging_table is not None:
            check_table(self.staging_table)

    def unmatched_reason(self) -> str:
        if self.lookback_days:
            return f"no snapshot of this id in the {self.lookback_days} day(s) up to its as-of date (lookback_days)"
        return "no snapshot of this id on its as-of date"


# A job's population is staged in the scratch database as <prefix><job id hex>: the reaper finds leftovers by it.
STAGING_PREFIX = "retro_population_"


def staging_table(database: str, job_id: uuid.UUID) -> str:
    """Where a job's population is staged for the point-in-time join (Hive's scratch database)."""
    return f"{database}.{STAGING_PREFIX}{job_id.hex}"


@dataclass(frozen=True)
class HistoryQuery:
    """Which rows and columns of a history table a retro test reads; with a population, point-in-time.

    Without a population the period's every row is read, and a chunk's days are snapshot dates. With one, each
    population row whose as-of date is in the period is joined to its snapshot, and days are as-of dates.
    """

    table: str
    date_column: str
    id_columns: tuple[str, ...]
    features: tuple[Feature, ...]
    start: date
    end: date
    population: PopulationJoin | None = None

    def __post_init__(self) -> None:
        check_table(self.table)
        check_name(self.date_column, what="date_column")
        for c in self.id_columns:
            check_name(c, what="id_columns")
        for f in self.features:
            check_name(f.name, what="feature")

    @property
    def history_columns(self) -> list[str]:
        """Id columns, then the date column, then features; each named once: what the history table must have."""
        out: list[str] = []
        for c in (*self.id_columns, self.date_column, *(f.name for f in self.features)):
            if c not in out:
                out.append(c)
        return out

    @property
    def carried(self) -> list[str]:
        """The columns each result row carries besides its scores: ids, the population's, the snapshot's date."""
        pop = self.population
        own = [pop.as_of_column, *([pop.outcome_column] if pop.outcome_column else [])] if pop else []
        return list(dict.fromkeys([*self.id_columns, *own, self.date_column]))

    @property
    def columns(self) -> list[str]:
        """What a batch holds, in order: the carried columns, then the features."""
        return list(dict.fromkeys([*self.carried, *(f.name for f in self.features)]))

    @property
    def history_start(self) -> date:
        """The first snapshot date the query may read (a lookback reaches before the period)."""
        return self.start - timedelta(days=self.population.lookback_days if self.population else 0)

    def between(self, start: date, end: date) -> HistoryQuery:
        """The same query over a sub-range of the period."""
        return replace(self, start=start, end=end)


class HistorySource(Protocol):
    """A store of feature history that can be read as a stream of batches."""

    def check_schema(self, query: HistoryQuery) -> None:
        """Raise SourceUnknown or SchemaMismatch before anything is deployed."""

    def count(self, query: HistoryQuery) -> int | None:
        """Rows in the period (one GROUP BY of its days, kept a moment for rows_by_day), or None where counting is off."""

    def rows_by_day(self, query: HistoryQuery) -> dict[date, int] | None:
        """Rows of each day of the period that has any, or None where counting is switched off.

        The answer of a count of the same query a moment ago, else one GROUP BY query.
        """

    def batches(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The period's rows, columns as in query.columns, features cast to the model's types."""

    def describe(self, query: HistoryQuery) -> str:
        """The exact query text, for the manifest."""

    def history_days(self, *, table: str, date_column: str) -> list[date] | None:
        """The days with history, in order, where partitions tell them without a query; None where they do not."""

    def known_schema(self, table: str) -> pa.Schema | None:
        """The table's columns and types where the source knows them without a statement; None otherwise."""

    def unmatched(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The population's rows in the period with no snapshot to score (its columns and a `reason`)."""

    def stage(self, query: HistoryQuery) -> None:
        """Make the population readable where the history is (Hive: a staging table); idempotent."""

    def drop_staging(self, table: str) -> None:
        """Drop a population's staging table if it exists."""

    def staging_tables(self, database: str, *, prefix: str) -> list[str]:
        """Staging tables named `<database>.<prefix>...` that exist, for the reaper."""


class RecentCounts:
    """Each query's rows by day, for a short while after a count got them.

    A job counts its period (extracting) and plans its chunks from the rows of each day a moment later: the
    planner takes the answer the count just got instead of sending the query again. An answer is taken once and
    only while fresh, so a later job never plans from an old count.
    """

    def __init__(self, *, fresh_s: float = 60.0) -> None:
        self._fresh_s = fresh_s
        self._lock = threading.Lock()
        self._answers: dict[HistoryQuery, tuple[float, dict[date, int]]] = {}

    def keep(self, query: HistoryQuery, by_day: dict[date, int]) -> None:
        now = time.monotonic()
        with self._lock:
            self._answers = {q: a for q, a in self._answers.items() if now - a[0] <= self._fresh_s}
            self._answers[query] = (now, by_day)

    def take(self, query: HistoryQuery) -> dict[date, int] | None:
        with self._lock:
            answer = self._answers.pop(query, None)
        if answer is None or time.monotonic() - answer[0] > self._fresh_s:
            return None
        return answer[1]


def type_family(arrow_type: pa.DataType) -> str:
    """A coarse family of an Arrow type, to decide compatibility with a model input."""
    if pa.types.is_floating(arrow_type):
        return "floating"
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_decimal(arrow_type):
        return "decimal"
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_date(arrow_type) or pa.types.is_timestamp(arrow_type):
        return "temporal"
    return str(arrow_type)


def check_columns(query: HistoryQuery, schema: pa.Schema, *, table_label: str) -> None:
    """Compare a source schema with what the query needs; one error listing every problem."""
    have = {name.lower(): schema.field(name).type for name in schema.names}
    missing = [c for c in query.history_columns if c.lower() not in have]
    if missing:
        raise SchemaMismatch(
            _("{table_label} lacks column(s) the retro test needs: {value}").format(
                table_label=table_label, value=", ".join(missing)
            ),
            field="source",
        )
    wrong = []
    for f in query.features:
        family = type_family(have[f.name.lower()])
        if family not in _COMPATIBLE[f.type]:
            wrong.append(f"{f.name} is {have[f.name.lower()]} but the model wants {f.type}")
    if type_family(have[query.date_column.lower()]) not in ("temporal", "string"):
        wrong.append(f"date column {query.date_column} is {have[query.date_column.lower()]}")
    if wrong:
        raise SchemaMismatch(
            _("{table_label} has incompatible column types: {value}").format(
                table_label=table_label, value="; ".join(wrong)
            ),
            field="source",
        )


def conform(batch: pa.RecordBatch, query: HistoryQuery) -> pa.RecordBatch:
    """Select the query's columns in order and cast features to the model's declared types."""
    by_lower = {n.lower(): i for i, n in enumerate(batch.schema.names)}
    arrays, names = [], []
    feature_types = {f.name: f.arrow_type for f in query.features}
    for name in query.columns:
        arr = batch.column(by_lower[name.lower()])
        if name in feature_types:
            arr = arr.cast(pa.type_for_alias(feature_types[name]), safe=False)
        arrays.append(arr)
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


_QUOTED = re.compile(r"'(?:[^']|'')*'")
BLANKED = "'…'"


def without_values(exc: BaseException) -> str:
    """An error's type and first line with its quoted literals blanked: engines quote the values (a population's
    ids) and later lines echo the SQL, and this text reaches job errors and logs."""
    text = str(exc)
    first = text.splitlines()[0][:500] if text else ""
    return f"{type(exc).__name__}: {_QUOTED.sub(BLANKED, first)}"
