"""Session fixtures for the Kubernetes deployers: an API emulator, a test operator, settings pointing at them.

Nothing here needs a cluster: kmock's KubernetesEmulator is the API server (real HTTP, real `kubernetes`
client), tests/k8s_operator.py plays Seldon Core v1, Seldon Core v2 and KServe with local MLServers.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _TMP, HISTORY_DAYS, HISTORY_START
from tests.k8s_operator import ApiServer, TestOperator

NAMESPACE = "retro-models-test"
END = HISTORY_START + timedelta(days=HISTORY_DAYS - 1)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ApiServer]:
    """The Kubernetes API emulator, once per session."""
    server = ApiServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def operator(cluster: ApiServer) -> Iterator[TestOperator]:
    """The test operator and its gateway; RETRO_K8S_* settings point the deployers at them."""
    op = TestOperator(api_url=cluster.url, work_dir=_TMP / "operator-model-servers")
    env = {
        "RETRO_K8S_API_URL": cluster.url,
        "RETRO_K8S_NAMESPACE": NAMESPACE,
        "RETRO_K8S_ENDPOINT_TEMPLATE": op.gateway.url + "/gateway/{namespace}/{name}",
        "RETRO_SELDON_V2_MESH_URL": op.gateway.url + "/mesh/{namespace}",
        "RETRO_K8S_GRPC_ENDPOINT_TEMPLATE": op.grpc_ingress.target,
        "RETRO_SELDON_V2_MESH_GRPC": op.grpc_mesh.target,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield op
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    op.close()


@pytest.fixture(autouse=True)
def nothing_left_behind(cluster: ApiServer, operator: TestOperator) -> Iterator[None]:
    """Every test starts and ends with no resource in the emulator and no model server running."""
    assert cluster.objects() == [], "a previous test left resources behind"
    yield
    assert cluster.objects() == [], "resources were left in the emulator"
    assert operator.wait_idle() == [], "model servers were left running"
    operator.scripts.clear()


@pytest.fixture()
def retro_data(database_url: str, registry: dict[str, str], history: Path) -> None:
    """The job database, the registered churn model and its history: what an in-process job needs."""


def k8s_settings(deployer: str, **overrides: Any) -> Any:
    """Settings for one Kubernetes deployer, from the environment the fixtures set, plus overrides."""
    from app.config import Settings

    return Settings(deployer=deployer, **overrides)  # type: ignore[arg-type]


def new_job(*, period_end: Any = END, output_formats: tuple[str, ...] = ("parquet",)) -> uuid.UUID:
    """A queued retro test of the churn model, created directly in the database; returns its id."""
    from app.db import get_session_factory
    from tests.factories import make_retro_test

    with get_session_factory()() as s, s.begin():
        return make_retro_test(
            s, start=HISTORY_START, end=period_end, output_formats=output_formats, partner_prefix="k8s"
        )


def wait_for(check: Any, *, timeout_s: float, what: str) -> Any:
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def job_row(job_id: uuid.UUID) -> Any:
    from app.db import get_session_factory
    from app.retro_tests.models import RetroTest

    with get_session_factory()() as s:
        return s.get(RetroTest, job_id)


def results_path(location: str) -> Path:
    return Path(location.removeprefix("file://"))


def adapters(settings: Any, *, deployer: Any = None, source: Any = None) -> Any:
    from app.integrations.wiring import make_deployer, make_history_source, make_registry, make_result_store
    from worker.pipeline import Adapters

    return Adapters(
        registry=make_registry(settings),
        source=source or make_history_source(settings),
        deployer=deployer or make_deployer(settings),
        store=make_result_store(settings),
    )


def run(job_id: uuid.UUID, settings: Any, **kw: Any) -> Any:
    from app.db import get_session_factory
    from worker.pipeline import run_retro_test

    return run_retro_test(
        job_id=job_id, sessions=get_session_factory(), adapters=adapters(settings, **kw), settings=settings
    )
