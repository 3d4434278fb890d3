"""A request's population: the partner's own ids, each with the date it is scored as of, and maybe an outcome.

The file (CSV or Parquet) is checked whole before anything is queued, and kept as Parquet under the job's folder
(the partner's prefix) in the result store; its rows are never logged. A refusal names the column and the first
bad lines, so the partner can fix the file and send it again.

The row limit (RETRO_POPULATION_MAX_ROWS) is checked before the rows are held: a Parquet file's from its footer,
before any data is read; a CSV's while it is read in chunks, so a file of tiny rows stops at the limit. Only the
columns the request names are kept.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from app.errors import InvalidPopulation, PopulationTooLarge

FIRST_BAD = 5  # lines named in a refusal
CSV_CHUNK_ROWS = 200_000  # rows of a CSV parsed at a time while they are counted against the row limit
_PARQUET_MAGIC = b"PAR1"
_INT64_MAX = 2**63 - 1


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
    max_rows: int,
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
    wanted = [*id_columns, as_of_column]
    keep = [*wanted, outcome_column] if outcome_column else wanted
    frame, names = (
        _parquet_frame(data, keep=keep, id_columns=id_columns, max_rows=max_rows)
        if parquet
        else _csv_frame(data, keep=keep, max_rows=max_rows)
    )
    where = "row" if parquet else "line"
    offset = 1 if parquet else 2  # a CSV's first line is its header
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InvalidPopulation(
            f"the population file lacks column(s) {', '.join(missing)}; it needs {', '.join(wanted)} "
            f"(and optionally {outcome_column or 'an outcome column'}); it has {', '.join(map(str, names))}",
            field="population",
        )
    if frame.empty:
        raise InvalidPopulation("the population file has a header but no rows", field="population")
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
        arrow.schema.get_field_index(as_of_column), as_of_column, pa.array(table[as_of_column]).cast(pa.date32())
    )
    sink = io.BytesIO()
    pq.write_table(arrow, sink)
    columns = PopulationColumns(
        id_columns=id_columns, as_of_column=as_of_column, outcome_column=outcome_column if has_outcome else None
    )
    return Population(columns=columns, parquet=sink.getvalue(), rows=len(table))


def _too_many_rows(max_rows: int) -> PopulationTooLarge:
    return PopulationTooLarge(
        f"the population file has more than the {max_rows:,} rows allowed (RETRO_POPULATION_MAX_ROWS); "
        "split the request or ask an admin to raise the limit",
        field="population",
    )


def _csv_frame(data: bytes, *, keep: list[str], max_rows: int) -> tuple[pd.DataFrame, list[str]]:
    """The CSV's wanted columns as text, read in chunks and counted: refused once it passes max_rows."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidPopulation(
            f"the population file is not UTF-8: byte {exc.start} (line {line}) cannot be read; save it as UTF-8 CSV",
            field="population",
        ) from exc
    chunks: list[pd.DataFrame] = []
    names: list[str] = []
    rows = 0
    try:
        for chunk in _csv_chunks(data):
            names = [str(c) for c in chunk.columns]
            rows += len(chunk)
            if rows > max_rows:
                raise _too_many_rows(max_rows)
            chunks.append(chunk[[c for c in chunk.columns if c in keep]])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise InvalidPopulation(f"the population file is not a readable CSV: {exc}", field="population") from exc
    frame = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=names)
    return frame, names


def _csv_chunks(data: bytes) -> Iterator[pd.DataFrame]:
    with pd.read_csv(
        io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True, chunksize=CSV_CHUNK_ROWS
    ) as reader:
        yield from reader


def _parquet_frame(
    data: bytes, *, keep: list[str], id_columns: tuple[str, ...], max_rows: int
) -> tuple[pd.DataFrame, list[str]]:
    """The file's wanted columns; its row count (from the footer) and id types are checked before any data is read."""
    try:
        file = pq.ParquetFile(pa.BufferReader(data))
    except Exception as exc:
        raise InvalidPopulation(
            f"the population file is not a readable Parquet file: {exc}", field="population"
        ) from exc
    if file.metadata.num_rows > max_rows:
        raise _too_many_rows(max_rows)
    schema = file.schema_arrow
    for name in id_columns:
        if name in schema.names:
            _check_id_type(name, schema.field(name).type)
    try:
        return file.read(columns=[c for c in keep if c in schema.names]).to_pandas(date_as_object=False), list(
            schema.names
        )
    except Exception as exc:
        raise InvalidPopulation(
            f"the population file is not a readable Parquet file: {exc}", field="population"
        ) from exc


def _check_id_type(name: str, arrow_type: pa.DataType) -> None:
    """An id column is whole numbers or text: binary, nested and other types are refused by name."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return
    raise InvalidPopulation(
        f"column {name} is {arrow_type} in the Parquet file; an id column must hold whole numbers or text (UTF-8)",
        field="population",
    )


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
    if pd.api.types.is_numeric_dtype(values):
        return _whole_ids(values, column=column, where=where, offset=offset)
    numbers = pd.to_numeric(values, errors="coerce")
    if _fit_int64(numbers).all():
        return numbers.astype("int64")
    return values.astype(str).str.strip()


def _fit_int64(numbers: pd.Series) -> pd.Series:
    """Where numbers are whole, finite and inside a 64-bit integer (inf, NaN and 1e30 are not)."""
    if pd.api.types.is_integer_dtype(numbers):
        return numbers <= _INT64_MAX  # a signed one always is; an unsigned one may pass it
    as_float = numbers.astype("float64")
    return pd.Series(np.isfinite(as_float) & (as_float == np.round(as_float)) & (as_float.abs() < 2.0**63))


def _whole_ids(values: pd.Series, *, column: str, where: str, offset: int) -> pd.Series:
    """A numeric id column as int64; values that are not whole 64-bit integers are refused by line."""
    if pd.api.types.is_signed_integer_dtype(values):
        return values.astype("int64")
    bad = ~_fit_int64(values)
    if bad.any():
        raise InvalidPopulation(
            f"column {column} has values that are not whole numbers that fit a 64-bit id at {_lines(bad, where, offset)}",
            field="population",
        )
    return values.astype("int64")


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
    return parsed.dt.normalize()  # datetime64, not a Python date object per row (a tenth of the memory)


def _inside(days: pd.Series, *, column: str, start: date, end: date, where: str, offset: int) -> None:
    outside = (days < pd.Timestamp(start)) | (days > pd.Timestamp(end))
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
