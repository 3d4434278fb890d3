from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.deps import CurrentScope, CurrentUser, current_user
from app.config import Settings, get_settings
from app.db import get_session, release_connection
from app.downloads import files as result_files
from app.errors import NotFound
from app.integrations.registry import MlflowRegistry
from app.integrations.results import ResultStore
from app.integrations.wiring import get_registry, get_result_store
from app.retro_tests import dispatch, service
from app.retro_tests.models import TERMINAL_STATES, ResultFile, RetroTest, State
from app.retro_tests.schemas import (
    RetroTestCreate,
    RetroTestOut,
    RetroTestPage,
)
from app.validation import NO_CONTROL_PATTERN

router = APIRouter(prefix="/api/v1/retro-tests", tags=["retro tests"], dependencies=[Depends(current_user)])

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {
        "description": "Not found",
        "content": {"application/json": {"example": {"error": "not_found", "detail": "no retro test with id ..."}}},
    },
    409: {
        "description": "Conflict",
        "content": {
            "application/json": {
                "example": {
                    "error": "conflict",
                    "detail": "retro test ... is already succeeded and cannot be cancelled",
                }
            }
        },
    },
    422: {
        "description": "Invalid request",
        "content": {
            "application/json": {
                "example": {
                    "error": "period_too_long",
                    "detail": "the period covers 400 days; at most 366 are allowed in one retro test",
                    "field": "period_end",
                }
            }
        },
    },
    503: {
        "description": "An outside system is unavailable",
        "content": {
            "application/json": {
                "example": {"error": "upstream_unavailable", "detail": "the model registry is unreachable: ..."}
            }
        },
    },
}


def files_url(request: Request) -> str:
    """Where this router serves a job's result files, as seen by this request.

    `{files_url}/{job_id}/files/{name}` is what request.url_for("download_result_file", ...) gives, without
    url_for's walk over every route of the app for each file of a page.
    """
    return f"{str(request.base_url).rstrip('/')}{router.prefix}"


def json_response(model: BaseModel) -> Response:
    """The model as JSON, serialized once and here.

    Returned as a model instead, FastAPI would validate it a second time, then serialize it on another trip to
    the threadpool.
    """
    return Response(model.model_dump_json(), media_type="application/json")


# A job as its public view reads it: a RetroTest (partner and files loaded) or a row of service.JOB_VIEW; a
# result file: a ResultFile or a row of service.FILE_VIEW. Both read the same, by attribute.
JobFields = RetroTest | service.ViewRow
FileFields = ResultFile | service.ViewRow


def job_view(job: JobFields, files: Iterable[FileFields], files_at: str) -> dict[str, Any]:
    """The public view of a job, RetroTestOut's fields, with stage durations and progress worked out."""
    succeeded = job.state == State.succeeded
    return {
        "id": job.id,
        "partner_id": job.partner_id,
        "partner_code": job.partner_code,
        "model_name": job.model_name,
        "model_version": job.model_version,
        "requested_version": job.requested_version,
        "requested_alias": job.requested_alias,
        "model_run_id": job.model_run_id,
        "model_uri": job.model_uri,
        "period_start": job.period_start,
        "period_end": job.period_end,
        "output_formats": job.output_formats,
        "source_table": job.source_table,
        "date_column": job.date_column,
        "id_columns": job.id_columns,
        "note": job.note,
        "requested_by": job.requested_by,
        "state": job.state,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "stages": _stages(job),
        "score_protocol": job.score_protocol,
        "progress": {
            "rows_total": job.rows_total,
            "rows_read": job.rows_read,
            "rows_scored": job.rows_scored,
            "rows_rejected": job.rows_rejected,
            "chunks_total": job.chunks_total,
            "chunks_done": job.chunks_done,
            "percent": 100.0 if succeeded else _percent(job),
        },
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "result_location": job.result_location if succeeded else None,
        "files": [_file_view(job, f, files_at) for f in files] if succeeded else [],
    }


def _stages(job: JobFields) -> list[dict[str, Any]]:
    """The stages the job went through, in order, each with how long it took (the last one: so far, or None)."""
    starts = sorted(
        ((state, datetime.fromisoformat(at)) for state, at in (job.stage_started or {}).items()), key=lambda x: x[1]
    )
    stages = []
    for i, (state, at) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else (job.finished_at if state not in TERMINAL_STATES else None)
        stages.append(
            {"state": state, "started_at": at, "seconds": round((end - at).total_seconds(), 3) if end else None}
        )
    return stages


def _percent(job: JobFields) -> float | None:
    if not job.rows_total:
        return None
    return round(100.0 * (job.rows_scored + job.rows_rejected) / job.rows_total, 1)


def _file_view(job: JobFields, file: FileFields, files_at: str) -> dict[str, Any]:
    return {
        "name": file.name,
        "kind": file.kind,
        "format": file.format,
        "rows": file.rows,
        "bytes": file.bytes,
        "sha256": file.sha256,
        "download_url": f"{files_at}/{job.id}/files/{file.name}",
    }


def to_out(job: RetroTest, request: Request) -> RetroTestOut:
    """The public view of a job loaded as an ORM object, with its partner and files."""
    return RetroTestOut.model_validate(job_view(job, job.files, files_url(request)))


def read_out(read: service.JobRead, files_at: str) -> RetroTestOut:
    """The public view of a job read as rows (service.read_retro_test, service.list_retro_tests)."""
    return RetroTestOut.model_validate(job_view(read.job, read.files, files_at))


@router.post(
    "",
    status_code=202,
    response_model=RetroTestOut,
    responses={
        200: {"description": "An identical request is already active; that job is returned", "model": RetroTestOut},
        **ERRORS,
    },
)
def create_retro_test(
    data: RetroTestCreate,
    request: Request,
    response: Response,
    session: Annotated[Session, Depends(get_session)],
    registry: Annotated[MlflowRegistry, Depends(get_registry)],
    settings: Annotated[Settings, Depends(get_settings)],
    user: CurrentUser,
    scope: CurrentScope,
) -> RetroTestOut:
    """Validate and queue a retro test. 202 with Location for a new job; 200 with the existing job for a duplicate.

    Account managers may only name partners they are assigned to.
    """
    job, created = dispatch.submit(
        session=session, registry=registry, settings=settings, data=data, actor=user.username, scope=scope
    )
    if not created:
        response.status_code = 200
    response.headers["Location"] = str(request.url_for("get_retro_test", job_id=job.id))
    return to_out(service.get_retro_test(session=session, job_id=job.id, scope=scope), request)


@router.get("", response_model=RetroTestPage)
def list_retro_tests(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    scope: CurrentScope,
    partner: Annotated[str | None, Query(description="Partner code", max_length=64, pattern=NO_CONTROL_PATTERN)] = None,
    state: State | None = None,
    model: Annotated[
        str | None, Query(description="Registry model name", max_length=256, pattern=NO_CONTROL_PATTERN)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> Response:
    """Retro tests of the caller's partners, newest first, filtered by partner, state and model."""
    jobs, total = service.list_retro_tests(
        session=session, scope=scope, partner_code=partner, state=state, model_name=model, limit=limit, offset=offset
    )
    release_connection(session)
    files_at = files_url(request)
    items = [job_view(j.job, j.files, files_at) for j in jobs]
    return json_response(
        RetroTestPage.model_validate({"items": items, "total": total, "limit": limit, "offset": offset})
    )


@router.get("/{job_id}", response_model=RetroTestOut, responses={404: ERRORS[404]})
def get_retro_test(
    job_id: uuid.UUID, request: Request, session: Annotated[Session, Depends(get_session)], scope: CurrentScope
) -> Response:
    """One retro test with its stages, progress, error and result files."""
    job = service.read_retro_test(session=session, job_id=job_id, scope=scope)
    release_connection(session)
    return json_response(read_out(job, files_url(request)))


@router.post(
    "/{job_id}/cancel", response_model=RetroTestOut, status_code=202, responses={404: ERRORS[404], 409: ERRORS[409]}
)
def cancel_retro_test(
    job_id: uuid.UUID,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    user: CurrentUser,
    scope: CurrentScope,
) -> RetroTestOut:
    """Cancel a job. A queued job is cancelled at once; a running one stops within seconds and its model server is stopped."""
    service.request_cancel(session=session, job_id=job_id, actor=user.username, scope=scope)
    session.commit()
    return to_out(service.get_retro_test(session=session, job_id=job_id, scope=scope), request)


@router.get(
    "/{job_id}/files/{name}",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "The byte range asked for with a Range header"},
        404: ERRORS[404],
        416: {"description": "The Range asked for lies outside the file"},
    },
)
def download_result_file(
    job_id: uuid.UUID,
    name: Annotated[str, Path(max_length=256)],
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    store: Annotated[ResultStore, Depends(get_result_store)],
    user: CurrentUser,
    scope: CurrentScope,
) -> Response:
    """Stream one result file of a succeeded job, whole or one byte range (Range: bytes=...)."""
    job = service.get_retro_test(session=session, job_id=job_id, scope=scope)
    # The file name is looked up among the job's recorded files, never used as a path on its own.
    file = result_files.find_result_file(job, name)
    if file is None:
        raise NotFound(f"retro test {job_id} has no result file {name!r}")
    part = result_files.choose_slice(
        size=file.bytes,
        range_header=request.headers.get("range"),
        if_range=request.headers.get("if-range"),
        etag=result_files.etag_of(file),
    )
    if part is None:
        return result_files.not_satisfiable(file.bytes, {"Cache-Control": "no-store"})
    fh = result_files.open_result(store, job, file)
    if fh is None:
        raise NotFound(f"result file {name!r} of retro test {job_id} is no longer in the result store")
    record(
        session=session,
        actor=user.username,
        action="result.download",
        subject_type="retro_test",
        subject_id=job.id,
        file=file.name,
        bytes=part.length,
    )
    session.commit()
    return result_files.stream_slice(fh=fh, file=file, part=part, headers={})
