"""Feature history in Hive, read over HiveServer2 with PyHive.

PyHive builds a Python tuple per row, and its thrift protocol decodes in pure Python; together that caps a
pull at ~40k rows/s. This source keeps PyHive for the session (auth, configuration, USE database) but
speaks the accelerated (C) thrift protocol and turns HiveServer2's columnar fetch results straight into
Arrow arrays. A background thread fetches the next block while the caller works on the current one.

Values are passed as parameters (PyHive quotes them on the client); identifiers cannot be parameters, so
they are checked against an allow-list pattern and back-quoted.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from app.errors import SchemaMismatch, SourceUnknown, Upstream
from app.integrations.history import HistoryQuery, check_columns, conform
from app.integrations.identifiers import check_table
from app.integrations.prefetch import prefetched

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


def select_sql(query: HistoryQuery, *, where: str) -> str:
    """SELECT of the query's columns; every identifier has passed the allow-list and is back-quoted."""
    columns = ", ".join(quote(c) for c in query.columns)
    return f"SELECT {columns} FROM {quote(*check_table(query.table))} WHERE {where}"


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
        self._date_types: dict[tuple[str, str], bool] = {}

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        """A HiveServer2 session on the accelerated thrift protocol; closed however the block exits."""
        from pyhive import hive
        from TCLIService import TCLIService

        s = self._settings
        try:
            transport, sock = self._transport()
            conn = hive.Connection(
                thrift_transport=transport,
                username=s.username,
                database=s.database,
                configuration=dict(s.configuration),
            )
        except Exception as exc:
            raise Upstream(f"cannot open a HiveServer2 session at {s.host}:{s.port}: {_reason(exc)}") from exc
        # Same wire format, decoded in C: the thrift struct decoding is most of PyHive's cost.
        conn._client = TCLIService.Client(_accelerated_protocol(conn._transport))
        sock.setTimeout(s.query_timeout_s * 1000)
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.close()

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

    def _describe(self, conn: Any, table: str) -> pa.Schema:
        parts = check_table(table)
        try:
            cursor = self._execute(conn, f"DESCRIBE {quote(*parts)}")
        except Upstream as exc:
            if "not found" in exc.detail.lower() or "cannot be found" in exc.detail.lower():
                raise SourceUnknown(f"history table {table!r} not found in Hive", field="source") from None
            raise
        fields: list[pa.Field] = []
        seen: set[str] = set()
        with contextlib.closing(cursor):
            for name, type_name, *_ in cursor.fetchall():
                name = (name or "").strip()
                if not name or name.startswith("#"):
                    break  # partition information repeats the columns below this line
                if name.lower() not in seen:
                    seen.add(name.lower())
                    fields.append(pa.field(name, hive_type_to_arrow(type_name or "string")))
        return pa.schema(fields)

    def check_schema(self, query: HistoryQuery) -> None:
        with self._connect() as conn:
            schema = self._describe(conn, query.table)
        check_columns(query, schema, table_label=f"Hive table {query.table!r}")
        date_type = schema.field(_field_index(schema, query.date_column)).type
        if not (pa.types.is_date(date_type) or pa.types.is_string(date_type) or pa.types.is_timestamp(date_type)):
            raise SchemaMismatch(f"date column {query.date_column} is {date_type}", field="source")
        self._date_types[(query.table, query.date_column)] = pa.types.is_string(date_type)

    def _date_is_string(self, query: HistoryQuery) -> bool:
        key = (query.table, query.date_column)
        if key not in self._date_types:
            self.check_schema(query)
        return self._date_types[key]

    def _where(self, query: HistoryQuery) -> tuple[str, dict[str, Any]]:
        return where_clause(
            query, date_is_string=self._date_is_string(query), date_string_format=self._settings.date_string_format
        )

    def describe(self, query: HistoryQuery) -> str:
        where, _ = self._where(query)
        return select_sql(query, where=where)

    def count(self, query: HistoryQuery) -> int | None:
        if not self._settings.count_rows:
            return None
        where, params = self._where(query)
        sql = f"SELECT COUNT(*) FROM {quote(*check_table(query.table))} WHERE {where}"
        with self._connect() as conn, contextlib.closing(self._execute(conn, sql, params)) as cursor:
            row = cursor.fetchone()
        return int(row[0]) if row else 0

    def batches(self, query: HistoryQuery, *, batch_rows: int) -> Iterator[pa.RecordBatch]:
        _, params = self._where(query)
        sql = self.describe(query)
        with self._connect() as conn, contextlib.closing(self._execute(conn, sql, params)) as cursor:
            names = [d[0].split(".")[-1] for d in cursor.description]
            types = [d[1] for d in cursor.description]
            for columns in _prefetched(conn, cursor, batch_rows):
                arrays = [column_to_arrow(col, types[i]) for i, col in enumerate(columns)]
                batch = pa.RecordBatch.from_arrays(arrays, names=names)
                if batch.num_rows:
                    yield conform(_dates_as_dates(batch, query, self._date_is_string(query), self._settings), query)


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


def _prefetched(conn: Any, cursor: Any, rows: int) -> Iterator[list[Any]]:
    """Columns of each FetchResults block, fetched one block ahead on a background thread."""
    with prefetched(lambda: _fetch_blocks(conn, cursor, rows), depth=2, name="hive-fetch") as blocks:
        try:
            yield from blocks
        except Upstream:
            raise
        except Exception as exc:
            raise Upstream(f"reading from HiveServer2 failed: {_reason(exc)}") from exc


def _fetch_blocks(conn: Any, cursor: Any, rows: int) -> Iterator[list[Any]]:
    """Columns of each FetchResults block of the cursor's query, until an empty block."""
    from TCLIService import ttypes

    while True:
        req = ttypes.TFetchResultsReq(
            operationHandle=cursor._operationHandle,
            orientation=ttypes.TFetchOrientation.FETCH_NEXT,
            maxRows=rows,
        )
        resp = conn.client.FetchResults(req)
        if resp.status.statusCode not in (
            ttypes.TStatusCode.SUCCESS_STATUS,
            ttypes.TStatusCode.SUCCESS_WITH_INFO_STATUS,
        ):
            raise Upstream(f"HiveServer2 failed to fetch rows: {resp.status.errorMessage}")
        columns = resp.results.columns or []
        if not columns or not _column_length(columns[0]):
            return
        yield columns


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
    """A short, password-free description of a PyHive/thrift error."""
    status = getattr(getattr(exc, "args", [None])[0], "status", None)
    if status is not None and getattr(status, "errorMessage", None):
        return str(status.errorMessage).splitlines()[0][:500]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"


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
