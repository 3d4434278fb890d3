"""Thin Celery tasks: load by id, hand off to the pipeline."""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache

from app.config import get_settings
from app.db import get_session_factory
from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
from worker.celery_app import celery_app
from worker.pipeline import Adapters, run_retro_test

log = logging.getLogger(__name__)


@lru_cache
def _adapters() -> Adapters:
    settings = get_settings()
    return Adapters(
        registry=make_registry(settings),
        source=make_history_source(settings),
        deployer=make_deployer(settings),
        store=make_result_store(settings),
    )


@celery_app.task(name="retrotest.run_retro_test", acks_late=True)  # type: ignore[untyped-decorator]
def run_retro_test_task(job_id: str) -> str:
    """Run one retro test to a terminal state."""
    state = run_retro_test(
        job_id=uuid.UUID(job_id), sessions=get_session_factory(), adapters=_adapters(), settings=get_settings()
    )
    log.info("retro test %s finished: %s", job_id, state.value)
    return state.value
