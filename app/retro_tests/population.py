"""A request's population: the partner's own ids, each with the date it is scored as of, and maybe an outcome.

The file (CSV or Parquet) is checked whole before anything is queued, and kept as Parquet under the job's folder
(the partner's prefix) in the result store; its rows are never logged. A refusal names the column and the first
bad lines, so the partner can fix the file and send it again.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import date
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app.errors import InvalidPopulation, PopulationTooLarge

FIRST_BAD = 5  # lines named in a refusal
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class PopulationColumns:
    """Which columns of the file hold what."""

    id_columns: tuple[str, ...]
    as_of_column: str
    outcome_column: str | None  # present in the file, or None: a report without quality metrics


@dataclass(frozen=True)
class Population:
    """A checked population: its rows as Parquet bytes, how many, and which columns hold what."""

    columns: PopulationColumns
    parquet: bytes
    rows: int


def read_upload(file: IO[bytes], *, limit: int) -> bytes:
    """An uploaded file's bytes, reading at most one past `limit` (read_population then refuses it as too large)."""
    return file.read(limit + 1)


def read_population(
    *,
    data: bytes,
    filename: str,
    id_columns: tuple[str, ...],
    as_of_column: str,
    outcome_column: str | None,
    start: date,
    end: date,
    max_bytes: int,
) -> Population:
    """Check a population file against the request; raise InvalidPopulation naming the first problem found."""
    if len(data) > max_bytes:
        raise PopulationTooLarge(
            f"the population file is larger than the {max_bytes:,} bytes allowed (RETRO_POPULATION_MAX_BYTES); "
            "split the request or ask an admin to raise the limit",
            field="population",
        )
    if not data.strip():
        raise InvalidPopulation("the population file is empty", field="population")
    parquet = filename.lower().endswith(".parquet") or data[:4] == _PARQUET_MAGIC
    frame = _parquet_frame(data) if parquet else _csv_frame(data)
    where = "row" if parquet else "line"
    offset = 1 if parquet else 2  # a CSV's first line is its header
    if frame.empty:
        raise InvalidPopulation("the population file has a header but no rows", field="population")
    wanted = [*id_columns, as_of_column]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise InvalidPopulation(
            f"the population file lacks column(s) {', '.join(missing)}; it needs {', '.join(wanted)} "
            f"(and optionally {outcome_column or 'an outcome column'}); it has {', '.join(map(str, frame.columns))}",
            field="population",
        )
    has_outcome = outcome_column is not None and outcome_column in frame.columns
    out: dict[str, Any] = {c: _ids(frame[c], column=c, where=where, offset=offset) for c in id_columns}
    out[as_of_column] = _dates(frame[as_of_column], column=as_of_column, where=where, offset=offset)
    _inside(out[as_of_column], column=as_of_column, start=start, end=end, where=where, offset=offset)
    if has_outcome:
        assert outcome_column is not None
        out[outcome_column] = _outcomes(frame[outcome_column], column=outcome_column, where=where, offset=offset)
    table = pd.DataFrame(out)
    dup = table.duplicated([*id_columns, as_of_column], keep="first")
    if dup.any():
        raise InvalidPopulation(
            f"the population has duplicate ({', '.join(wanted)}) pairs at {_lines(dup, where, offset)}; "
            "each id may appear once per as-of date",
            field="population",
        )
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.set_column(
        arrow.schema.get_field_index(as_of_column), as_of_column, pa.array(table[as_of_column], pa.date32())
    )
    sink = io.BytesIO()
    pq.write_table(arrow, sink)
    columns = PopulationColumns(
        id_columns=id_columns, as_of_column=as_of_column, outcome_column=outcome_column if has_outcome else None
    )
    return Population(columns=columns, parquet=sink.getvalue(), rows=len(table))


def _csv_frame(data: bytes) -> pd.DataFrame:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidPopulation(
            f"the population file is not UTF-8: byte {exc.start} (line {line}) cannot be read; save it as UTF-8 CSV",
            field="population",
        ) from exc
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise InvalidPopulation(f"the population file is not a readable CSV: {exc}", field="population") from exc


def _parquet_frame(data: bytes) -> pd.DataFrame:
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except Exception as exc:
        raise InvalidPopulation(
            f"the population file is not a readable Parquet file: {exc}", field="population"
        ) from exc


def _lines(bad: pd.Series, where: str, offset: int) -> str:
    """'lines 3, 7' for the first FIRST_BAD positions where `bad` is true."""
    positions = [i + offset for i in bad.to_numpy().nonzero()[0][:FIRST_BAD]]
    more = int(bad.sum()) - len(positions)
    label = where if len(positions) == 1 and more <= 0 else f"{where}s"
    return f"{label} {', '.join(map(str, positions))}" + (f" and {more} more" if more > 0 else "")


def _blank(values: pd.Series) -> pd.Series:
    return values.isna() | (values.astype(str).str.strip() == "")


def _ids(values: pd.Series, *, column: str, where: str, offset: int) -> pd.Series:
    """Integer ids where every value is an integer, else text; never empty."""
    blank = _blank(values)
    if blank.any():
        raise InvalidPopulation(
            f"column {column} is empty at {_lines(blank, where, offset)}; every row needs its id", field="population"
        )
    if pd.api.types.is_integer_dtype(values):
        return values.astype("int64")
    numbers = pd.to_numeric(values, errors="coerce")
    whole = numbers.notna() & (numbers == numbers.round())
    if whole.all():
        return numbers.astype("int64")
    return values.astype(str).str.strip()


def _dates(values: pd.Series, *, column: str, where: str, offset: int) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    else:
        text = values.astype(str).str.strip()
        parsed = pd.to_datetime(text, format="%Y-%m-%d", errors="coerce")
    bad = parsed.isna()
    if bad.any():
        raise InvalidPopulation(
            f"column {column} has values that are not dates (YYYY-MM-DD) at {_lines(bad, where, offset)}",
            field="population",
        )
    return parsed.dt.date


def _inside(days: pd.Series, *, column: str, start: date, end: date, where: str, offset: int) -> None:
    outside = (days < start) | (days > end)
    if outside.any():
        raise InvalidPopulation(
            f"column {column} has dates outside the period {start} to {end} at {_lines(outside, where, offset)}",
            field="population",
        )


def _outcomes(values: pd.Series, *, column: str, where: str, offset: int) -> pd.Series:
    numbers = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    bad = ~numbers.isin([0, 1])
    if bad.any():
        raise InvalidPopulation(
            f"column {column} must be 0 or 1; it is not at {_lines(bad, where, offset)}", field="population"
        )
    return numbers.astype("int8")
