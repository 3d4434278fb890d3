"""Logging for the API, the worker and beat: one JSON object per line, with the job id when there is one."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.config
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


def logging_config(*, level: str | int = "INFO", fmt: str = "json") -> dict[str, Any]:
    """The dictConfig of configure_logging, for servers that set logging up in each process they start."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"job_id": {"()": JobIdFilter}},
        "formatters": {"json": {"()": JsonFormatter}, "text": {"format": TEXT_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": ["job_id"],
                "formatter": "json" if fmt == "json" else "text",
            }
        },
        "root": {"handlers": ["stderr"], "level": level.upper() if isinstance(level, str) else level},
        # One line per scoring request would drown everything else; their failures are logged by the scorer.
        "loggers": {"httpx": {"level": "WARNING"}},
    }


def configure_logging(*, level: str | int = "INFO", fmt: str = "json") -> None:
    """Send every logger's records to stderr, as JSON lines (fmt="json") or plain text."""
    logging.config.dictConfig(logging_config(level=level, fmt=fmt))
