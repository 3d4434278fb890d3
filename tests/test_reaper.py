"""The reaper over the local deployer (MLServer processes on this machine), and its rules."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from app.integrations.deployers import LocalMLServerDeployer, ManagedDeployment, deployment_name
from app.retro_tests.models import State
from tests.test_end_to_end import mlserver_processes_for
from worker.reaper import reap_reason

NOW = 1_800_000_000.0
JOB = str(uuid.uuid4())


@pytest.mark.parametrize(
    ("deployment", "state", "reason"),
    [
        (ManagedDeployment("d", JOB, NOW + 60), State.scoring, None),
        (ManagedDeployment("d", JOB, None), State.deploying, None),
        (ManagedDeployment("d", JOB, NOW - 1), State.scoring, "expired"),
        (ManagedDeployment("d", JOB, NOW + 60), State.succeeded, "job_finished"),
        (ManagedDeployment("d", JOB, NOW + 60), State.cancelled, "job_finished"),
        (ManagedDeployment("d", JOB, NOW + 60), None, "job_missing"),
        (ManagedDeployment("d", None, NOW + 60), State.scoring, "job_missing"),
        (ManagedDeployment("d", "not-a-uuid", NOW + 60), State.scoring, "job_missing"),
    ],
)
def test_reap_reasons(deployment: ManagedDeployment, state: State | None, reason: str | None) -> None:
    states = {JOB: state} if state is not None else {}
    assert reap_reason(deployment, states=states, now=NOW) == reason


def test_deployment_names_are_dns_labels_unique_per_job() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert deployment_name(a) != deployment_name(b)
    assert deployment_name(a) == deployment_name(str(a).upper())
    assert len(deployment_name(a)) <= 63
    with pytest.raises(ValueError):
        deployment_name("../etc")


def test_the_reaper_stops_local_model_servers_of_ended_or_unknown_jobs(
    database_url: str, registry: dict[str, str], tmp_path: Path
) -> None:
    from app.config import get_settings
    from app.db import get_session_factory
    from app.integrations.wiring import make_registry
    from worker.reaper import reap_deployments

    model = make_registry(get_settings()).resolve(name="churn", version="1")
    deployer = LocalMLServerDeployer(work_dir=tmp_path / "deployments", ttl_s=3600)
    orphan = str(uuid.uuid4())  # no such job in the database
    name = deployment_name(orphan)
    deployer.start(name=name, job_id=orphan, model=model)
    try:
        [managed] = deployer.list_managed()
        assert (managed.name, managed.job_id) == (name, orphan)
        assert managed.expires_at is not None and abs(managed.expires_at - (time.time() + 3600)) < 60
        # Right after Popen the child may still be inside exec, with an empty command line: look for a moment.
        deadline = time.monotonic() + 15
        while not mlserver_processes_for(orphan) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mlserver_processes_for(orphan), "the model server process should be running"
        assert reap_deployments(deployer=deployer, sessions=get_session_factory()) == [name]
        assert deployer.list_managed() == [] and mlserver_processes_for(orphan) == []
    finally:
        deployer.stop(name)
