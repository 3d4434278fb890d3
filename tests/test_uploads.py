"""Issue 26, bounded uploads: an upload route reads its body only after authentication and CSRF; a population's
rows are limited (RETRO_POPULATION_MAX_ROWS) before they are held; ids of the wrong kind are a 422, never a 500."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_partner
from tests.test_population import POP_START, csv_bytes, population_frame, request_json

API_UPLOAD = "/api/v1/retro-tests/with-population"
_CHUNK = 64 * 1024
_BOUNDARY = b"upload-test-boundary"


def multipart_stream(total: int) -> Iterator[bytes]:
    """A well-formed multipart body of about `total` bytes: one population file part of 'x's."""
    head = (
        b"--" + _BOUNDARY + b'\r\nContent-Disposition: form-data; name="population"; filename="p.csv"\r\n'
        b"Content-Type: text/csv\r\n\r\n"
    )
    yield head
    sent = len(head)
    while sent < total:
        yield b"x" * _CHUNK
        sent += _CHUNK
    yield b"\r\n--" + _BOUNDARY + b"--\r\n"


def form_stream(total: int) -> Iterator[bytes]:
    """`a=&a=&...`: the urlencoded form of many empty fields that froze /health (N1)."""
    piece = b"a=&" * (_CHUNK // 3)
    for _ in range(total // len(piece) + 1):
        yield piece


def bytes_read(app: Any, *, path: str, content_type: bytes, body: Iterator[bytes], total: int) -> tuple[int, int]:
    """POST body to the ASGI app by hand, without credentials; (status, bytes of the body the app asked for)."""
    read, status = 0, 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        piece = next(body, b"")
        read += len(piece)
        return {"type": "http.request", "body": piece, "more_body": bool(piece)}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", content_type),
            (b"content-length", str(total).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status, read


@pytest.mark.parametrize("path", [API_UPLOAD, "/jobs/new"])
def test_an_anonymous_upload_is_refused_before_its_body_is_read(client, path: str) -> None:  # type: ignore[no-untyped-def]
    """N1: a 60 MB multipart body without credentials is answered having read at most the small body limit."""
    total = 60 * 10**6
    status, read = bytes_read(
        client.app,
        path=path,
        content_type=b"multipart/form-data; boundary=" + _BOUNDARY,
        body=multipart_stream(total),
        total=total,
    )
    assert status in (401, 403, 413), status
    assert read <= 2 * 64 * 1024 + 1024, f"{path} read {read:,} bytes of an anonymous body"


def test_an_anonymous_form_of_many_fields_is_not_parsed(client) -> None:  # type: ignore[no-untyped-def]
    """N1: 8 MB of `a=&a=&...` to the new-job form without a session is refused within the small limit."""
    total = 8 * 10**6
    status, read = bytes_read(
        client.app,
        path="/jobs/new",
        content_type=b"application/x-www-form-urlencoded",
        body=form_stream(total),
        total=total,
    )
    assert status in (401, 403, 413), status
    assert read <= 2 * 64 * 1024 + 1024, f"read {read:,} bytes of an anonymous form"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def post_population(client, partner: str, name: str, data: bytes):  # type: ignore[no-untyped-def]
    return client.post(
        API_UPLOAD,
        data={"request": request_json(partner)},
        files={"population": (name, data, "application/octet-stream")},
    )


def test_rows_past_the_limit_are_refused_naming_the_setting(client) -> None:  # type: ignore[no-untyped-def]
    """N2: a population of more rows than RETRO_POPULATION_MAX_ROWS is a 413 naming it, CSV and Parquet alike."""
    from app.config import Settings, get_settings

    make_partner(client, "rows-big")
    frame = population_frame(101)
    client.app.dependency_overrides[get_settings] = lambda: Settings(population_max_rows=100)
    try:
        answers = [
            post_population(client, "rows-big", "p.csv", csv_bytes(frame)),
            post_population(client, "rows-big", "p.parquet", parquet_bytes(pa.Table.from_pandas(frame))),
        ]
    finally:
        del client.app.dependency_overrides[get_settings]
    for resp in answers:
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"] == "population_too_large", resp.text
        assert "RETRO_POPULATION_MAX_ROWS" in resp.json()["detail"], resp.text
    assert client.get("/api/v1/retro-tests", params={"partner": "rows-big"}).json()["total"] == 0


def tiny_parquet_of(rows: int) -> bytes:
    """A file of `rows` identical rows, a few hundred KB: run-length encoding makes the rows cheap on disk."""
    ids = pa.repeat(pa.scalar(1, pa.int64()), rows) if hasattr(pa, "repeat") else pa.array(np.ones(rows, "int64"))
    days = pa.array(np.full(rows, np.datetime64(POP_START, "D"))).cast(pa.date32())
    return parquet_bytes(pa.table({"customer_id": ids, "as_of": days}))


def test_a_25m_row_parquet_is_refused_from_its_footer(client) -> None:  # type: ignore[no-untyped-def]
    """N2: the footer's row count refuses the file before any of its 25M rows is read."""
    make_partner(client, "rows-25m")
    data = tiny_parquet_of(25_000_000)
    assert len(data) < 5 * 2**20
    resp = post_population(client, "rows-25m", "p.parquet", data)
    assert resp.status_code == 413 and "RETRO_POPULATION_MAX_ROWS" in resp.json()["detail"], resp.text


def ids_file(ids: pa.Array) -> bytes:
    days = pa.array(np.full(len(ids), np.datetime64(POP_START, "D"))).cast(pa.date32())
    return parquet_bytes(pa.table({"customer_id": ids, "as_of": days}))


BAD_IDS = {
    "binary": ("p.parquet", ids_file(pa.array([b"\x00\x01", b"\x02"], pa.binary())), "binary"),
    "nested": ("p.parquet", ids_file(pa.array([[1], [2]], pa.list_(pa.int64()))), "list"),
    "inf": ("p.parquet", ids_file(pa.array([1.0, float("inf")])), "whole numbers"),
    "overflow": ("p.parquet", ids_file(pa.array([1, 2**64 - 1], pa.uint64())), "64-bit"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_ids_of_the_wrong_kind_are_a_422_naming_the_column(client, case: str) -> None:  # type: ignore[no-untyped-def]
    """N12: inf, binary, nested and overflowing ids are refused with a 422 naming the column, never a 500."""
    make_partner(client, f"ids-{case}")
    name, data, says = BAD_IDS[case]
    resp = post_population(client, f"ids-{case}", name, data)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert resp.json()["error"] == "invalid_population" and "customer_id" in detail and says in detail, detail
