"""Feature history sources: stream a model's input rows for a period as Arrow record batches.

The embedded default is DuckDB over Parquet files: columnar like the Hive tables it stands in for,
with partition pruning and predicate pushdown, and it streams Arrow batches without loading a
period into memory. SQLite would need row-by-row conversion and a copy of the data into it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from app.errors import SchemaMismatch, SourceUnknown, Upstream
from app.i18n import _
from app.integrations.identifiers import check_name, check_table
from app.integrations.registry import Feature

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

    def __init__(
        self, *, root: Path, memory_limit: str = "512MB", spill_dir: Path | None = None, threads: int = 2
    ) -> None:
        self._root = root
        self._memory_limit = memory_limit
        self._spill_dir = spill_dir
        self._threads = threads
        self._recent = RecentCounts()

    def _connect(self) -> Any:
        return duckdb_connection(memory_limit=self._memory_limit, spill_dir=self._spill_dir, threads=self._threads)

    def _files(self, query: HistoryQuery) -> str:
        folder = self._root.joinpath(*check_table(query.table))
        if not folder.is_dir() or not any(folder.rglob("*.parquet")):
            raise SourceUnknown(
                _("history table {table} not found: no Parquet files under {folder}").format(
                    table=repr(query.table), folder=folder
                ),
                field="source",
            )
        return str(folder / "**" / "*.parquet")

    def _from(self) -> str:
        return "read_parquet($files, hive_partitioning = true, union_by_name = true)"

    def _where(self, query: HistoryQuery) -> str:
        return f'CAST("{query.date_column}" AS DATE) BETWEEN $start AND $end'

    def check_schema(self, query: HistoryQuery) -> None:
        files = self._files(query)
        with self._connect() as con:
            try:
                schema = (
                    con.sql(f"SELECT * FROM {self._from()} LIMIT 0", params={"files": files}).to_arrow_table().schema
                )
            except Exception as exc:
                raise Upstream(
                    _("cannot read history table {table}: {exc}").format(
                        table=repr(query.table), exc=without_values(exc)
                    )
                ) from exc
        check_columns(query, schema, table_label=f"history table {query.table!r}")

    def count(self, query: HistoryQuery) -> int:
        by_day = self._count_by_day(query)
        self._recent.keep(query, by_day)
        return sum(by_day.values())

    def rows_by_day(self, query: HistoryQuery) -> dict[date, int]:
        recent = self._recent.take(query)
        return recent if recent is not None else self._count_by_day(query)

    def stage(self, query: HistoryQuery) -> None:
        """DuckDB reads the population's file where it is: nothing to stage."""

    def drop_staging(self, table: str) -> None:
        """Nothing was staged."""

    def staging_tables(self, database: str, *, prefix: str) -> list[str]:
        return []

    def _count_by_day(self, query: HistoryQuery) -> dict[date, int]:
        if query.population is not None:
            as_of = f'"{query.population.as_of_column}"'
            sql = f"SELECT {as_of}, count(*) FROM ({self._point_in_time(query)}) GROUP BY {as_of}"
        else:
            day = f'CAST("{query.date_column}" AS DATE)'
            sql = f"SELECT {day}, count(*) FROM {self._from()} WHERE {self._where(query)} GROUP BY {day}"
        with self._connect() as con, query_errors():
            rows = con.sql(sql, params=self._params(query)).fetchall()
        return {d: int(n) for d, n in rows}

    def history_days(self, *, table: str, date_column: str) -> list[date] | None:
        """From the partition folders (<date_column>=YYYY-MM-DD) of the table: a directory listing, no query."""
        folder = self._root.joinpath(*check_table(table))
        if not folder.is_dir():
            # Where the history lies on the server is for its admins (the log), not for whoever asked (issue 26, N13).
            log.warning("history table %r not found: no folder %s", table, folder)
            raise SourceUnknown(
                _("history table {table} not found in the local history").format(table=repr(table)), field="source"
            )
        return sorted(d for d in (_partition_day(p.name, date_column) for p in folder.iterdir()) if d is not None)

    def known_schema(self, table: str) -> pa.Schema | None:
        """The footer of one of the table's Parquet files: its columns' types, no data read (None: no file yet)."""
        folder = self._root.joinpath(*check_table(table))
        first = next(iter(sorted(folder.rglob("*.parquet"))), None) if folder.is_dir() else None
        return pq.read_schema(first) if first is not None else None

    def describe(self, query: HistoryQuery) -> str:
        if query.population is not None:
            return self._point_in_time(query)
        cols = ", ".join(f'"{c}"' for c in query.columns)
        return f"SELECT {cols} FROM {self._from()} WHERE {self._where(query)}"

    def batches(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._connect() as con, query_errors():
            reader = con.sql(self.describe(query), params=self._params(query)).to_arrow_reader(batch_rows)
            for batch in reader:
                if batch.num_rows:
                    yield conform(batch, query)

    def unmatched(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        pop = query.population
        if pop is None:
            return
        p, h = _population_sides(query)
        on = " AND ".join(f'h."{c}" = p."{c}"' for c in query.id_columns)
        sql = (
            f"SELECT p.*, $reason AS reason FROM {p} AS p WHERE NOT EXISTS (SELECT 1 FROM {h} AS h WHERE {on} "
            f'AND h.__snapshot BETWEEN p."{pop.as_of_column}" - CAST($lookback AS INTEGER) AND p."{pop.as_of_column}") '
            f'ORDER BY p."{pop.as_of_column}", {", ".join(f"p.{_q(c)}" for c in query.id_columns)}'
        )
        params = {**self._params(query), "reason": pop.unmatched_reason()}
        with self._connect() as con, query_errors():
            for batch in con.sql(sql, params=params).to_arrow_reader(batch_rows):
                if batch.num_rows:
                    yield batch

    def _point_in_time(self, query: HistoryQuery) -> str:
        """Each population row of the range joined to its id's latest snapshot within the lookback (DuckDB)."""
        pop = query.population
        assert pop is not None
        p, h = _population_sides(query)
        ids = ", ".join(f"p.{_q(c)}" for c in query.id_columns)
        on = " AND ".join(f"h.{_q(c)} = p.{_q(c)}" for c in query.id_columns)
        as_of = f"p.{_q(pop.as_of_column)}"
        carried = [f"p.{_q(c)}" for c in query.carried if c != query.date_column]
        picked = [*carried, f"h.{_q(query.date_column)}", *(f"h.{_q(f.name)}" for f in query.features)]
        return (
            f"SELECT {', '.join(dict.fromkeys(picked))} FROM {p} AS p JOIN {h} AS h ON {on} "
            f"AND h.__snapshot BETWEEN {as_of} - CAST($lookback AS INTEGER) AND {as_of} "
            f"QUALIFY row_number() OVER (PARTITION BY {ids}, {as_of} ORDER BY h.__snapshot DESC) = 1 "
            f"ORDER BY {as_of}, {ids}"
        )

    def _params(self, query: HistoryQuery) -> dict[str, object]:
        params: dict[str, object] = {"files": self._files(query), "start": query.start, "end": query.end}
        if query.population is not None:
            params.update(
                population=query.population.file,
                lookback=query.population.lookback_days,
                history_start=query.history_start,
            )
        return params


_QUOTED = re.compile(r"'(?:[^']|'')*'")
BLANKED = "'…'"


def without_values(exc: BaseException) -> str:
    """An error's type and first line with its quoted literals blanked: engines quote the values (a population's
    ids) and later lines echo the SQL, and this text reaches job errors and logs."""
    text = str(exc)
    first = text.splitlines()[0][:500] if text else ""
    return f"{type(exc).__name__}: {_QUOTED.sub(BLANKED, first)}"


@contextmanager
def query_errors() -> Iterator[None]:
    """A failed DuckDB query as Upstream, naming the problem but neither the values nor the SQL."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise Upstream(_("the history query failed: {exc}").format(exc=without_values(exc))) from exc


def duckdb_connection(*, memory_limit: str, spill_dir: Path | None, threads: int = 2) -> Any:
    """An in-memory DuckDB that uses at most memory_limit and spills the rest (sorts, joins, windows) to spill_dir."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit = $limit", {"limit": memory_limit})
    con.execute(f"SET threads = {int(threads)}")
    if spill_dir is not None:
        spill_dir.mkdir(parents=True, exist_ok=True)
        con.execute("SET temp_directory = $dir", {"dir": str(spill_dir)})
    return con


def _q(name: str) -> str:
    return f'"{name}"'


def _population_sides(query: HistoryQuery) -> tuple[str, str]:
    """The population rows of the range, and the history snapshots they may reach, as DuckDB subqueries."""
    pop = query.population
    assert pop is not None
    p = f"(SELECT * FROM read_parquet($population) WHERE {_q(pop.as_of_column)} BETWEEN $start AND $end)"
    h = (
        f"(SELECT *, CAST({_q(query.date_column)} AS DATE) AS __snapshot FROM "
        "read_parquet($files, hive_partitioning = true, union_by_name = true) "
        f"WHERE CAST({_q(query.date_column)} AS DATE) BETWEEN $history_start AND $end)"
    )
    return p, h
