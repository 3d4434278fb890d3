"""A request's population: the partner's own ids, each with the date it is scored as of, and maybe an outcome.

The file (CSV or Parquet) is checked whole before anything is queued, and kept as Parquet under the job's folder
(the partner's prefix) in the result store; its rows are never logged. A refusal names the column and the first
bad lines, so the partner can fix the file and send it again.

The row limit (RETRO_POPULATION_MAX_ROWS) is checked before the rows are held: a Parquet file's from its footer,
before any data is read; a CSV's while it is read in chunks, so a file of tiny rows stops at the limit. The file is
read and checked a chunk at a time; only the request's columns of each checked chunk are kept, as compact Arrow
arrays (about 20-30 bytes a row), and duplicates are found by sorting the keys.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.errors import InvalidPopulation, PopulationTooLarge
from app.i18n import _

FIRST_BAD = 5  # lines named in a refusal
CSV_CHUNK_ROWS = 200_000  # rows parsed and checked at a time (CSV and Parquet alike)
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


@dataclass(frozen=True)
class PopulationUpload:
    """A population file as the request brought it, before it is checked."""

    data: bytes
    filename: str


def read_population(
    upload: PopulationUpload, *, columns: PopulationColumns, start: date, end: date, max_bytes: int, max_rows: int
) -> Population:
    """Check a population file against the request's columns and period; raise InvalidPopulation naming the first
    problem found. The outcome column is optional in the file: the checked columns name it only if it is there."""
    data, filename = upload.data, upload.filename
    id_columns, as_of_column, outcome_column = columns.id_columns, columns.as_of_column, columns.outcome_column
    if len(data) > max_bytes:
        raise PopulationTooLarge(
            _(
                "the population file is larger than the {max_bytes:,} bytes allowed (RETRO_POPULATION_MAX_BYTES); split the request or ask an admin to raise the limit"
            ).format(max_bytes=max_bytes),
            field="population",
        )
    if not data.strip():
        raise InvalidPopulation(_("the population file is empty"), field="population")
    parquet = filename.lower().endswith(".parquet") or data[:4] == _PARQUET_MAGIC
    wanted = [*id_columns, as_of_column]
    keep = [*wanted, outcome_column] if outcome_column else wanted
    names, frames = (
        _parquet_frames(data, keep=keep, id_columns=id_columns, max_rows=max_rows)
        if parquet
        else _csv_frames(data, keep=keep, max_rows=max_rows)
    )
    where = "row" if parquet else "line"
    offset = 1 if parquet else 2  # a CSV's first line is its header
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InvalidPopulation(
            _(
                "the population file lacks column(s) {value}; it needs {value2} (and optionally {value3}); it has {value4}"
            ).format(
                value=", ".join(missing),
                value2=", ".join(wanted),
                value3=outcome_column or "an outcome column",
                value4=", ".join(map(str, names)),
            ),
            field="population",
        )
    has_outcome = outcome_column is not None and outcome_column in names
    found = PopulationColumns(
        id_columns=id_columns, as_of_column=as_of_column, outcome_column=outcome_column if has_outcome else None
    )
    chunks, line = [], offset
    for frame in frames:  # one chunk at a time: only its checked, compact columns are kept
        if not frame.empty:
            chunks.append(_check_chunk(frame, columns=found, start=start, end=end, where=where, offset=line))
            line += len(frame)
    if not chunks:
        raise InvalidPopulation(_("the population file has a header but no rows"), field="population")
    table = _assemble(chunks, found)
    _no_duplicates(table, keys=wanted, where=where, offset=offset)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return Population(columns=found, parquet=sink.getvalue(), rows=table.num_rows)


@dataclass(frozen=True)
class _Chunk:
    """One chunk's checked columns as Arrow: each id column as int64 (when all its ids are whole numbers) and as
    text (when the file holds text), the as-of dates, and the outcomes."""

    ids: dict[str, tuple[pa.Array | None, pa.Array | None]]
    as_of: pa.Array
    outcome: pa.Array | None


def _check_chunk(
    frame: pd.DataFrame, *, columns: PopulationColumns, start: date, end: date, where: str, offset: int
) -> _Chunk:
    """Check one chunk of rows; offset is the line (or row) number of its first row."""
    ids = {c: _ids(frame[c], column=c, where=where, offset=offset) for c in columns.id_columns}
    days = _dates(frame[columns.as_of_column], column=columns.as_of_column, where=where, offset=offset)
    _inside(days, column=columns.as_of_column, start=start, end=end, where=where, offset=offset)
    outcome = None
    if columns.outcome_column is not None:
        name = columns.outcome_column
        outcome = pa.array(_outcomes(frame[name], column=name, where=where, offset=offset), pa.int8())
    return _Chunk(ids=ids, as_of=pa.array(days).cast(pa.date32()), outcome=outcome)


def _assemble(chunks: list[_Chunk], columns: PopulationColumns) -> pa.Table:
    """The checked chunks as one table: integer ids where every chunk's are whole numbers, else text."""
    arrays: dict[str, pa.ChunkedArray] = {}
    for name in columns.id_columns:
        parts = [chunk.ids[name] for chunk in chunks]
        if all(ints is not None for ints, _ in parts):
            arrays[name] = pa.chunked_array([ints for ints, _ in parts], pa.int64())
        else:
            arrays[name] = pa.chunked_array([text for _, text in parts], pa.string())
    arrays[columns.as_of_column] = pa.chunked_array([chunk.as_of for chunk in chunks], pa.date32())
    if columns.outcome_column is not None:
        arrays[columns.outcome_column] = pa.chunked_array([chunk.outcome for chunk in chunks], pa.int8())
    return pa.table(arrays)


def _no_duplicates(table: pa.Table, *, keys: list[str], where: str, offset: int) -> None:
    """Refuse a repeated (ids, as-of date) pair, naming its lines; pandas only to name them."""
    if not _has_repeats(table.select(keys)):
        return
    dup = table.select(keys).to_pandas(date_as_object=False).duplicated(keys, keep="first")
    raise InvalidPopulation(
        _("the population has duplicate ({value}) pairs at {dup}; each id may appear once per as-of date").format(
            value=", ".join(keys), dup=_lines(dup, where, offset)
        ),
        field="population",
    )


def _has_repeats(keys: pa.Table) -> bool:
    """Whether any row of keys equals another: sorted, then each row against the one before (a hash grouping of
    5M rows took ten times the memory)."""
    if keys.num_rows < 2:
        return False
    ordered = keys.take(pc.sort_indices(keys, sort_keys=[(name, "ascending") for name in keys.column_names]))
    same = None
    for column in ordered.columns:
        equal = pc.equal(column.slice(1), column.slice(0, len(column) - 1))
        same = equal if same is None else pc.and_(same, equal)
    return bool(pc.any(same).as_py())


def _too_many_rows(max_rows: int) -> PopulationTooLarge:
    return PopulationTooLarge(
        _(
            "the population file has more than the {max_rows:,} rows allowed (RETRO_POPULATION_MAX_ROWS); split the request or ask an admin to raise the limit"
        ).format(max_rows=max_rows),
        field="population",
    )


def _not_csv(exc: Exception) -> InvalidPopulation:
    return InvalidPopulation(_("the population file is not a readable CSV: {exc}").format(exc=exc), field="population")


def _csv_frames(data: bytes, *, keep: list[str], max_rows: int) -> tuple[list[str], Iterator[pd.DataFrame]]:
    """The CSV's header, and its wanted columns as text in chunks, counted: refused once it passes max_rows."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InvalidPopulation(
            _(
                "the population file is not UTF-8: byte {start} (line {line}) cannot be read; save it as UTF-8 CSV"
            ).format(start=exc.start, line=line),
            field="population",
        ) from exc
    try:
        header = pd.read_csv(io.BytesIO(data), dtype=str, nrows=0, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise _not_csv(exc) from exc
    return [str(c) for c in header.columns], _csv_chunks(data, keep=keep, max_rows=max_rows)


def _csv_chunks(data: bytes, *, keep: list[str], max_rows: int) -> Iterator[pd.DataFrame]:
    rows = 0
    try:
        with pd.read_csv(
            io.BytesIO(data), dtype=str, keep_default_na=False, skipinitialspace=True, chunksize=CSV_CHUNK_ROWS
        ) as reader:
            for chunk in reader:
                rows += len(chunk)
                if rows > max_rows:
                    raise _too_many_rows(max_rows)
                yield chunk[[c for c in chunk.columns if c in keep]]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise _not_csv(exc) from exc


def _not_parquet(exc: Exception) -> InvalidPopulation:
    return InvalidPopulation(
        _("the population file is not a readable Parquet file: {exc}").format(exc=exc), field="population"
    )


def _parquet_frames(
    data: bytes, *, keep: list[str], id_columns: tuple[str, ...], max_rows: int
) -> tuple[list[str], Iterator[pd.DataFrame]]:
    """The file's column names, and its wanted columns in chunks; its row count (from the footer) and id types
    are checked before any data is read."""
    try:
        file = pq.ParquetFile(pa.BufferReader(data))
    except Exception as exc:
        raise _not_parquet(exc) from exc
    if file.metadata.num_rows > max_rows:
        raise _too_many_rows(max_rows)
    schema = file.schema_arrow
    for name in id_columns:
        if name in schema.names:
            _check_id_type(name, schema.field(name).type)
    return list(schema.names), _parquet_chunks(file, columns=[c for c in keep if c in schema.names])


def _parquet_chunks(file: pq.ParquetFile, *, columns: list[str]) -> Iterator[pd.DataFrame]:
    try:
        for batch in file.iter_batches(batch_size=CSV_CHUNK_ROWS, columns=columns):
            yield batch.to_pandas(date_as_object=False)
    except InvalidPopulation:
        raise
    except Exception as exc:
        raise _not_parquet(exc) from exc


def _check_id_type(name: str, arrow_type: pa.DataType) -> None:
    """An id column is whole numbers or text: binary, nested and other types are refused by name."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return
    raise InvalidPopulation(
        _(
            "column {name} is {arrow_type} in the Parquet file; an id column must hold whole numbers or text (UTF-8)"
        ).format(name=name, arrow_type=arrow_type),
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


def _ids(values: pd.Series, *, column: str, where: str, offset: int) -> tuple[pa.Array | None, pa.Array | None]:
    """A chunk's ids, never empty: (int64, None) from a numeric column; from text, (int64 or None, the text)."""
    blank = _blank(values)
    if blank.any():
        raise InvalidPopulation(
            _("column {column} is empty at {blank}; every row needs its id").format(
                column=column, blank=_lines(blank, where, offset)
            ),
            field="population",
        )
    if pd.api.types.is_numeric_dtype(values):
        return pa.array(_whole_ids(values, column=column, where=where, offset=offset), pa.int64()), None
    text = values.astype(str).str.strip()
    numbers = pd.to_numeric(text, errors="coerce")
    ints = pa.array(numbers.astype("int64"), pa.int64()) if _fit_int64(numbers).all() else None
    return ints, pa.array(text, pa.string())


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
            _("column {column} has values that are not whole numbers that fit a 64-bit id at {bad}").format(
                column=column, bad=_lines(bad, where, offset)
            ),
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
            _("column {column} has values that are not dates (YYYY-MM-DD) at {bad}").format(
                column=column, bad=_lines(bad, where, offset)
            ),
            field="population",
        )
    return parsed.dt.normalize()  # datetime64, not a Python date object per row (a tenth of the memory)


def _inside(days: pd.Series, *, column: str, start: date, end: date, where: str, offset: int) -> None:
    outside = (days < pd.Timestamp(start)) | (days > pd.Timestamp(end))
    if outside.any():
        raise InvalidPopulation(
            _("column {column} has dates outside the period {start} to {end} at {outside}").format(
                column=column, start=start, end=end, outside=_lines(outside, where, offset)
            ),
            field="population",
        )


def _outcomes(values: pd.Series, *, column: str, where: str, offset: int) -> pd.Series:
    numbers = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    bad = ~numbers.isin([0, 1])
    if bad.any():
        raise InvalidPopulation(
            _("column {column} must be 0 or 1; it is not at {bad}").format(
                column=column, bad=_lines(bad, where, offset)
            ),
            field="population",
        )
    return numbers.astype("int8")
