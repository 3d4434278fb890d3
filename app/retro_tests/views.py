"""The public view of a job: built here, from one read path (service.read_retro_test / list_retro_tests, rows of
service.JOB_VIEW), for the API and the web pages alike."""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import Request

from app.config import get_settings
from app.core.jobs import TERMINAL_STATES, State
from app.core.periods import period_warnings
from app.core.records import StageTimeline
from app.i18n import N_, _, current_language
from app.retro_tests.schemas import RetroTestOut
from app.retro_tests.service import JobKey, JobRead, ViewRow, shown_files

API_PREFIX = "/api/v1/retro-tests"


def files_url(request: Request) -> str:
    """Where the API serves a job's result files: under RETRO_PUBLIC_BASE_URL, never the request's Host.

    `{files_url}/{job_id}/files/{name}` is the route download_result_file, without url_for's walk over every
    route of the app for each file of a page.
    """
    return f"{get_settings().public_base_url.rstrip('/')}{API_PREFIX}"


def job_url(job_id: uuid.UUID) -> str:
    """A job's address in the API (its Location), under RETRO_PUBLIC_BASE_URL."""
    return f"{get_settings().public_base_url.rstrip('/')}{API_PREFIX}/{job_id}"


# An absolute file-system path (two or more parts), or a file: URL: where things are on the server.
_SERVER_PATH = re.compile(r"(?:file://|(?<![\w.:/]))(?:/[\w.@+-]+){2,}/?")


def without_server_paths(message: str | None) -> str | None:
    """A job's error as people see it: the server's file paths replaced, as they tell an outsider its layout."""
    return _SERVER_PATH.sub("<server path>", message) if message else message


def _scrubbed(value: Any) -> Any:
    """value (a JSON record) with server paths taken out of every string in it."""
    if isinstance(value, str):
        return without_server_paths(value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    return value


def _as_is(value: Any) -> Any:
    return value


def job_view(read: JobRead, files_at: str, *, staff: bool = False) -> dict[str, Any]:
    """The public view of a job, RetroTestOut's fields, with stage durations and progress worked out.

    Where things are on the server (file: model URIs, the result folder, paths in records) only staff (admins)
    see; account managers get the rest (issue 26, N13).
    """
    job, files = read.job, read.files
    succeeded = job.state == State.succeeded
    starts = _starts(job)
    shown = _as_is if staff else _scrubbed
    return {
        "id": job.id,
        "partner_id": job.partner_id,
        "partner_code": job.partner_code,
        "model_name": job.model_name,
        "model_version": job.model_version,
        "requested_version": job.requested_version,
        "requested_alias": job.requested_alias,
        "model_run_id": job.model_run_id,
        "model_uri": shown(job.model_uri),
        "period_start": job.period_start,
        "period_end": job.period_end,
        "output_formats": job.output_formats,
        "source_table": job.source_table,
        "date_column": job.date_column,
        "id_columns": job.id_columns,
        "population": job.population.public() if job.population is not None else None,
        "note": job.note,
        "requested_by": job.requested_by,
        "state": job.state,
        "cancel_requested": job.cancel_requested,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "stages": _stages(job, starts),
        "score_protocol": job.score_protocol,
        "deployment_warm": job.deployment_warm,
        "environment": shown(job.environment.public()) if job.environment is not None else None,
        "validation": shown(job.validation.public()) if job.validation is not None else None,
        "progress": {
            "rows_total": job.rows_total,
            "rows_read": job.rows_read,
            "rows_scored": job.rows_scored,
            "rows_rejected": job.rows_rejected,
            "chunks_total": job.chunks_total,
            "chunks_done": job.chunks_done,
            "percent": 100.0 if succeeded else _percent(job),
            **_pace(job, starts, now=datetime.now(UTC)),
            "activity": activity(job.state),
        },
        "days_without_history": job.days_without_history,
        "warnings": period_warnings(job.days_without_history),
        "error": {"code": job.error_code, "message": without_server_paths(job.error_message)}
        if job.error_code
        else None,
        "result_location": job.result_location if succeeded and staff else None,
        "files": [_file_view(job, f, files_at) for f in files] if succeeded else [],
        "models": [_model_view(m, shown) for m in read.models] if read.models else None,
    }


def _model_view(model: ViewRow, shown: Any) -> dict[str, Any]:
    """One model of a comparing job, as ModelOut has it."""
    return {
        "position": model.position,
        "model_name": model.model_name,
        "model_version": model.model_version,
        "requested_version": model.requested_version,
        "requested_alias": model.requested_alias,
        "column_prefix": model.column_prefix,
        "score_protocol": model.score_protocol,
        "environment": shown(model.environment.public()) if model.environment is not None else None,
        "validation": shown(model.validation.public()) if model.validation is not None else None,
        "rows_scored": model.rows_scored,
        "rows_rejected": model.rows_rejected,
        "left_out": {"code": model.error_code, "message": without_server_paths(model.error_message)}
        if model.error_code
        else None,
    }


def _starts(job: ViewRow) -> list[tuple[str, datetime]]:
    """When the job entered each stage, in order, from its stage log (a job from before the log: its latest starts)."""
    timeline = StageTimeline(log=job.stage_log, started=job.stage_started)
    return [(state, datetime.fromisoformat(at)) for state, at in timeline.entries]


def _stages(job: ViewRow, starts: list[tuple[str, datetime]]) -> list[dict[str, Any]]:
    """The stages the job went through, in order, each with how long it took (the last one: so far, or None).

    A resumed job shows each pass ("attempt" 2 from the second `resolving` on)."""
    stages, attempt = [], 0
    for i, (state, at) in enumerate(starts):
        if state == State.resolving:
            attempt += 1
        end = starts[i + 1][1] if i + 1 < len(starts) else (job.finished_at if state not in TERMINAL_STATES else None)
        stages.append(
            {
                "state": state,
                "started_at": at,
                "seconds": round((end - at).total_seconds(), 3) if end else None,
                "attempt": max(attempt, 1),
            }
        )
    return stages


# What each stage is doing, in words a person follows ("deploying" at 0% for 15 s says nothing).
ACTIVITY: dict[str, str] = {
    State.queued: N_("waiting for a worker"),
    State.resolving: N_("looking the model version up in MLflow"),
    State.extracting: N_("counting the period's rows in the history source (a Hive query can take minutes)"),
    State.preparing_environment: N_("building the model's own Python environment (cached after the first job)"),
    State.deploying: N_("starting the model server"),
    State.validating: N_("checking the model on sample rows"),
    State.scoring: N_("reading history and scoring rows"),
    State.publishing: N_("writing results"),
    State.succeeded: N_("done"),
    State.failed: N_("stopped: see the error"),
    State.cancelled: N_("cancelled"),
}


def activity(state: str) -> str:
    """What a job in this state is doing, in words."""
    return _(ACTIVITY[state]) if state in ACTIVITY else state


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _latest(starts: list[tuple[str, datetime]], state: str) -> datetime | None:
    return next((at for entered, at in reversed(starts) if entered == state), None)


def _pace(job: ViewRow, starts: list[tuple[str, datetime]], *, now: datetime) -> dict[str, float | None]:
    """Elapsed seconds since submission, and once rows flow: rows per second while scoring and the time left."""
    end = _aware(job.finished_at) if job.finished_at is not None else now
    elapsed = max(0.0, (end - _aware(job.created_at)).total_seconds())
    pace: dict[str, float | None] = {"elapsed_s": round(elapsed, 1), "rows_per_s": None, "eta_s": None}
    scoring_at = _latest(starts, State.scoring.value)
    done = int(job.rows_scored) + int(job.rows_rejected)
    if scoring_at is None or done == 0:
        return pace
    publishing_at = _latest(starts, State.publishing.value)
    until = _aware(publishing_at) if publishing_at else end
    seconds = (until - _aware(scoring_at)).total_seconds()
    if seconds <= 0:
        return pace
    rate = done / seconds
    pace["rows_per_s"] = round(rate, 1)
    if job.state == State.scoring and job.rows_total:
        pace["eta_s"] = round(max(0, int(job.rows_total) - done) / rate, 1)
    return pace


def _percent(job: ViewRow) -> float | None:
    if not job.rows_total:
        return None
    return round(100.0 * (int(job.rows_scored) + int(job.rows_rejected)) / int(job.rows_total), 1)


def _file_view(job: ViewRow, file: ViewRow, files_at: str) -> dict[str, Any]:
    return {
        "name": file.name,
        "kind": file.kind,
        "format": file.format,
        "rows": file.rows,
        "bytes": file.bytes,
        "sha256": file.sha256,
        "download_url": f"{files_at}/{job.id}/files/{file.name}",
    }


def job_out(read: JobRead, files_at: str, *, staff: bool = False) -> RetroTestOut:
    """The public view of a job as a model, for the web pages' templates."""
    return RetroTestOut.model_validate(job_view(read, files_at, staff=staff))


def job_json(read: JobRead, files_at: str, *, staff: bool = False) -> bytes:
    """The public view of a job as the API answers it: RetroTestOut's JSON.

    Encoded straight from the view, without building the pydantic model first: for a page of 50 jobs the
    model's validation and serialization cost as much CPU as the views themselves (issue 32's API load). The view
    is held to RetroTestOut's schema by tests/test_view_json.py, which compares the two encodings for jobs in every
    shape. A job's view comes from KEPT_VIEWS once it was built (a running job's for a second).
    """
    return KEPT_VIEWS.encoded(read, files_at, staff=staff)


def page_json(
    keys: Sequence[JobKey], encoded: Mapping[uuid.UUID, bytes], *, total: int, limit: int, offset: int
) -> bytes:
    """A page of the list as the API answers it: RetroTestPage's JSON, of job_json's items in the order of keys.

    A job with no view in encoded was deleted after its key was read, and is left out.
    """
    items = b",".join(view for key in keys if (view := encoded.get(key.id)) is not None)
    return b'{"items":[%s],"total":%d,"limit":%d,"offset":%d}' % (items, total, limit, offset)


def _encoded(value: dict[str, Any]) -> bytes:
    # UTC as "Z", as pydantic writes it; orjson writes UUIDs, dates, datetimes and enums (by value) itself.
    return orjson.dumps(value, option=orjson.OPT_UTC_Z)


RUNNING_VIEW_S = 1.0  # how long a running job's view is kept (KeptViews)


class KeptViews:
    """The encoded views of jobs, the most recently used `size` of them (per API process).

    Most jobs a list page shows have ended, and an ended job's view stays as it is: its row changes only through
    an update, which moves `updated_at` (the column's onupdate), and its files only when retention deletes them.
    Both are in the key, with what else the view depends on: who sees it (staff see server paths) and the
    language (stage activity, warnings). A running job's view also changes with the clock (its elapsed time,
    pace and time left), so it is kept for RUNNING_VIEW_S only: pages and scripts polling a list of running jobs
    get one built at most that long ago. Building a view costs ~0.1 ms of CPU; a page of 50 was a third of the
    API's CPU under bench/api_load.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        # key -> (the encoded view, until when it holds: None for an ended job's)
        self._views: OrderedDict[tuple[Any, ...], tuple[bytes, float | None]] = OrderedDict()
        self._lock = threading.Lock()  # the endpoints run on several threads

    @staticmethod
    def _key(job: ViewRow | JobKey, files: tuple[str, ...], files_at: str, staff: bool) -> tuple[Any, ...]:
        return (job.id, job.updated_at, files, files_at, staff, current_language())

    def encoded(self, read: JobRead, files_at: str, *, staff: bool) -> bytes:
        job = read.job
        key = self._key(job, shown_files(job.state, (f.name for f in read.files)), files_at, staff)
        now = time.monotonic()
        with self._lock:
            kept = self._fresh(key, now)
        if kept is not None:
            return kept
        view = _encoded(job_view(read, files_at, staff=staff))
        ended = job.state in TERMINAL_STATES and job.finished_at is not None
        with self._lock:
            self._views[key] = (view, None if ended else now + RUNNING_VIEW_S)
            self._views.move_to_end(key)
            while len(self._views) > self.size:
                self._views.popitem(last=False)
        return view

    def kept(self, keys: Sequence[JobKey], files_at: str, *, staff: bool) -> dict[uuid.UUID, bytes]:
        """The kept views of the jobs of these keys (service.list_keys), by id: those built from the same row and
        files, and for a running job, not too long ago."""
        now, found = time.monotonic(), {}
        with self._lock:
            for job in keys:
                kept = self._fresh(self._key(job, job.files, files_at, staff), now)
                if kept is not None:
                    found[job.id] = kept
        return found

    def _fresh(self, key: tuple[Any, ...], now: float) -> bytes | None:
        """The view kept under key, if it still holds (an ended job's always); the caller holds the lock."""
        kept = self._views.get(key)
        if kept is None or (kept[1] is not None and now >= kept[1]):
            return None
        self._views.move_to_end(key)
        return kept[0]


KEPT_VIEWS = KeptViews(size=4096)  # ~3 KB each
