"""Feature history sources: stream a model's input rows for a period as Arrow record batches.

The embedded default is DuckDB over Parquet files: columnar like the Hive tables it stands in for,
with partition pruning and predicate pushdown, and it streams Arrow batches without loading a
period into memory. SQLite would need row-by-row conversion and a copy of the data into it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from app.errors import SchemaMismatch, SourceUnknown, Upstream
from app.integrations.identifiers import check_name, check_table
from app.integrations.registry import Feature

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
class HistoryQuery:
    """Which rows and columns of a history table a retro test reads."""

    table: str
    date_column: str
    id_columns: tuple[str, ...]
    features: tuple[Feature, ...]
    start: date
    end: date

    def __post_init__(self) -> None:
        check_table(self.table)
        check_name(self.date_column, what="date_column")
        for c in self.id_columns:
            check_name(c, what="id_columns")
        for f in self.features:
            check_name(f.name, what="feature")

    @property
    def columns(self) -> list[str]:
        """Id columns, then the date column, then features; each named once."""
        out: list[str] = []
        for c in (*self.id_columns, self.date_column, *(f.name for f in self.features)):
            if c not in out:
                out.append(c)
        return out

    def between(self, start: date, end: date) -> HistoryQuery:
        """The same query over a sub-range of the period."""
        return HistoryQuery(
            table=self.table,
            date_column=self.date_column,
            id_columns=self.id_columns,
            features=self.features,
            start=start,
            end=end,
        )


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

    def history_span(self, *, table: str, date_column: str) -> tuple[date, date] | None:
        """The first and last day with history where partitions tell it without a query, else None."""


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
    missing = [c for c in query.columns if c.lower() not in have]
    if missing:
        raise SchemaMismatch(
            f"{table_label} lacks column(s) the retro test needs: {', '.join(missing)}",
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
        raise SchemaMismatch(f"{table_label} has incompatible column types: {'; '.join(wrong)}", field="source")


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


def _partition_day(name: str, date_column: str) -> date | None:
    """The day of a partition folder named <date_column>=YYYY-MM-DD, or None for anything else."""
    key, eq, value = name.partition("=")
    if not eq or key != date_column:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


class LocalParquetSource:
    """History as Parquet files under <history_dir>/<table> (optionally Hive-partitioned)."""

    def __init__(self, *, root: Path, memory_limit: str = "512MB", threads: int = 2) -> None:
        self._root = root
        self._memory_limit = memory_limit
        self._threads = threads
        self._recent = RecentCounts()

    def _connect(self) -> Any:
        import duckdb

        con = duckdb.connect()
        con.execute(f"SET memory_limit='{self._memory_limit}'")
        con.execute(f"SET threads={int(self._threads)}")
        return con

    def _files(self, query: HistoryQuery) -> str:
        folder = self._root.joinpath(*check_table(query.table))
        if not folder.is_dir() or not any(folder.rglob("*.parquet")):
            raise SourceUnknown(
                f"history table {query.table!r} not found: no Parquet files under {folder}",
                field="source",
            )
        return str(folder / "**" / "*.parquet")

    def _from(self) -> str:
        return "read_parquet($files, hive_partitioning = true, union_by_name = true)"

    def _where(self, query: HistoryQuery) -> str:
        return f'CAST("{query.date_column}" AS DATE) BETWEEN $start AND $end'

    def _params(self, query: HistoryQuery) -> dict[str, object]:
        return {"files": self._files(query), "start": query.start, "end": query.end}

    def check_schema(self, query: HistoryQuery) -> None:
        files = self._files(query)
        with self._connect() as con:
            try:
                schema = (
                    con.sql(f"SELECT * FROM {self._from()} LIMIT 0", params={"files": files}).to_arrow_table().schema
                )
            except Exception as exc:
                raise Upstream(f"cannot read history table {query.table!r}: {exc}") from exc
        check_columns(query, schema, table_label=f"history table {query.table!r}")

    def count(self, query: HistoryQuery) -> int:
        by_day = self._count_by_day(query)
        self._recent.keep(query, by_day)
        return sum(by_day.values())

    def rows_by_day(self, query: HistoryQuery) -> dict[date, int]:
        recent = self._recent.take(query)
        return recent if recent is not None else self._count_by_day(query)

    def _count_by_day(self, query: HistoryQuery) -> dict[date, int]:
        day = f'CAST("{query.date_column}" AS DATE)'
        with self._connect() as con:
            rows = con.sql(
                f"SELECT {day}, count(*) FROM {self._from()} WHERE {self._where(query)} GROUP BY {day}",
                params=self._params(query),
            ).fetchall()
        return {d: int(n) for d, n in rows}

    def history_span(self, *, table: str, date_column: str) -> tuple[date, date] | None:
        """From the partition folders (<date_column>=YYYY-MM-DD) of the table: a directory listing, no query."""
        folder = self._root.joinpath(*check_table(table))
        if not folder.is_dir():
            raise SourceUnknown(f"history table {table!r} not found: no folder {folder}", field="source")
        days = sorted(d for d in (_partition_day(p.name, date_column) for p in folder.iterdir()) if d is not None)
        return (days[0], days[-1]) if days else None

    def describe(self, query: HistoryQuery) -> str:
        cols = ", ".join(f'"{c}"' for c in query.columns)
        return f"SELECT {cols} FROM {self._from()} WHERE {self._where(query)}"

    def batches(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._connect() as con:
            reader = con.sql(self.describe(query), params=self._params(query)).to_arrow_reader(batch_rows)
            for batch in reader:
                if batch.num_rows:
                    yield conform(batch, query)
