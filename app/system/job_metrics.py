"""Job counts for the API's /metrics, read from the job database at scrape time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.jobs import RetroTest, State

log = logging.getLogger(__name__)


class JobsCollector(Collector):
    """Job counts by state, rows counted by jobs, and jobs holding a deployment, read at scrape time."""

    def __init__(self, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return self._families()

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("retrotest_jobs", "Retro tests by state (database).", labels=["state"]),
            GaugeMetricFamily("retrotest_job_rows", "Rows counted by all retro tests (database).", labels=["kind"]),
            GaugeMetricFamily(
                "retrotest_jobs_holding_deployment", "Running retro tests with a model deployment (database)."
            ),
            GaugeMetricFamily("retrotest_database_up", "1 when the job database answered this scrape."),
        ]

    def collect(self) -> Iterable[Metric]:
        jobs, rows, holding, up = self._families()
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
        except Exception as exc:
            log.warning("metrics: the job database did not answer: %s", exc)
            up.add_metric([], 0)
            return [up]
        for state in State:
            jobs.add_metric([state.value], counts.get(state, 0))
        for kind, value in zip(("read", "scored", "rejected"), sums, strict=True):
            rows.add_metric([kind], int(value))
        holding.add_metric([], int(with_deployment or 0))
        up.add_metric([], 1)
        return [jobs, rows, holding, up]


_jobs_collector_lock = threading.Lock()
_jobs_collector: JobsCollector | None = None


def register_jobs_collector(sessions: Callable[[], sessionmaker[Session]]) -> None:
    """Add the database collector to the default registry, once per process."""
    global _jobs_collector
    with _jobs_collector_lock:
        if _jobs_collector is None:
            _jobs_collector = JobsCollector(sessions)
            REGISTRY.register(_jobs_collector)
