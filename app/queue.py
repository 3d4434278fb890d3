"""Sending work to the workers: the task names, and the Celery application they are sent through.

Importing this module has no side effects (no signal handlers, no worker modules): the API sends jobs through
it; worker/celery_app.py adds what only a worker or beat process needs.
"""

from __future__ import annotations

import uuid
from functools import lru_cache
from typing import Any

from celery import Celery

from app.config import Settings, get_settings

# The tasks, by the names they are registered under in worker/tasks.py.
RUN_RETRO_TEST = "retrotest.run_retro_test"
SCORE_PARTITION = "retrotest.score_partition"
REAP_DEPLOYMENTS = "retrotest.reap_deployments"
RECONCILE_JOBS = "retrotest.reconcile_jobs"


def control_queue(settings: Settings) -> str:
    """The queue of the periodic control tasks, consumed by `retrotest beat`, never by the job workers."""
    return f"{settings.queue_name}.control"


def make_celery() -> Celery:
    """The Celery application, configured from app.config; it names the worker's modules but imports none."""
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
            REAP_DEPLOYMENTS: {"queue": control_queue(settings)},
            RECONCILE_JOBS: {"queue": control_queue(settings)},
        },
        beat_schedule={
            # Re-enqueues jobs whose worker died or whose message the broker lost.
            "reconcile-jobs": {
                "task": RECONCILE_JOBS,
                "schedule": settings.reconcile_interval_s,
                "options": {"expires": settings.reconcile_interval_s},
            },
            # Deletes deployments a killed worker left behind (or whose job ended, or whose expiry passed).
            # Expiring after one interval keeps a stopped control process from collecting a backlog of them.
            "reap-deployments": {
                "task": REAP_DEPLOYMENTS,
                "schedule": settings.reaper_interval_s,
                "options": {"expires": settings.reaper_interval_s},
            },
        },
        beat_schedule_filename=str(settings.var_dir.resolve() / "celerybeat-schedule"),
    )
    if broker.startswith(("redis", "rediss")):
        app.conf.broker_transport = "worker.broker:Transport"  # survives a Redis restart (see worker/broker.py)
        # Redis redelivers an unacked message after this: just past the job deadline, so a job still running is
        # never delivered twice, and a dead worker's job is taken back sooner by a restarting worker (worker_ready)
        # or beat's reconciler, not by this.
        app.conf.broker_transport_options = {"visibility_timeout": int(settings.job_deadline_s) + 600}
    else:
        app.conf.broker_transport_options = {}
        app.conf.broker_polling_interval = 0.5
    return app


@lru_cache
def celery_client() -> Celery:
    """The process-wide application for sending tasks (a worker process uses worker.celery_app's)."""
    return make_celery()


def send_retro_test(job_id: uuid.UUID) -> None:
    """Send a job to the workers; only after the transaction that created or re-queued its row has committed.

    The message expires with the job's deadline: a worker that receives it later acknowledges and drops it (a job
    still queued then is sent again by the reconciler, and its attempt fails it for the deadline).
    """
    celery_client().send_task(RUN_RETRO_TEST, args=[str(job_id)], expires=get_settings().job_deadline_s)


def send_partition(message: dict[str, Any]) -> None:
    """Send a helper's share of a job (worker/run.py PartitionOrder) to another worker."""
    celery_client().send_task(SCORE_PARTITION, args=[message], expires=get_settings().job_deadline_s)


def check_broker() -> None:
    """Raise if the broker cannot be reached within a few seconds."""
    with celery_client().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
