"""The public view of a job: built here, from one read path (service.read_retro_test / list_retro_tests, rows of
service.JOB_VIEW), for the API and the web pages alike."""

from __future__ import annotations

import re
import threading
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
            **_Clock(job, starts).pace(_now()),
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


def _now() -> datetime:
    return datetime.now(UTC)


def _latest(starts: list[tuple[str, datetime]], state: str) -> datetime | None:
    return next((at for entered, at in reversed(starts) if entered == state), None)


class _Clock:
    """What a job's elapsed time, pace and time left are worked out from: the rest of its view does not change
    with the clock. Slots of plain values only, so that a kept one is one object to Python's garbage collector."""

    __slots__ = ("created_at", "done", "finished_at", "rows_left", "scoring_at", "until")

    def __init__(self, job: ViewRow, starts: list[tuple[str, datetime]]) -> None:
        scoring_at, publishing_at = _latest(starts, State.scoring.value), _latest(starts, State.publishing.value)
        self.created_at = _aware(job.created_at)
        self.finished_at = _aware(job.finished_at) if job.finished_at is not None else None
        self.scoring_at = _aware(scoring_at) if scoring_at is not None else None
        self.until = _aware(publishing_at) if publishing_at is not None else self.finished_at  # None: now
        self.done = int(job.rows_scored) + int(job.rows_rejected)
        scoring = job.state == State.scoring and job.rows_total
        self.rows_left = max(0, int(job.rows_total) - self.done) if scoring else None

    def pace(self, now: datetime) -> dict[str, float | None]:
        """Elapsed seconds since submission, and once rows flow: rows per second while scoring and the time left."""
        elapsed = max(0.0, ((self.finished_at or now) - self.created_at).total_seconds())
        pace: dict[str, float | None] = {"elapsed_s": round(elapsed, 1), "rows_per_s": None, "eta_s": None}
        if self.scoring_at is None or self.done == 0:
            return pace
        seconds = ((self.until or now) - self.scoring_at).total_seconds()
        if seconds <= 0:
            return pace
        rate = self.done / seconds
        pace["rows_per_s"] = round(rate, 1)
        if self.rows_left is not None:
            pace["eta_s"] = round(self.rows_left / rate, 1)
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
    shape. A job's view comes from KEPT_VIEWS once it was built.
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


class _Running:
    """A running job's kept view: its JSON split where its clock's fields go, and what they are worked out from."""

    __slots__ = ("after", "before", "clock")

    def __init__(self, view: dict[str, Any], clock: _Clock) -> None:
        progress = {k: v for k, v in view["progress"].items() if k not in ("rows_per_s", "eta_s")}
        progress["elapsed_s"] = _CLOCK_MARK  # where the three go: a string that no view's JSON otherwise holds
        self.before, self.after = _encoded({**view, "progress": progress}).split(_CLOCK_MARKED, 1)
        self.clock = clock

    def now(self) -> bytes:
        pace = self.clock.pace(_now())
        fields = b'"elapsed_s":%b,"rows_per_s":%b,"eta_s":%b' % tuple(orjson.dumps(v) for v in pace.values())
        return self.before + fields + self.after


# A private-use character as a whole JSON value: a string in a view that held it would have its quotes escaped.
_CLOCK_MARK = "\ue000"
_CLOCK_MARKED = b'"elapsed_s":"' + _CLOCK_MARK.encode() + b'"'
# What an entry costs beyond its JSON: its key and the dict's slot (~230 bytes by tracemalloc, with the id, time
# and file names of the key as read from the database).
_ENTRY_BYTES = 600


class KeptViews:
    """The encoded views of jobs, the most recently used of them up to RETRO_API_VIEW_CACHE_MB (per API process).

    A view changes only with its job's row, its result files, who reads it and the language: a row changes only
    through an update, which moves `updated_at` (the column's onupdate), and files only when retention deletes
    them. All of that is the key (service.JobKey), so a kept view is the view of the row as it is now. An ended
    job's view is kept as its JSON. A running job's also changes with the clock (elapsed time, pace, time left):
    it is kept as _Running, and those three are worked out again on every read (a few microseconds; building a
    view from its row costs ~0.1 ms and reading the row more).

    Keys and entries hold plain values (bytes, ints, times, strings) and a running job's entry two objects: a
    cache of containers would make every full collection of Python's garbage collector walk them, and under
    bench/api_load those collections stopped a process for 12-57 ms each, several times a minute.
    """

    def __init__(self) -> None:
        self._views: OrderedDict[tuple[Any, ...], bytes | _Running] = OrderedDict()
        self._bytes = 0  # what the kept entries cost, by _size
        self._lock = threading.Lock()  # the endpoints run on several threads

    @staticmethod
    def _key(job: ViewRow | JobKey, files: tuple[str, ...], files_at: str, staff: bool) -> tuple[Any, ...]:
        return (job.id.int, job.updated_at, files, files_at, staff, current_language())

    @staticmethod
    def _size(kept: bytes | _Running) -> int:
        held = len(kept) if isinstance(kept, bytes) else len(kept.before) + len(kept.after) + 200  # and its _Clock
        return held + _ENTRY_BYTES

    def encoded(self, read: JobRead, files_at: str, *, staff: bool) -> bytes:
        job = read.job
        key = self._key(job, shown_files(job.state, (f.name for f in read.files)), files_at, staff)
        with self._lock:
            kept = self._kept(key)
        if kept is not None:
            return _now_of(kept)
        view = job_view(read, files_at, staff=staff)
        encoded = _encoded(view)
        ended = job.state in TERMINAL_STATES and job.finished_at is not None
        self._keep(key, encoded if ended else _Running(view, _Clock(job, _starts(job))))
        return encoded

    def kept(self, keys: Sequence[JobKey], files_at: str, *, staff: bool) -> dict[uuid.UUID, bytes]:
        """The kept views of the jobs of these keys (service.list_keys, service.read_key), by id."""
        with self._lock:
            found = {job.id: kept for job in keys if (kept := self._kept(self._key(job, job.files, files_at, staff)))}
        return {job_id: _now_of(kept) for job_id, kept in found.items()}

    def _kept(self, key: tuple[Any, ...]) -> bytes | _Running | None:
        """The entry kept under key, now the most recently used; the caller holds the lock."""
        kept = self._views.get(key)
        if kept is not None:
            self._views.move_to_end(key)
        return kept

    def _keep(self, key: tuple[Any, ...], kept: bytes | _Running) -> None:
        limit = get_settings().api_view_cache_mb << 20
        with self._lock:
            if (old := self._views.pop(key, None)) is not None:
                self._bytes -= self._size(old)
            self._views[key] = kept
            self._bytes += self._size(kept)
            while self._bytes > limit and self._views:
                self._bytes -= self._size(self._views.popitem(last=False)[1])


def _now_of(kept: bytes | _Running) -> bytes:
    """A kept view as it reads now: an ended job's as built, a running job's with its clock's fields worked out."""
    return kept if isinstance(kept, bytes) else kept.now()


KEPT_VIEWS = KeptViews()
