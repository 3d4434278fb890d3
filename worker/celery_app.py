"""The Celery application; its configuration comes from app.config."""

from __future__ import annotations

from celery import Celery

from app.config import get_settings


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
    )
    if broker.startswith(("redis", "rediss")):
        # Redis redelivers unacked messages after this; it must outlast the longest job.
        app.conf.broker_transport_options = {"visibility_timeout": 12 * 3600}
    else:
        app.conf.broker_transport_options = {}
        app.conf.broker_polling_interval = 0.5
    return app


celery_app = make_celery()
