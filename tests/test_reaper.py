"""The reaper over the local deployer (MLServer processes on this machine), and its rules."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from app.core.jobs import State
from app.integrations.deployers.local import LocalMLServerDeployer
from app.integrations.deployers.port import ManagedDeployment, deployment_name
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


def test_the_reaper_removes_files_ended_jobs_left_and_nothing_a_job_offers(database_url: str, tmp_path: Path) -> None:
    """A worker killed at the wrong moment leaves a failed job's parts, or a succeeded job's parts/ folder."""
    from datetime import date, timedelta

    from app.clock import utcnow
    from app.core.jobs import RetroTest, job_prefix
    from app.db import get_session_factory
    from app.integrations.storage.results import ResultStore
    from tests.factories import make_retro_test
    from worker.reaper import reap_files

    store = ResultStore(str(tmp_path))
    sessions = get_session_factory()
    day = date(2026, 1, 5)
    with sessions() as s, s.begin():
        ids = {
            name: make_retro_test(s, start=day, end=day, partner_prefix="reap")
            for name in ("failed", "ok", "live", "old")
        }
        states = {"failed": State.failed, "ok": State.succeeded, "live": State.scoring, "old": State.cancelled}
        prefixes = {}
        for name, job_id in ids.items():
            job = s.get(RetroTest, job_id)
            assert job is not None
            job.state = states[name]
            job.finished_at = None if name == "live" else utcnow() - timedelta(days=30 if name == "old" else 0)
            prefixes[name] = job_prefix(job)
    for prefix in prefixes.values():
        for rel in (f"{prefix}/parts/0001.parquet", f"{prefix}/scores.parquet"):
            with store.open_write(rel) as fh:
                fh.write(b"x")

    removed = reap_files(store=store, sessions=sessions)

    assert sorted(removed) == sorted([prefixes["failed"], f"{prefixes['ok']}/parts"])
    assert not store.exists(prefixes["failed"])
    assert store.exists(f"{prefixes['ok']}/scores.parquet") and not store.exists(f"{prefixes['ok']}/parts")
    assert store.exists(f"{prefixes['live']}/parts/0001.parquet")  # a running job's parts are its checkpoints
    assert store.exists(f"{prefixes['old']}/parts/0001.parquet")  # ended long ago: earlier runs looked at it
    assert reap_files(store=store, sessions=sessions) == []  # nothing left to do the second time
