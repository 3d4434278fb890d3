"""The Celery application; its configuration comes from app.config."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.concurrency import asynpool, prefork
from celery.signals import setup_logging, worker_init, worker_process_shutdown

from app.config import Settings, get_settings
from app.logging_setup import configure_logging


def control_queue(settings: Settings) -> str:
    """The queue of the periodic control tasks, consumed by `retrotest beat`, never by the job workers."""
    return f"{settings.queue_name}.control"


class _PromptReapAsynPool(asynpool.AsynPool):  # type: ignore[misc]
    """Celery's prefork pool, noticing a killed pool process within a second instead of up to 5 s later.

    A dead child's sentinel pipe reaches EOF a moment before the child can be reaped (its threads are still
    exiting). When Celery's one check at that moment loses the race, only its 5-second maintain_pool timer
    finds the death, and the job's message waits that long to be redelivered. So look again shortly after,
    backing off. This overrides a private method of celery.concurrency.asynpool (unchanged in 5.5 to 5.7):
    re-check it when upgrading Celery.
    """

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        super()._event_process_exit(hub, proc)
        self._reap_later(hub, proc, 0.02)

    def _reap_later(self, hub: Any, proc: Any, delay: float) -> None:
        # `proc in self._pool` and not proc.exitcode: reading exitcode would reap the child outside
        # maintain_pool, and its job would never be marked lost.
        if proc in self._pool and delay <= 0.64:
            hub.call_later(delay, self._reap_again, hub, proc, delay)

    def _reap_again(self, hub: Any, proc: Any, delay: float) -> None:
        self.maintain_pool()
        self._reap_later(hub, proc, delay * 2)


class PromptReapTaskPool(prefork.TaskPool):  # type: ignore[misc]
    """The prefork pool with _PromptReapAsynPool: a killed pool process's job is redelivered at once."""

    Pool = _PromptReapAsynPool


def make_celery() -> Celery:
    settings = get_settings()
    broker = settings.resolved_broker_url()
    if broker.startswith("sqla+sqlite"):
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("retrotest", broker=broker, include=["worker.tasks"])
    app.conf.update(
        task_ignore_result=True,  # state lives in our database, not in a result backend
        task_acks_late=True,  # a job whose worker dies is redelivered; the pipeline skips finished chunks
        task_reject_on_worker_lost=True,
        worker_pool="worker.celery_app:PromptReapTaskPool",
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_default_queue=settings.queue_name,
        task_routes={
            "retrotest.reap_deployments": {"queue": control_queue(settings)},
            "retrotest.reconcile_jobs": {"queue": control_queue(settings)},
        },
        beat_schedule={
            # Re-enqueues jobs whose worker died or whose message the broker lost.
            "reconcile-jobs": {
                "task": "retrotest.reconcile_jobs",
                "schedule": settings.reconcile_interval_s,
                "options": {"expires": settings.reconcile_interval_s},
            },
            # Deletes deployments a killed worker left behind (or whose job ended, or whose expiry passed).
            # Expiring after one interval keeps a stopped control process from collecting a backlog of them.
            "reap-deployments": {
                "task": "retrotest.reap_deployments",
                "schedule": settings.reaper_interval_s,
                "options": {"expires": settings.reaper_interval_s},
            },
        },
        beat_schedule_filename=str(settings.var_dir.resolve() / "celerybeat-schedule"),
    )
    if broker.startswith(("redis", "rediss")):
        app.conf.broker_transport = "worker.broker:Transport"  # survives a Redis restart (see worker/broker.py)
        # Redis redelivers unacked messages after this; it must outlast the longest job.
        app.conf.broker_transport_options = {"visibility_timeout": 12 * 3600}
    else:
        app.conf.broker_transport_options = {}
        app.conf.broker_polling_interval = 0.5
    return app


@setup_logging.connect  # type: ignore[untyped-decorator]
def _logging(loglevel: Any = None, **_: Any) -> None:
    """Our JSON logs in the worker and beat, instead of Celery's own setup."""
    settings = get_settings()
    configure_logging(level=loglevel or settings.log_level, fmt=settings.log_format)


@worker_init.connect  # type: ignore[untyped-decorator]
def _import_before_forking(**_: Any) -> None:
    """Import, once in the main process, what every job imports on first use (~1 s of CPU).

    pandas (pyarrow converts Python values through it), the history source's driver and httpx's transport: a
    pool process started in place of a killed one then scores at once, without taking that CPU from the model
    server. mlflow is not among them: the API records the model on the job when it accepts it, so a worker
    imports mlflow only for a job accepted before that record was kept, or for artifacts in a remote store.
    """
    import httpcore  # noqa: F401  (and h11 with it)
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    if get_settings().history_source == "hive":
        import pyhive.hive  # noqa: F401
    else:
        import duckdb  # noqa: F401


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _forget_process_metrics(**_: Any) -> None:
    from app.metrics import mark_worker_process_dead

    mark_worker_process_dead(os.getpid())


celery_app = make_celery()
