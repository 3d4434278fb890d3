"""Serving one recorded result file: name lookup (never a path from the request), byte ranges, safe headers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from fastapi.responses import Response, StreamingResponse

from app.core.jobs import ResultFile, RetroTest, State, job_prefix
from app.errors import NotFound
from app.i18n import _
from app.integrations.storage.results import STAFF_ONLY_KINDS, ResultStore

# A recorded name must be one plain file name; anything else is never opened, whatever the database says.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Slice:
    """The bytes one response carries: all of a file, or one range of it."""

    start: int
    length: int
    size: int
    partial: bool

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + self.length - 1}/{self.size}"


def find_result_file(job: RetroTest, name: str, *, partner: bool = False) -> ResultFile | None:
    """The succeeded job's recorded file with exactly this name, if it is a plain file name (and, for a partner's
    link, not a staff-only file)."""
    if job.state != State.succeeded:
        return None
    file = next((f for f in job.files if f.name == name), None)
    if file is None or not _PLAIN_NAME.fullmatch(file.name) or (partner and file.kind in STAFF_ONLY_KINDS):
        return None
    return file


def result_path(job: RetroTest, file: ResultFile) -> str:
    """Where the file is in the result store: always inside the job's own folder."""
    return f"{job_prefix(job)}/{file.name}"


# Any position past this lies beyond every file; Python refuses to read an int of over 4,300 digits.
_BEYOND_ANY_FILE = 10**18


def _position(digits: str) -> int:
    """A byte position of a Range header, however many digits it has."""
    return int(digits) if len(digits) < 18 else _BEYOND_ANY_FILE


def choose_slice(*, size: int, range_header: str | None, if_range: str | None, etag: str) -> Slice | None:
    """What to send for a Range header (RFC 9110): the whole file, one range, or None when unsatisfiable.

    A malformed header, several ranges or an If-Range that no longer matches get the whole file, as the RFC allows.
    """
    whole = Slice(start=0, length=size, size=size, partial=False)
    match = _RANGE.match(range_header or "")
    if match is None or (if_range is not None and if_range.strip() != etag):
        return whole
    first, last = match.groups()
    if first:
        start = _position(first)
        if last and _position(last) < start:
            return whole  # syntactically invalid: ignored
        if start >= size:
            return None
        end = min(_position(last), size - 1) if last else size - 1
    elif last:
        suffix = _position(last)
        if suffix == 0 or size == 0:
            return None
        start, end = max(0, size - suffix), size - 1
    else:
        return whole
    return Slice(start=start, length=end - start + 1, size=size, partial=True)


# frame-ancestors: no other site may frame the report (clickjacking); X-Frame-Options says the same to old browsers.
REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def attachment_header(name: str) -> str:
    """Content-Disposition with a name no browser can read as a path or a header trick."""
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download"
    return f'attachment; filename="{ascii_name}"'


def not_satisfiable(size: int, headers: dict[str, str]) -> Response:
    """416 with the size, so a client can ask again."""
    return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})


def stream_slice(*, fh: IO[Any], file: ResultFile, part: Slice, headers: dict[str, str]) -> StreamingResponse:
    """Stream part of an open result file, closing it at the end."""

    def chunks() -> Iterator[bytes]:
        with fh:
            fh.seek(part.start)
            remaining = part.length
            while remaining > 0:
                block = fh.read(min(_BLOCK, remaining))
                if not block:
                    break
                remaining -= len(block)
                yield block

    out = {
        **headers,
        "Content-Length": str(part.length),
        "Content-Disposition": attachment_header(file.name),
        "Accept-Ranges": "bytes",
        "ETag": etag_of(file),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    if part.partial:
        out["Content-Range"] = part.content_range
    media = "application/json" if file.format == "json" else "application/octet-stream"
    if file.kind == "report" and file.format == "html":
        # The report opens in the browser: inline, and allowed nothing but its own inline styles and SVG.
        media = "text/html; charset=utf-8"
        out["Content-Disposition"] = out["Content-Disposition"].replace("attachment", "inline", 1)
        out["Content-Security-Policy"] = REPORT_CSP
        out["X-Frame-Options"] = "DENY"
    return StreamingResponse(chunks(), status_code=206 if part.partial else 200, media_type=media, headers=out)


def etag_of(file: ResultFile) -> str:
    return f'"{file.sha256}"'


def open_result(store: ResultStore, job: RetroTest, file: ResultFile) -> IO[Any] | None:
    """The file opened for reading, or None when it is no longer in the store."""
    try:
        return store.open_read(result_path(job, file))
    except (FileNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class Download:
    """A result file ready to be sent: which file, which bytes of it, and the file opened at the store."""

    file: ResultFile
    part: Slice
    fh: IO[Any]


class RangeNotSatisfiable(Exception):
    """The Range asked for lies outside the file (answered 416)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the range asked for lies outside the file of {size} bytes")
        self.size = size


def open_download(
    *,
    store: ResultStore,
    job: RetroTest,
    name: str,
    range_header: str | None,
    if_range: str | None,
    partner: bool = False,
) -> Download:
    """The one way a result file is served, by the API and by partner links alike: found among the job's recorded
    files by name, the Range checked, the file opened. NotFound or RangeNotSatisfiable otherwise; the caller then
    records the download and streams it (stream_slice)."""
    file = find_result_file(job, name, partner=partner)
    if file is None:
        raise NotFound(_("retro test {id} has no result file {name}").format(id=job.id, name=repr(name)))
    part = choose_slice(size=file.bytes, range_header=range_header, if_range=if_range, etag=etag_of(file))
    if part is None:
        raise RangeNotSatisfiable(file.bytes)
    fh = open_result(store, job, file)
    if fh is None:
        raise NotFound(
            _("result file {name} of retro test {id} is no longer in the result store").format(
                name=repr(name), id=job.id
            )
        )
    return Download(file=file, part=part, fh=fh)
