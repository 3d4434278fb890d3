"""Logging for the API, the worker and beat: one JSON object per line, with the job id when there is one."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import re
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

# The job the current code works for; set by the worker task, read by every log record.
current_job_id: ContextVar[str | None] = ContextVar("current_job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log record written inside the block with job_id."""
    token = current_job_id.set(job_id)
    try:
        yield
    finally:
        current_job_id.reset(token)


class JobIdFilter(logging.Filter):
    """Copies the current job id onto the record, so any formatter can use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job_id"):
            record.job_id = current_job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, job_id (when set) and the exception, as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [job %(job_id)s] %(message)s"
_NUMBERS = re.compile(r"\d+(\.\d+)?")


class RepeatLimitingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing a warning or error that repeats only once per window, then how often it came.

    Beat and the worker's consumer log the same error on every tick and every reconnect attempt while the broker
    is down (~3,800 lines in a 30-s Redis outage, issue 32). Records alike but for their numbers ("Trying again in
    4.00 seconds... (2/100)") count as one. The count is written as "repeated N times" when the error comes again
    after its window, or when any later record finds the window over, or when the handler closes. Only Celery's
    and kombu's loggers are held back: ours log a state change once (a database wait starting, ending) and each
    such line matters.
    """

    LIMITED = ("celery", "kombu", "amqp")

    def __init__(self, stream: Any = None, window_s: float = 60.0) -> None:
        super().__init__(stream)
        self.window_s = window_s
        self._seen: dict[tuple[str, int, str], tuple[float, int, logging.LogRecord]] = {}
        self._repeats_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        now = time.monotonic()
        with self._repeats_lock:
            due = self._due(now)
            show = record.levelno < logging.WARNING or record.name.partition(".")[0] not in self.LIMITED
            if not show:
                key = (record.name, record.levelno, _NUMBERS.sub("#", record.getMessage()))
                seen = self._seen.get(key)
                show = seen is None or now - seen[0] >= self.window_s
                if show:
                    self._seen[key] = (now, 0, record)
                elif seen is not None:
                    self._seen[key] = (seen[0], seen[1] + 1, seen[2])
        for summary in due:
            super().emit(summary)
        if show:
            super().emit(record)

    def close(self) -> None:
        with self._repeats_lock:
            due = self._due(float("inf"))
        for summary in due:
            super().emit(summary)
        super().close()

    def _due(self, now: float) -> list[logging.LogRecord]:
        """Summaries of the windows that are over with repeats in them; their keys start afresh."""
        due = []
        for key, (started, repeats, first) in list(self._seen.items()):
            if now - started < self.window_s:
                continue
            del self._seen[key]
            if repeats:
                summary = logging.makeLogRecord(
                    {**first.__dict__, "exc_info": None, "exc_text": None, "stack_info": None, "args": None}
                )
                summary.msg = f"{first.getMessage()} (repeated {repeats} times in {self.window_s:g} s)"
                summary.created = time.time()
                summary.msecs = summary.created % 1 * 1000
                due.append(summary)
        return due


def logging_config(*, level: str | int = "INFO", fmt: str = "json", repeat_window_s: float = 0) -> dict[str, Any]:
    """The dictConfig of configure_logging, for servers that set logging up in each process they start.

    With repeat_window_s, a warning or error that repeats is written once per that many seconds, with a count.
    """
    kind = {"()": RepeatLimitingHandler, "window_s": repeat_window_s} if repeat_window_s else {}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job_id": {"()": JobIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}, "text": {"format": TEXT_FORMAT}},
        "handlers": {
            "stderr": {
                **(kind or {"class": "logging.StreamHandler"}),
                "stream": "ext://sys.stderr",
                "filters": ["job_id"],
                "formatter": "json" if fmt == "json" else "text",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper() if isinstance(level, str) else level},
        # One line per scoring request would drown everything else; their failures are logged by the scorer.
        "loggers": {"httpx": {"level": "WARNING"}},
    }


def configure_logging(*, level: str | int = "INFO", fmt: str = "json", repeat_window_s: float = 0) -> None:
    """Send every logger's records to stderr, as JSON lines (fmt="json") or plain text."""
    logging.config.dictConfig(logging_config(level=level, fmt=fmt, repeat_window_s=repeat_window_s))
