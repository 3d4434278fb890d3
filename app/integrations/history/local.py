"""The embedded history source: DuckDB over Parquet files under RETRO_HISTORY_DIR.

Columnar like the Hive tables it stands in for, with partition pruning and predicate pushdown, and it streams
Arrow batches without loading a period into memory. SQLite would need row-by-row conversion and a copy of the data
into it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.core.identifiers import check_table
from app.errors import SourceUnknown, Upstream
from app.i18n import _
from app.integrations.history.port import HistoryQuery, RecentCounts, check_columns, conform, without_values

log = logging.getLogger(__name__)


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
