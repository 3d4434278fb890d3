"""The Celery application of worker and beat processes: app/queue.py's, plus what only those processes need
(the prompt-reaping pool, logging, imports before forking, per-process metrics)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.concurrency import asynpool, prefork
from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from app.config import get_settings
from app.logging_setup import configure_logging
from app.queue import make_celery

log = logging.getLogger(__name__)


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


@setup_logging.connect  # type: ignore[untyped-decorator]
def _logging(loglevel: Any = None, **_: Any) -> None:
    """Our JSON logs in the worker and beat, instead of Celery's own setup; repeated errors once per window."""
    settings = get_settings()
    configure_logging(
        level=loglevel or settings.log_level, fmt=settings.log_format, repeat_window_s=settings.log_repeat_window_s
    )


@worker_init.connect  # type: ignore[untyped-decorator]
def _ride_out_database_outages(**_: Any) -> None:
    """Workers and beat wait for a database that restarts (RETRO_DB_OUTAGE_BUDGET_S); the API answers 503."""
    from app.db import use_patient_connections

    use_patient_connections()


@worker_init.connect  # type: ignore[untyped-decorator]
def _hide_the_workers_environment(**_: Any) -> None:
    """Model processes of the worker's own user cannot read its environ (app/integrations/environments/sandbox.py)."""
    from app.integrations.environments.sandbox import hide_process_environment

    if not hide_process_environment():
        log.warning("could not make the worker non-dumpable; without a sandbox, models can read its environment")


@worker_ready.connect  # type: ignore[untyped-decorator]
def _resume_jobs_of_dead_processes(**_: Any) -> None:
    """Send again, at once, the jobs whose attempt died with a process on this host (a killed or crashed worker).

    Beat's reconciler does the same on its schedule; a worker restarted while beat is down must not wait for it.
    """
    import threading

    from worker.reconciler import resume_dead_here

    threading.Thread(target=resume_dead_here, name="resume-dead-here", daemon=True).start()


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


@worker_init.connect  # type: ignore[untyped-decorator]
@worker_process_init.connect  # type: ignore[untyped-decorator]
def _temporary_files_under_var_dir(**_: Any) -> None:
    """Each worker process's model copies and multiprocessing folders in a folder of its own (worker/scratch.py).

    The main process too: its pool makes a `pymp-*` folder that a SIGKILL left in TMPDIR for good.
    """
    from worker.scratch import take_scratch

    take_scratch(get_settings().var_dir)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _sweep_temporary_files_of_dead_processes(**_: Any) -> None:
    from worker.scratch import sweep_scratch

    sweep_scratch(get_settings().var_dir)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_this_hosts_warm_servers(**_: Any) -> None:
    """Local warm model servers belong to their host's worker: when it stops, they stop (idle ones now, in-use
    ones when their job leaves). Model servers on Kubernetes are the cluster's: they stay for any worker."""
    settings = get_settings()
    if settings.deployer != "local" or settings.warm_ttl_s <= 0:
        return
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer
    from worker.warm import WarmPool

    try:
        pool = WarmPool(sessions=get_session_factory(), deployer=make_deployer(settings), settings=settings)
        stopped = pool.drain(host_only=True)
    except Exception:  # the database is down: the reaper stops them once they expire or their jobs end
        log.warning("could not stop this host's warm model servers", exc_info=True)
        return
    if stopped:
        log.info("stopped %d warm model server(s) of this host", len(stopped))


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _forget_process_metrics(**_: Any) -> None:
    from app.metrics import mark_worker_process_dead

    mark_worker_process_dead(os.getpid())


celery_app = make_celery()
