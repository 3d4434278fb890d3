"""The Celery application; its configuration comes from app.config."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_shutdown

from app.config import Settings, get_settings
from app.logging_setup import configure_logging


def control_queue(settings: Settings) -> str:
    """The queue of the periodic control tasks, consumed by `retrotest beat`, never by the job workers."""
    return f"{settings.queue_name}.control"


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
def _import_mlflow_before_forking(**_: Any) -> None:
    """Import mlflow (~5 s) once in the main process, so no pool process pays it on its first job or partition."""
    import mlflow  # noqa: F401


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _forget_process_metrics(**_: Any) -> None:
    from app.metrics import mark_worker_process_dead

    mark_worker_process_dead(os.getpid())


celery_app = make_celery()
