from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile as StarletteUpload

from app.audit.service import record
from app.auth.deps import CurrentCaller, CurrentScope, CurrentUser, current_user
from app.config import Settings, get_settings
from app.core.jobs import State
from app.core.jobs import get_retro_test as load_retro_test  # this module's get_retro_test is the route
from app.db import get_session, release_connection
from app.downloads import files as result_files
from app.errors import Invalid
from app.i18n import _
from app.integrations.registry.mlflow import MlflowRegistry
from app.integrations.storage.results import ResultStore
from app.integrations.wiring import get_history_source, get_registry, get_result_store
from app.request_guard import allow_upload
from app.retro_tests import dispatch, live, service, views
from app.retro_tests.population import PopulationUpload, read_upload
from app.retro_tests.schemas import (
    JobFilters,
    RetroTestCreate,
    RetroTestOut,
    RetroTestPage,
)
from app.validation import NO_CONTROL_PATTERN, QueryInt

router = APIRouter(prefix=views.API_PREFIX, tags=["retro tests"], dependencies=[Depends(current_user)])

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


def json_response(body: bytes) -> Response:
    """A view already encoded (views.job_json, views.page_json).

    Returned as a model instead, FastAPI would validate it a second time, then serialize it on another trip to
    the threadpool.
    """
    return Response(body, media_type="application/json")


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
    session: Annotated[Session, Depends(get_session)],
    registry: Annotated[MlflowRegistry, Depends(get_registry)],
    settings: Annotated[Settings, Depends(get_settings)],
    caller: CurrentCaller,
) -> Response:
    """Validate and queue a retro test. 202 with Location for a new job; 200 with the existing job for a duplicate.

    Account managers may only name partners they are assigned to.
    """
    job_request = service.RetroTestRequest(data=data, actor=caller.user.username, scope=caller.scope)
    return submit(request=request, session=session, registry=registry, settings=settings, job_request=job_request)


POPULATION_REQUEST_DOC = (
    "The request as JSON (the fields of RetroTestCreate: partner_code, model_name, model_version or model_alias, "
    "period_start, period_end, lookback_days, as_of_column, outcome_column, ...)"
)


POPULATION_FILE_DOC = (
    "CSV (UTF-8, header line) or Parquet: the model's id column(s), the as-of date column (YYYY-MM-DD, inside the "
    "period), optionally a 0/1 outcome column; one row per (id, as-of date)"
)
# The multipart body, described by hand: the route reads it itself, after authentication (see population_form).
POPULATION_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["request", "population"],
                "properties": {
                    "request": {"type": "string", "description": POPULATION_REQUEST_DOC},
                    "population": {
                        "type": "string",
                        "contentMediaType": "application/octet-stream",
                        "description": POPULATION_FILE_DOC,
                    },
                },
            }
        }
    },
}


@dataclass(frozen=True)
class PopulationForm:
    """The multipart request's two parts: the request's JSON and the population file."""

    request_json: str
    population: StarletteUpload


async def population_form(request: Request, _user: CurrentUser) -> AsyncIterator[PopulationForm]:
    """The body, read only now that the caller is known (FastAPI reads declared Form/File fields before any
    dependency, so the route declares none): an anonymous caller never gets past RETRO_MAX_BODY_BYTES."""
    allow_upload(request.scope)
    form = await request.form(max_files=1, max_fields=4)
    try:
        request_json, population = form.get("request"), form.get("population")
        if not isinstance(request_json, str):
            raise Invalid(_("send the request's JSON as the multipart field `request`"), field="request")
        if not isinstance(population, StarletteUpload):
            raise Invalid(_("send the population file as the multipart file field `population`"), field="population")
        yield PopulationForm(request_json=request_json, population=population)
    finally:
        await form.close()


@router.post(
    "/with-population",
    status_code=202,
    response_model=RetroTestOut,
    responses={
        200: {"description": "An identical request is already active; that job is returned", "model": RetroTestOut},
        413: {
            "description": "The population file is larger than RETRO_POPULATION_MAX_BYTES or has more rows than "
            "RETRO_POPULATION_MAX_ROWS",
            "content": {"application/json": {"example": {"error": "population_too_large", "detail": "..."}}},
        },
        **ERRORS,
    },
    openapi_extra={"requestBody": POPULATION_BODY},
)
def create_retro_test_with_population(
    caller: CurrentCaller,
    form: Annotated[PopulationForm, Depends(population_form)],
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    registry: Annotated[MlflowRegistry, Depends(get_registry)],
    store: Annotated[ResultStore, Depends(get_result_store)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Response:
    """Validate and queue a retro test of the partner's own population (multipart/form-data), scored as of its dates.

    Each population row gets its id's feature row on its as-of date, or with lookback_days the latest snapshot on
    or before it within that many days; rows without history are listed in unmatched.csv.gz. The file is checked
    whole before anything is queued (columns, id types, dates, period, duplicates, size, rows, UTF-8): a refusal is
    a 4xx naming the column and first bad lines, and no job is created.
    """
    data = parse_request_json(form.request_json)
    upload = PopulationUpload(
        data=read_upload(form.population.file, limit=settings.population_max_bytes),
        filename=form.population.filename or "",
    )
    job_request = service.RetroTestRequest(data=data, actor=caller.user.username, scope=caller.scope, upload=upload)
    return submit(
        request=request, session=session, registry=registry, settings=settings, job_request=job_request, store=store
    )


def parse_request_json(text: str) -> RetroTestCreate:
    """The multipart request's JSON part, as a RetroTestCreate; a 422 naming the field otherwise."""
    try:
        return RetroTestCreate.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "request"
        raise Invalid(_("request: {field}: {msg}").format(field=field, msg=first["msg"]), field=field) from exc


def submit(
    *,
    request: Request,
    session: Session,
    registry: MlflowRegistry,
    settings: Settings,
    job_request: service.RetroTestRequest,
    store: ResultStore | None = None,
) -> Response:
    """Queue the request; 202 with Location for a new job, 200 with the existing job for a duplicate."""
    job, created = dispatch.submit(
        session=session,
        registry=registry,
        settings=settings,
        request=job_request,
        history=get_history_source(),
        store=store,
    )
    scope = job_request.scope
    read = service.read_retro_test(session=session, job_id=job.id, scope=scope)
    response = json_response(views.job_json(read, views.files_url(request), staff=scope.everything))
    response.status_code = 202 if created else 200
    response.headers["Location"] = views.job_url(job.id)
    return response


async def job_filters(
    partner: Annotated[str | None, Query(description="Partner code", max_length=64, pattern=NO_CONTROL_PATTERN)] = None,
    state: State | None = None,
    model: Annotated[
        str | None, Query(description="Registry model name", max_length=256, pattern=NO_CONTROL_PATTERN)
    ] = None,
    id_prefix: Annotated[
        str | None,
        Query(
            description="The start of the id (8 to 36 characters), as the pages show it",
            pattern=r"^[0-9a-fA-F-]{8,36}$",
        ),
    ] = None,
    limit: Annotated[QueryInt, Query(ge=1, le=200)] = 50,
    offset: Annotated[QueryInt, Query(ge=0, le=1_000_000_000)] = 0,
) -> JobFilters:
    """The list's query parameters (async: it does no I/O, and a sync dependency would cost a thread switch)."""
    return JobFilters(partner=partner, state=state, model=model, id_prefix=id_prefix, limit=limit, offset=offset)


@router.get("", response_model=RetroTestPage)
def list_retro_tests(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    scope: CurrentScope,
    filters: Annotated[JobFilters, Depends(job_filters)],
) -> Response:
    """Retro tests of the caller's partners, newest first, filtered by partner, state and model."""
    keys, total = service.list_keys(session=session, scope=scope, filters=filters)
    files_at, staff = views.files_url(request), scope.everything
    encoded = views.KEPT_VIEWS.kept(keys, files_at, staff=staff)  # most of a page: then only its keys were read
    missing = [key.id for key in keys if key.id not in encoded]
    reads = service.read_listed(session=session, scope=scope, filters=filters, job_ids=missing)
    release_connection(session)
    encoded.update(
        {job_id: views.job_json(reads[job_id], files_at, staff=staff) for job_id in missing if job_id in reads}
    )
    return json_response(views.page_json(keys, encoded, total=total, limit=filters.limit, offset=filters.offset))


@router.get("/{job_id}", response_model=RetroTestOut, responses={404: ERRORS[404]})
def get_retro_test(
    job_id: uuid.UUID, request: Request, session: Annotated[Session, Depends(get_session)], scope: CurrentScope
) -> Response:
    """One retro test with its stages, progress, error and result files."""
    files_at, staff = views.files_url(request), scope.everything
    key = service.read_key(session=session, job_id=job_id, scope=scope)
    encoded = views.KEPT_VIEWS.kept([key], files_at, staff=staff).get(job_id)  # then only its key was read
    if encoded is None:
        encoded = views.job_json(
            service.read_retro_test(session=session, job_id=job_id, scope=scope), files_at, staff=staff
        )
    release_connection(session)
    return json_response(encoded)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: ERRORS[404]},
)
def job_events(
    job_id: uuid.UUID, request: Request, session: Annotated[Session, Depends(get_session)], scope: CurrentScope
) -> Response:
    """Server-sent events: the job as GET /{id} answers it, now and on every change (checked once a second), then
    `end` when it has ended. The job page listens to it instead of polling; the same 404 as GET /{id} for a job
    that is not the caller's."""
    read = service.read_retro_test(session=session, job_id=job_id, scope=scope)
    release_connection(session)
    return live.event_stream(read, staff=scope.everything, files_at=views.files_url(request))


@router.post(
    "/{job_id}/cancel", response_model=RetroTestOut, status_code=202, responses={404: ERRORS[404], 409: ERRORS[409]}
)
def cancel_retro_test(
    job_id: uuid.UUID,
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    user: CurrentUser,
    scope: CurrentScope,
) -> Response:
    """Cancel a job. A queued job is cancelled at once; a running one stops within seconds and its model server is stopped."""
    service.request_cancel(session=session, job_id=job_id, actor=user.username, scope=scope)
    session.commit()
    read = service.read_retro_test(session=session, job_id=job_id, scope=scope)
    release_connection(session)
    response = json_response(views.job_json(read, views.files_url(request), staff=scope.everything))
    response.status_code = 202
    return response


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
    caller: CurrentCaller,
) -> Response:
    """Stream one result file of a succeeded job, whole or one byte range (Range: bytes=...)."""
    job = load_retro_test(session=session, job_id=job_id, scope=caller.scope)
    # Opening the file is a network call with an s3:// store: no connection is held across it.
    release_connection(session)
    try:
        # The file name is looked up among the job's recorded files, never used as a path on its own.
        download = result_files.open_download(
            store=store,
            job=job,
            name=name,
            range_header=request.headers.get("range"),
            if_range=request.headers.get("if-range"),
        )
    except result_files.RangeNotSatisfiable as exc:
        return result_files.not_satisfiable(exc.size, {"Cache-Control": "no-store"})
    record(
        session=session,
        actor=caller.user.username,
        action="result.download",
        subject_type="retro_test",
        subject_id=job.id,
        file=download.file.name,
        bytes=download.part.length,
    )
    session.commit()
    return result_files.stream_slice(fh=download.fh, file=download.file, part=download.part, headers={})
