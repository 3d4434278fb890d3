"""Warm deployments on Kubernetes (issue 31): the second job of a model scores on the first one's deployment, and
not a single create call reaches the API server for it; beat's reaper deletes the deployment once it has idled
past RETRO_WARM_TTL_S."""

from __future__ import annotations

from datetime import timedelta

import pytest

from app.clock import utcnow
from tests.k8s.conftest import job_row, k8s_settings, new_job, run
from tests.k8s_operator import ApiServer, TestOperator


@pytest.mark.parametrize("deployer", ["seldon_v2", "kserve"])
def test_the_second_job_attaches_to_the_warm_deployment_without_a_create_call(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from sqlalchemy import update

    from app.core.jobs import State
    from app.db import get_session_factory
    from app.integrations.wiring import make_deployer
    from app.retro_tests.warm_pool import WarmDeployment
    from worker.reaper import reap_deployments

    settings = k8s_settings(deployer, warm_ttl_s=600)
    first = new_job()
    assert run(first, settings) == State.succeeded, job_row(first).error_message
    assert job_row(first).deployment_warm is False
    kept = cluster.objects()
    assert kept, "the first job's deployment should stay, warm"

    posts = len(cluster.requests("POST"))
    assert posts, "the emulator should have seen the first job's create calls"
    second = new_job()
    assert run(second, settings) == State.succeeded, job_row(second).error_message
    job = job_row(second)
    assert (job.deployment_warm, job.deployment_name) == (True, job_row(first).deployment_name)
    assert job.validation.passed is True and job.rows_scored == job.rows_total
    assert cluster.requests("POST")[posts:] == [], "the warm job created something"
    assert cluster.objects() == kept

    # Idle past its TTL: beat's reaper deletes it (the fixture checks nothing is left in the cluster).
    sessions = get_session_factory()
    with sessions.begin() as s:
        s.execute(update(WarmDeployment).values(expires_at=utcnow() - timedelta(seconds=1)))
    reaped = reap_deployments(deployer=make_deployer(settings), sessions=sessions, settings=settings)
    assert reaped == [job.deployment_name]
    with sessions() as s:
        assert s.query(WarmDeployment).count() == 0
