"""Job counts for the API's /metrics, read from the job database at scrape time."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.clock import as_utc, utcnow
from app.config import get_settings
from app.core.jobs import RUNNING_STATES, RetroTest, State

log = logging.getLogger(__name__)


class JobsCollector(Collector):
    """Job counts by state, rows counted by jobs, and jobs holding a deployment, read at scrape time."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return [*self._families(), _disk_family()]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("retrotest_jobs", "Retro tests by state (database).", labels=["state"]),
            GaugeMetricFamily("retrotest_job_rows", "Rows counted by all retro tests (database).", labels=["kind"]),
            GaugeMetricFamily(
                "retrotest_jobs_holding_deployment", "Running retro tests with a model deployment (database)."
            ),
            GaugeMetricFamily("retrotest_database_up", "1 when the job database answered this scrape."),
            GaugeMetricFamily(
                "retrotest_oldest_queued_job_age_seconds",
                "How long the oldest queued retro test has waited for a worker (0: none queued; database).",
            ),
            GaugeMetricFamily(
                "retrotest_oldest_heartbeat_age_seconds",
                "Seconds since the least recent heartbeat of a running retro test (0: none running; database).",
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        disk = _disk_free()
        jobs, rows, holding, up, queued_age, heartbeat_age = self._families()
        try:
            with self._sessions()() as s:
                counts = dict(s.execute(select(RetroTest.state, func.count()).group_by(RetroTest.state)).tuples().all())
                sums = s.execute(
                    select(
                        func.coalesce(func.sum(RetroTest.rows_read), 0),
                        func.coalesce(func.sum(RetroTest.rows_scored), 0),
                        func.coalesce(func.sum(RetroTest.rows_rejected), 0),
                    )
                ).one()
                with_deployment = s.scalar(
                    select(func.count()).where(
                        RetroTest.state.in_([State.deploying, State.scoring]), RetroTest.deployment_name.is_not(None)
                    )
                )
                oldest_queued = s.scalar(select(func.min(RetroTest.created_at)).where(RetroTest.state == State.queued))
                oldest_heartbeat = s.scalar(
                    select(func.min(RetroTest.heartbeat_at)).where(RetroTest.state.in_(RUNNING_STATES))
                )
        except Exception as exc:
            log.warning("metrics: the job database did not answer: %s", exc)
            up.add_metric([], 0)
            return [up, disk]
        queued_age.add_metric([], _age_s(oldest_queued))
        heartbeat_age.add_metric([], _age_s(oldest_heartbeat))
        for state in State:
            jobs.add_metric([state.value], counts.get(state, 0))
        for kind, value in zip(("read", "scored", "rejected"), sums, strict=True):
            rows.add_metric([kind], int(value))
        holding.add_metric([], int(with_deployment or 0))
        up.add_metric([], 1)
        return [jobs, rows, holding, up, queued_age, heartbeat_age, disk]


def _age_s(moment: datetime | None) -> float:
    return max(0.0, (utcnow() - as_utc(moment)).total_seconds()) if moment is not None else 0.0


def _disk_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "retrotest_disk_free_ratio", "Free share of a volume the service writes to (0 to 1).", labels=["volume"]
    )


def _disk_free() -> GaugeMetricFamily:
    """Free share of the local volumes the service writes to: results (when local) and RETRO_VAR_DIR."""
    settings = get_settings()
    family = _disk_family()
    volumes = {"var": settings.var_dir.resolve()}
    results = settings.resolved_results_url()
    if "://" not in results or results.startswith("file://"):
        volumes["results"] = Path(results.removeprefix("file://"))
    for name, path in volumes.items():
        while not path.exists() and path != path.parent:  # a folder not made yet: the volume it will be on
            path = path.parent
        usage = shutil.disk_usage(path)
        family.add_metric([name], usage.free / usage.total if usage.total else 0.0)
    return family


_jobs_collector_lock = threading.Lock()
_jobs_collector: JobsCollector | None = None


def register_jobs_collector(sessions: Callable[[], sessionmaker[Session]]) -> None:
    """Add the database collector to the default registry, once per process."""
    global _jobs_collector
    with _jobs_collector_lock:
        if _jobs_collector is None:
            _jobs_collector = JobsCollector(sessions)
            REGISTRY.register(_jobs_collector)
