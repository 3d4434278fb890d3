from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.actors import current_actor
from app.audit.service import record
from app.config import Settings, get_settings
from app.db import get_session
from app.errors import NotFound, Upstream
from app.integrations.registry import MlflowRegistry
from app.integrations.results import ResultStore
from app.integrations.wiring import get_registry, get_result_store
from app.retro_tests import service
from app.retro_tests.models import RetroTest, State
from app.retro_tests.schemas import (
    ProgressOut,
    ResultFileOut,
    RetroTestCreate,
    RetroTestOut,
    RetroTestPage,
    StageOut,
)
from app.validation import NO_CONTROL_PATTERN
from worker.celery_app import celery_app

router = APIRouter(prefix="/api/v1/retro-tests", tags=["retro tests"])

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


def to_out(job: RetroTest, request: Request) -> RetroTestOut:
    """The public view of a job, with stage durations and progress worked out."""
    starts = sorted(
        ((state, datetime.fromisoformat(at)) for state, at in (job.stage_started or {}).items()), key=lambda x: x[1]
    )
    stages = []
    for i, (state, at) in enumerate(starts):
        end = (
            starts[i + 1][1]
            if i + 1 < len(starts)
            else (job.finished_at if state not in ("succeeded", "failed", "cancelled") else None)
        )
        stages.append(
            StageOut(state=state, started_at=at, seconds=round((end - at).total_seconds(), 3) if end else None)
        )
    percent = None
    if job.rows_total:
        percent = round(100.0 * (job.rows_scored + job.rows_rejected) / job.rows_total, 1)
    if job.state == State.succeeded:
        percent = 100.0
    files = [
        ResultFileOut(
            name=f.name,
            kind=f.kind,
            format=f.format,
            rows=f.rows,
            bytes=f.bytes,
            sha256=f.sha256,
            download_url=str(request.url_for("download_result_file", job_id=job.id, name=f.name)),
        )
        for f in job.files
    ]
    return RetroTestOut(
        id=job.id,
        partner_id=job.partner_id,
        partner_code=job.partner.code,
        model_name=job.model_name,
        model_version=job.model_version,
        requested_version=job.requested_version,
        requested_alias=job.requested_alias,
        model_run_id=job.model_run_id,
        model_uri=job.model_uri,
        period_start=job.period_start,
        period_end=job.period_end,
        output_formats=list(job.output_formats),
        source_table=job.source_table,
        date_column=job.date_column,
        id_columns=list(job.id_columns),
        note=job.note,
        requested_by=job.requested_by,
        state=job.state,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        created_at=job.created_at,
        finished_at=job.finished_at,
        stages=stages,
        progress=ProgressOut(
            rows_total=job.rows_total,
            rows_read=job.rows_read,
            rows_scored=job.rows_scored,
            rows_rejected=job.rows_rejected,
            chunks_total=job.chunks_total,
            chunks_done=job.chunks_done,
            percent=percent,
        ),
        error={"code": job.error_code, "message": job.error_message} if job.error_code else None,
        result_location=job.result_location if job.state == State.succeeded else None,
        files=files if job.state == State.succeeded else [],
    )


def enqueue(job_id: uuid.UUID) -> None:
    """Send the job to the workers; called only after the row is committed."""
    celery_app.send_task("retrotest.run_retro_test", args=[str(job_id)])


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
    actor: Annotated[str, Depends(current_actor)],
) -> RetroTestOut:
    """Validate and queue a retro test. 202 with Location for a new job; 200 with the existing job for a duplicate."""
    job, created = service.create_retro_test(
        session=session, registry=registry, settings=settings, data=data, actor=actor
    )
    session.commit()
    if created:
        try:
            enqueue(job.id)
        except Exception as exc:
            service.fail_unqueued(session=session, job_id=job.id, reason=str(exc))
            session.commit()
            raise Upstream(f"the job queue is unavailable, the retro test was not started: {exc}") from exc
    else:
        response.status_code = 200
    response.headers["Location"] = str(request.url_for("get_retro_test", job_id=job.id))
    return to_out(service.get_retro_test(session=session, job_id=job.id), request)


@router.get("", response_model=RetroTestPage)
def list_retro_tests(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    partner: Annotated[str | None, Query(description="Partner code", max_length=64, pattern=NO_CONTROL_PATTERN)] = None,
    state: State | None = None,
    model: Annotated[
        str | None, Query(description="Registry model name", max_length=256, pattern=NO_CONTROL_PATTERN)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> RetroTestPage:
    """Retro tests, newest first, filtered by partner, state and model."""
    jobs, total = service.list_retro_tests(
        session=session, partner_code=partner, state=state, model_name=model, limit=limit, offset=offset
    )
    return RetroTestPage(items=[to_out(j, request) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=RetroTestOut, responses={404: ERRORS[404]})
def get_retro_test(
    job_id: uuid.UUID, request: Request, session: Annotated[Session, Depends(get_session)]
) -> RetroTestOut:
    """One retro test with its stages, progress, error and result files."""
    return to_out(service.get_retro_test(session=session, job_id=job_id), request)


@router.post(
    "/{job_id}/cancel", response_model=RetroTestOut, status_code=202, responses={404: ERRORS[404], 409: ERRORS[409]}
)
def cancel_retro_test(
    job_id: uuid.UUID,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    actor: Annotated[str, Depends(current_actor)],
) -> RetroTestOut:
    """Cancel a job. A queued job is cancelled at once; a running one stops within seconds and its model server is stopped."""
    service.request_cancel(session=session, job_id=job_id, actor=actor)
    session.commit()
    return to_out(service.get_retro_test(session=session, job_id=job_id), request)


@router.get(
    "/{job_id}/files/{name}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: ERRORS[404]},
)
def download_result_file(
    job_id: uuid.UUID,
    name: str,
    session: Annotated[Session, Depends(get_session)],
    store: Annotated[ResultStore, Depends(get_result_store)],
    actor: Annotated[str, Depends(current_actor)],
) -> StreamingResponse:
    """Stream one result file of a succeeded job."""
    job = service.get_retro_test(session=session, job_id=job_id)
    # The file name is looked up among the job's recorded files, never used as a path on its own.
    file = next((f for f in job.files if f.name == name), None)
    if job.state != State.succeeded or file is None:
        raise NotFound(f"retro test {job_id} has no result file {name!r}")
    rel = f"{service.job_prefix(job)}/{file.name}"
    try:
        fh = store.open_read(rel)
    except FileNotFoundError:
        raise NotFound(f"result file {name!r} of retro test {job_id} is no longer in the result store") from None

    def chunks() -> Iterator[bytes]:
        with fh:
            while block := fh.read(1 << 20):
                yield block

    record(
        session=session,
        actor=actor,
        action="result.download",
        subject_type="retro_test",
        subject_id=job.id,
        file=file.name,
    )
    session.commit()
    media = "application/json" if file.format == "json" else "application/octet-stream"
    return StreamingResponse(
        chunks(),
        media_type=media,
        headers={
            "Content-Length": str(file.bytes),
            "Content-Disposition": f'attachment; filename="{file.name}"',
            "Cache-Control": "no-store",
        },
    )
