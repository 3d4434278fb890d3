"""Feature history in Hive, read over HiveServer2 with PyHive.

PyHive builds a Python tuple per row, and its thrift protocol decodes in pure Python; together that caps a
pull at ~40k rows/s. This source keeps PyHive's thrift client and cursor for the session (auth, configuration)
but speaks the accelerated (C) thrift protocol and turns HiveServer2's columnar fetch results straight into
Arrow arrays. A background thread fetches the next block while the caller works on the current one.

Every statement costs a production Hive seconds before its first row (planning, containers, scheduling), so a
job sends as few as it can: one GROUP BY of the period's days (rows total and the chunk plan), then one SELECT
per chunk. The schema check is a GetColumns metadata call, not a DESCRIBE; a session is opened without PyHive's
`USE <database>` (unqualified table names are qualified with RETRO_HIVE_DATABASE instead).

Values are passed as parameters (PyHive quotes them on the client); identifiers cannot be parameters, so
they are checked against an allow-list pattern and back-quoted.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.core.identifiers import check_name, check_table
from app.errors import SchemaMismatch, SourceUnknown, Upstream
from app.integrations.history.port import HistoryQuery, RecentCounts, check_columns, conform, without_values
from app.integrations.history.prefetch import prefetched

log = logging.getLogger(__name__)

_DATE_FORMATS = {"yyyy-MM-dd": "%Y-%m-%d", "yyyyMMdd": "%Y%m%d"}
_DECIMAL = re.compile(r"^decimal\((\d+),\s*(\d+)\)$")


def hive_type_to_arrow(type_name: str) -> pa.DataType:
    """The Arrow type a Hive column type arrives as; unknown (complex) types arrive as strings."""
    t = type_name.strip().lower()
    simple = {
        "boolean": pa.bool_(),
        "tinyint": pa.int8(),
        "smallint": pa.int16(),
        "int": pa.int32(),
        "integer": pa.int32(),
        "bigint": pa.int64(),
        "float": pa.float32(),
        "double": pa.float64(),
        "double precision": pa.float64(),
        "string": pa.string(),
        "date": pa.date32(),
        "timestamp": pa.timestamp("us"),
        "timestamp_ntz": pa.timestamp("us"),
    }
    if t in simple:
        return simple[t]
    if t == "decimal":
        return pa.decimal128(10, 0)
    match = _DECIMAL.match(t)
    if match:
        return pa.decimal128(int(match.group(1)), int(match.group(2)))
    if t.startswith(("varchar", "char")):
        return pa.string()
    return pa.string()


def where_clause(query: HistoryQuery, *, date_is_string: bool, date_string_format: str) -> tuple[str, dict[str, Any]]:
    """The period filter on the date (partition) column, with the dates as parameters, so Hive prunes partitions."""
    column = quote(query.date_column)
    if date_is_string:
        fmt = _DATE_FORMATS[date_string_format]
        params = {"start": query.start.strftime(fmt), "end": query.end.strftime(fmt)}
        return f"{column} BETWEEN %(start)s AND %(end)s", params
    params = {"start": query.start.isoformat(), "end": query.end.isoformat()}
    return f"{column} BETWEEN CAST(%(start)s AS DATE) AND CAST(%(end)s AS DATE)", params


def select_sql(query: HistoryQuery, *, where: str, database: str | None = None) -> str:
    """SELECT of the query's columns; every identifier has passed the allow-list and is back-quoted."""
    columns = ", ".join(quote(c) for c in query.columns)
    return f"SELECT {columns} FROM {table_sql(query.table, database=database)} WHERE {where}"


def table_sql(table: str, *, database: str | None = None) -> str:
    """The table, back-quoted, qualified with `database` when it names none itself."""
    parts = check_table(table)
    if len(parts) == 1 and database:
        parts = (check_name(database, what="database"), *parts)
    return quote(*parts)


def quote(*parts: str) -> str:
    """`a`.`b` from parts that have passed the identifier check."""
    return ".".join(f"`{p}`" for p in parts)


@dataclass(frozen=True)
class HiveSettings:
    host: str
    port: int
    database: str
    username: str
    password: str
    auth: str
    kerberos_service_name: str
    configuration: dict[str, str]
    connect_timeout_s: float
    query_timeout_s: float
    date_string_format: str
    count_rows: bool

    def __repr__(self) -> str:  # the password never reaches a log line
        return f"HiveSettings(host={self.host!r}, port={self.port}, database={self.database!r}, auth={self.auth!r})"


# HiveServer2 TColumn field -> how its values become an Arrow array.
_TCOLUMN_FIELDS = ("boolVal", "byteVal", "i16Val", "i32Val", "i64Val", "doubleVal", "stringVal", "binaryVal")


def column_to_arrow(column: Any, type_id: str, rows_hint: int | None = None) -> pa.Array:
    """One HiveServer2 TColumn as an Arrow array, nulls from its bit set; no Python object per value for numbers."""
    for field in _TCOLUMN_FIELDS:
        wrapper = getattr(column, field)
        if wrapper is not None:
            break
    else:
        raise Upstream("HiveServer2 returned an empty column")
    values = wrapper.values
    n = len(values)
    mask = _null_mask(wrapper.nulls, n)
    if field == "boolVal":
        return pa.array(np.array(values, dtype=bool), pa.bool_(), mask=mask)
    if field == "byteVal":
        return pa.array(np.array(values, dtype=np.int8), pa.int8(), mask=mask)
    if field == "i16Val":
        return pa.array(np.array(values, dtype=np.int16), pa.int16(), mask=mask)
    if field == "i32Val":
        return pa.array(np.array(values, dtype=np.int32), pa.int32(), mask=mask)
    if field == "i64Val":
        return pa.array(np.array(values, dtype=np.int64), pa.int64(), mask=mask)
    if field == "doubleVal":
        arr = pa.array(np.array(values, dtype=np.float64), pa.float64(), mask=mask)
        return arr.cast(pa.float32()) if type_id == "FLOAT_TYPE" else arr
    if field == "binaryVal":
        return pa.array(values, pa.binary(), mask=mask)
    strings = pa.array(values, pa.string(), mask=mask)
    if type_id == "DATE_TYPE":
        return strings.cast(pa.date32())
    if type_id == "TIMESTAMP_TYPE":
        return strings.cast(pa.timestamp("us"))
    if type_id == "DECIMAL_TYPE":
        return strings.cast(pa.float64())  # exact enough for model inputs; documented cast
    return strings


def _null_mask(nulls: bytes, n: int) -> np.ndarray | None:
    """HiveServer2 sends a little-endian bit set of null positions, with trailing zero bytes left off."""
    if not nulls or not any(nulls):
        return None
    bits = np.unpackbits(np.frombuffer(nulls, dtype=np.uint8), bitorder="little").astype(bool)
    if len(bits) < n:
        bits = np.concatenate([bits, np.zeros(n - len(bits), dtype=bool)])
    return bits[:n]


def _accelerated_protocol(transport: Any) -> Any:
    """thrift's C binary protocol for PyHive's generated client.

    PyHive's TCLIService was generated by an old thrift compiler whose type specs are tuples; the C codec
    of current thrift wants [class, spec] lists. The specs are converted once per class and cached.
    """
    from thrift.protocol import fastbinary
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated

    protocol = TBinaryProtocolAccelerated(transport)

    def decode(obj: Any, iprot: Any, args: tuple[type, Any]) -> Any:
        return fastbinary.decode_binary(obj, iprot, _list_spec(*args))

    def encode(obj: Any, args: tuple[type, Any]) -> Any:
        return fastbinary.encode_binary(obj, _list_spec(*args))

    protocol._fast_decode = decode
    protocol._fast_encode = encode
    return protocol


_SPECS: dict[type, list[Any]] = {}


def _list_spec(cls: type, spec: Any) -> list[Any]:
    if cls not in _SPECS:
        _SPECS[cls] = [cls, _convert_spec(spec)]
    return _SPECS[cls]


def _convert_spec(value: Any) -> Any:
    if isinstance(value, tuple):
        if len(value) == 2 and isinstance(value[0], type):
            return [value[0], _convert_spec(value[1])]
        return tuple(_convert_spec(v) for v in value)
    return value


class HiveSource:
    """History tables in Hive, read through HiveServer2."""

    def __init__(self, settings: HiveSettings) -> None:
        self._settings = settings
        self._date_types: dict[tuple[str, str], pa.DataType] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self._recent = RecentCounts()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        """A HiveServer2 session on the accelerated thrift protocol; closed however the block exits."""
        conn, sock = self._open_session()
        try:
            yield conn
        finally:
            self._close(conn, sock)

    @contextlib.contextmanager
    def _query(self, sql: str, parameters: dict[str, Any] | None = None) -> Iterator[Any]:
        """A statement's cursor in a session of its own; both are closed however the block exits."""
        conn, sock = self._open_session()
        try:
            cursor = self._execute(conn, sql, parameters)
            try:
                yield cursor
            finally:
                sock.setTimeout(self._settings.connect_timeout_s * 1000)
                with contextlib.suppress(Exception):
                    cursor.close()
        finally:
            self._close(conn, sock)

    def _open_session(self) -> tuple[Any, Any]:
        s = self._settings
        try:
            transport, sock = self._transport()
            conn = _open_session(transport, username=s.username, configuration=dict(s.configuration))
        except Exception as exc:
            raise Upstream(f"cannot open a HiveServer2 session at {s.host}:{s.port}: {_reason(exc)}") from exc
        sock.setTimeout(s.query_timeout_s * 1000)
        return conn, sock

    def _close(self, conn: Any, sock: Any) -> None:
        """Ends a session without waiting on it like a query: closes are bounded by the connect timeout.

        A HiveServer2 that never answers CloseSession (seen once with the Spark Thrift Server on a loaded
        machine) would otherwise hold the job for the query timeout; the server drops an abandoned session
        itself when its idle timeout passes. The socket is closed whether or not the server answered.
        """
        sock.setTimeout(self._settings.connect_timeout_s * 1000)
        with contextlib.suppress(Exception):
            conn.close()
        with contextlib.suppress(Exception):
            sock.close()

    def _transport(self) -> tuple[Any, Any]:
        """The thrift transport for the configured auth mode, and the socket under it."""
        from thrift.transport import TSocket, TTransport

        s = self._settings
        sock = TSocket.TSocket(s.host, s.port)
        sock.setTimeout(s.connect_timeout_s * 1000)
        if s.auth == "NOSASL":
            return TTransport.TBufferedTransport(sock), sock
        import thrift_sasl
        from pyhive.hive import get_installed_sasl

        if s.auth == "KERBEROS":
            mechanism, password, service = "GSSAPI", None, s.kerberos_service_name
        else:
            # NONE still speaks SASL PLAIN; the password only has to be non-empty.
            mechanism, password, service = "PLAIN", (s.password or "x"), None

        def sasl_client() -> Any:
            return get_installed_sasl(
                host=s.host, sasl_auth=mechanism, service=service, username=s.username, password=password
            )

        return thrift_sasl.TSaslClientTransport(sasl_client, mechanism, sock), sock

    def _execute(self, conn: Any, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        cursor = conn.cursor()
        try:
            cursor.execute(sql, parameters)
        except Exception as exc:
            cursor.close()
            raise Upstream(f"Hive refused the query: {_reason(exc)}") from exc
        return cursor

    def _table(self, query: HistoryQuery) -> str:
        return table_sql(query.table, database=self._settings.database)

    def _columns(self, conn: Any, query: HistoryQuery) -> pa.Schema:
        """The table's columns (partition columns included) from HiveServer2's GetColumns metadata call.

        A metadata call, not a statement: Hive answers it from the metastore, where a DESCRIBE is compiled and
        run like a query, paying a production Hive's per-statement latency.
        """
        from TCLIService import ttypes

        parts = check_table(query.table)
        database, table = parts if len(parts) == 2 else (self._settings.database, parts[0])
        try:
            response = conn.client.GetColumns(
                ttypes.TGetColumnsReq(sessionHandle=conn.sessionHandle, schemaName=database, tableName=table)
            )
        except Exception as exc:
            raise Upstream(f"HiveServer2 did not list the columns of {query.table!r}: {_reason(exc)}") from exc
        if response.status.statusCode not in _SUCCESS:
            raise Upstream(f"HiveServer2 did not list the columns of {query.table!r}: {response.status.errorMessage}")
        # The operation ends with the session (CloseSession closes a session's operations): no CloseOperation.
        listed = [
            [column_to_arrow(c, "").to_pylist() for c in block]
            for block in _fetch_blocks(conn, response.operationHandle, 10_000)
        ]
        fields: dict[str, pa.Field] = {}
        for block in listed:
            # JDBC's getColumns layout: TABLE_SCHEM, TABLE_NAME, COLUMN_NAME, TYPE_NAME, COLUMN_SIZE, DECIMAL_DIGITS.
            for schem, name, column, type_name, size, digits in zip(
                *(block[i] for i in (1, 2, 3, 5, 6, 8)), strict=True
            ):
                if (schem or "").lower() != database.lower() or (name or "").lower() != table.lower():
                    continue  # the names are patterns ("_" is a wildcard): only this table's own columns count
                type_name = (type_name or "string").lower()
                if type_name == "decimal" and size is not None:
                    type_name = f"decimal({size},{digits or 0})"
                fields.setdefault(column.lower(), pa.field(column, hive_type_to_arrow(type_name)))
        if not fields:
            raise SourceUnknown(f"history table {query.table!r} not found in Hive", field="source")
        return pa.schema(list(fields.values()))

    def history_days(self, *, table: str, date_column: str) -> list[date] | None:
        """None: SHOW PARTITIONS is a statement, paying a production Hive's latency in the submitting request; the
        job finds its days without history from the per-day count it makes while extracting."""
        return None

    def check_schema(self, query: HistoryQuery) -> None:
        with self._connect() as conn:
            schema = self._columns(conn, query)
        check_columns(query, schema, table_label=f"Hive table {query.table!r}")
        date_type = schema.field(_field_index(schema, query.date_column)).type
        if not (pa.types.is_date(date_type) or pa.types.is_string(date_type) or pa.types.is_timestamp(date_type)):
            raise SchemaMismatch(f"date column {query.date_column} is {date_type}", field="source")
        self._date_types[(query.table, query.date_column)] = date_type
        self._schemas[query.table] = schema

    def known_schema(self, table: str) -> pa.Schema | None:
        """The table's schema if this process has listed its columns already; no new session for it."""
        return self._schemas.get(table)

    def _date_type(self, query: HistoryQuery) -> pa.DataType:
        key = (query.table, query.date_column)
        if key not in self._date_types:
            self.check_schema(query)
        return self._date_types[key]

    def _date_is_string(self, query: HistoryQuery) -> bool:
        return bool(pa.types.is_string(self._date_type(query)))

    def _where(self, query: HistoryQuery) -> tuple[str, dict[str, Any]]:
        return where_clause(
            query, date_is_string=self._date_is_string(query), date_string_format=self._settings.date_string_format
        )

    def describe(self, query: HistoryQuery) -> str:
        return self._select(query)[0]

    def _select(self, query: HistoryQuery) -> tuple[str, dict[str, Any]]:
        """The query's SQL and its parameters: the period's rows, or the population's point-in-time join."""
        if query.population is not None:
            return self._point_in_time(query)
        where, params = self._where(query)
        return select_sql(query, where=where, database=self._settings.database), params

    def count(self, query: HistoryQuery) -> int | None:
        if not self._settings.count_rows:
            return None
        by_day = self._count_by_day(query)
        self._recent.keep(query, by_day)
        return sum(by_day.values())

    def rows_by_day(self, query: HistoryQuery) -> dict[date, int] | None:
        if not self._settings.count_rows:
            return None
        recent = self._recent.take(query)
        return recent if recent is not None else self._count_by_day(query)

    def _count_by_day(self, query: HistoryQuery) -> dict[date, int]:
        """One GROUP BY over the period's partitions: the rows of each day that has any."""
        if query.population is not None:  # matched rows of each as-of date
            matched, params = self._point_in_time(query)
            as_of = quote(query.population.as_of_column)
            with self._query(f"SELECT {as_of}, COUNT(*) FROM ({matched}) m GROUP BY {as_of}", params) as cursor:
                return {date.fromisoformat(str(d)[:10]): int(n) for d, n in cursor.fetchall()}
        where, params = self._where(query)
        day = quote(query.date_column)
        if pa.types.is_timestamp(self._date_type(query)):
            day = f"CAST({day} AS DATE)"
        sql = f"SELECT {day}, COUNT(*) FROM {self._table(query)} WHERE {where} GROUP BY {day}"
        with self._query(sql, params) as cursor:
            rows = cursor.fetchall()
        by_day: dict[date, int] = {}
        for value, n in rows:
            d = self._day(query, value)
            by_day[d] = by_day.get(d, 0) + int(n)
        return by_day

    def _day(self, query: HistoryQuery, value: Any) -> date:
        """A day as HiveServer2 returns it: a DATE as 'yyyy-MM-dd', a STRING in RETRO_HIVE_DATE_STRING_FORMAT."""
        text = str(value)
        try:
            if self._date_is_string(query):
                return datetime.strptime(text, _DATE_FORMATS[self._settings.date_string_format]).date()
            return date.fromisoformat(text[:10])
        except ValueError:
            raise SchemaMismatch(
                f"date column {query.date_column} holds {text!r}, which is not a day in "
                f"{self._settings.date_string_format}",
                field="source",
            ) from None

    def stage(self, query: HistoryQuery) -> None:
        """The population's rows as a table in the scratch database, made afresh (INSERTs of STAGE_ROWS rows).

        PyHive interpolates the values on the client, escaped; the names have passed the allow-list.
        """
        pop = query.population
        if pop is None:
            return
        staging = self._staging(query)
        source = pq.ParquetFile(pop.file)
        columns = ", ".join(f"{quote(f.name)} {_STAGE_TYPES.get(str(f.type), 'STRING')}" for f in source.schema_arrow)
        database = check_table(staging)[0]
        with self._connect() as conn:
            for sql in (
                f"CREATE DATABASE IF NOT EXISTS {quote(database)}",
                f"DROP TABLE IF EXISTS {table_sql(staging)}",
                f"CREATE TABLE {table_sql(staging)} ({columns}) STORED AS PARQUET",
            ):
                self._execute(conn, sql).close()
            for batch in source.iter_batches(batch_size=STAGE_ROWS):
                cells = ", ".join("CAST(%s AS DATE)" if pa.types.is_date(f.type) else "%s" for f in source.schema_arrow)
                values = ", ".join(f"({cells})" for _ in range(batch.num_rows))
                flat = [_sql_value(v) for row in zip(*batch.to_pydict().values(), strict=True) for v in row]
                self._execute(conn, f"INSERT INTO {table_sql(staging)} VALUES {values}", flat).close()  # type: ignore[arg-type]

    def drop_staging(self, table: str) -> None:
        with self._connect() as conn:
            self._execute(conn, f"DROP TABLE IF EXISTS {table_sql(table)}").close()

    def staging_tables(self, database: str, *, prefix: str) -> list[str]:
        check_name(database, what="database")
        with self._connect() as conn:
            cursor = self._execute(conn, f"SHOW TABLES IN {quote(database)}")
            try:
                rows = cursor.fetchall()
            finally:
                cursor.close()
        # Spark answers (namespace, tableName, isTemporary), Hive (tab_name).
        names = [str(row[1] if len(row) > 1 else row[0]) for row in rows]
        return [f"{database}.{n}" for n in names if n.lower().startswith(prefix.lower())]

    def unmatched(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        pop = query.population
        if pop is None:
            return
        matched, params = self._point_in_time(query)
        on = " AND ".join(f"m.{quote(c)} = p.{quote(c)}" for c in (*query.id_columns, pop.as_of_column))
        sql = (
            f"SELECT p.*, %(reason)s AS reason FROM {table_sql(self._staging(query))} p "
            f"LEFT JOIN ({matched}) m ON {on} WHERE m.{quote(pop.as_of_column)} IS NULL "
            f"AND p.{quote(pop.as_of_column)} BETWEEN CAST(%(pop_start)s AS DATE) AND CAST(%(pop_end)s AS DATE)"
        )
        with self._query(sql, {**params, "reason": pop.unmatched_reason()}) as cursor:
            names = [d[0].split(".")[-1] for d in cursor.description]
            types = [d[1] for d in cursor.description]
            for columns in _prefetched(cursor, batch_rows):
                batch = pa.RecordBatch.from_arrays(
                    [column_to_arrow(col, types[i]) for i, col in enumerate(columns)], names=names
                )
                if batch.num_rows:
                    yield batch

    def _staging(self, query: HistoryQuery) -> str:
        pop = query.population
        if pop is None or pop.staging_table is None:
            raise ValueError("a point-in-time query on Hive needs its population's staging table")
        return pop.staging_table

    def _point_in_time(self, query: HistoryQuery) -> tuple[str, dict[str, Any]]:
        """Each staged population row of the range joined to its id's latest snapshot within the lookback."""
        pop = query.population
        assert pop is not None
        history_where, params = where_clause(
            query.between(query.history_start, query.end),
            date_is_string=self._date_is_string(query),
            date_string_format=self._settings.date_string_format,
        )
        day = quote(query.date_column)
        if self._date_is_string(query):
            day = f"to_date({day}, '{self._settings.date_string_format}')"
        elif pa.types.is_timestamp(self._date_type(query)):
            day = f"CAST({day} AS DATE)"
        as_of = f"p.{quote(pop.as_of_column)}"
        ids = ", ".join(f"p.{quote(c)}" for c in query.id_columns)
        on = " AND ".join(f"h.{quote(c)} = p.{quote(c)}" for c in query.id_columns)
        carried = [f"p.{quote(c)}" for c in query.carried if c != query.date_column]
        inner = [*carried, f"h.{quote(query.date_column)}", *(f"h.{quote(f.name)}" for f in query.features)]
        outer = ", ".join(quote(c) for c in query.columns)
        sql = (
            f"SELECT {outer} FROM (SELECT {', '.join(dict.fromkeys(inner))}, row_number() OVER "
            f"(PARTITION BY {ids}, {as_of} ORDER BY {day} DESC) AS `retro_rank` "
            f"FROM {table_sql(self._staging(query))} p JOIN {self._table(query)} h ON {on} "
            f"WHERE {as_of} BETWEEN CAST(%(pop_start)s AS DATE) AND CAST(%(pop_end)s AS DATE) AND {history_where} "
            f"AND {day} BETWEEN date_sub({as_of}, {int(pop.lookback_days)}) AND {as_of}) ranked "
            "WHERE `retro_rank` = 1"
        )
        return sql, {**params, "pop_start": query.start.isoformat(), "pop_end": query.end.isoformat()}

    def batches(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        sql, params = self._select(query)
        with self._query(sql, params) as cursor:
            names = [d[0].split(".")[-1] for d in cursor.description]
            types = [d[1] for d in cursor.description]
            for columns in _prefetched(cursor, batch_rows):
                arrays = [column_to_arrow(col, types[i]) for i, col in enumerate(columns)]
                batch = pa.RecordBatch.from_arrays(arrays, names=names)
                if batch.num_rows:
                    yield conform(_dates_as_dates(batch, query, self._date_is_string(query), self._settings), query)


# Rows per INSERT when a population is staged: PyHive sends each statement's values inline.
STAGE_ROWS = 5_000
_STAGE_TYPES = {"int64": "BIGINT", "int32": "INT", "int8": "INT", "date32[day]": "DATE", "string": "STRING"}


def _sql_value(value: Any) -> Any:
    """A population cell as PyHive escapes it: dates as their ISO text (cast back in the statement)."""
    return value.isoformat() if isinstance(value, date) else value


def _dates_as_dates(
    batch: pa.RecordBatch, query: HistoryQuery, is_string: bool, settings: HiveSettings
) -> pa.RecordBatch:
    """A STRING date partition column becomes a real date in the results."""
    if not is_string:
        return batch
    import pyarrow.compute as pc

    i = batch.schema.get_field_index(query.date_column)
    parsed = pc.strptime(batch.column(i), format=_DATE_FORMATS[settings.date_string_format], unit="s").cast(pa.date32())
    return batch.set_column(i, query.date_column, parsed)


def _open_session(transport: Any, *, username: str, configuration: dict[str, str]) -> Any:
    """A PyHive connection over `transport`, on the accelerated protocol, without PyHive's `USE <database>`.

    PyHive's own constructor sends `USE` as a statement on every session: on a production Hive a statement is
    seconds of latency, and a job opens a session per query. Table names are qualified instead (table_sql).
    """
    from pyhive import hive
    from TCLIService import TCLIService, ttypes

    conn = hive.Connection.__new__(hive.Connection)  # its __init__ would send the USE
    conn._transport = transport
    # Same wire format, decoded in C: the thrift struct decoding is most of PyHive's cost.
    conn._client = TCLIService.Client(_accelerated_protocol(transport))
    transport.open()
    try:
        response = conn._client.OpenSession(
            ttypes.TOpenSessionReq(
                client_protocol=ttypes.TProtocolVersion.HIVE_CLI_SERVICE_PROTOCOL_V6,
                configuration=configuration,
                username=username or getpass.getuser(),
            )
        )
        hive._check_status(response)
        conn._sessionHandle = response.sessionHandle
    except BaseException:
        transport.close()
        raise
    return conn


def _prefetched(cursor: Any, rows: int) -> Iterator[list[Any]]:
    """Columns of each FetchResults block, fetched one block ahead on a background thread."""
    with prefetched(
        lambda: _fetch_blocks(cursor._connection, cursor._operationHandle, rows), depth=2, name="hive-fetch"
    ) as blocks:
        try:
            yield from blocks
        except Upstream:
            raise
        except Exception as exc:
            raise Upstream(f"reading from HiveServer2 failed: {_reason(exc)}") from exc


def _fetch_blocks(conn: Any, operation: Any, rows: int) -> Iterator[list[Any]]:
    """Columns of each FetchResults block of an operation (a query, a metadata call), until an empty block."""
    from TCLIService import ttypes

    while True:
        req = ttypes.TFetchResultsReq(
            operationHandle=operation, orientation=ttypes.TFetchOrientation.FETCH_NEXT, maxRows=rows
        )
        resp = conn.client.FetchResults(req)
        if resp.status.statusCode not in _SUCCESS:
            raise Upstream(f"HiveServer2 failed to fetch rows: {resp.status.errorMessage}")
        columns = resp.results.columns or []
        if not columns or not _column_length(columns[0]):
            return
        yield columns


_SUCCESS = (0, 1)  # TStatusCode SUCCESS_STATUS, SUCCESS_WITH_INFO_STATUS


def _column_length(column: Any) -> int:
    for field in _TCOLUMN_FIELDS:
        wrapper = getattr(column, field)
        if wrapper is not None:
            return len(wrapper.values)
    return 0


def _field_index(schema: pa.Schema, name: str) -> int:
    for i, field in enumerate(schema):
        if field.name.lower() == name.lower():
            return i
    raise SchemaMismatch(f"no column {name}", field="source")


def _reason(exc: BaseException) -> str:
    """A short, password-free description of a PyHive/thrift error, without the values or SQL Hive quotes."""
    status = getattr(getattr(exc, "args", [None])[0], "status", None)
    if status is not None and getattr(status, "errorMessage", None):
        return without_values(Exception(status.errorMessage)).removeprefix("Exception: ")
    return without_values(exc)


def settings_from(app_settings: Any) -> HiveSettings:
    """HiveSettings from the application's Settings."""
    s = app_settings
    return HiveSettings(
        host=s.hive_host,
        port=s.hive_port,
        database=s.hive_database,
        username=s.hive_username,
        password=s.hive_password.get_secret_value(),
        auth=s.hive_auth,
        kerberos_service_name=s.hive_kerberos_service_name,
        configuration=dict(s.hive_configuration),
        connect_timeout_s=s.hive_connect_timeout_s,
        query_timeout_s=s.hive_query_timeout_s,
        date_string_format=s.hive_date_string_format,
        count_rows=s.hive_count_rows,
    )
