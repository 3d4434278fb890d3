"""An old model's environment delivered to the pod as a tarball staged with the model (RETRO_K8S_ENV_DELIVERY=tarball).

The old model (scikit-learn 1.3.2 / numpy 1.26.4 / mlflow 2.9.2 on Python 3.10, tests/old_stack/train.py) is
retro-tested through each operator in the test operator: the worker builds and checks its environment, packs it
(app/integrations/environments/tarball.py), stages it beside the model, and the "pod" fetches both with the operator's
own downloader and runs MLServer from it in a network namespace of its own (tests/k8s_operator.py, PodRun), so a
download hidden anywhere in the pod's start would fail. The environment is built and packed once per session.
"""

from __future__ import annotations

import dataclasses
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.errors import DeploymentFailed
from app.integrations.deployers.kubernetes import (
    ENV_RUN_SCRIPT,
    INFERENCE_SERVICE,
    SELDON_DEPLOYMENT,
    SELDON_MODEL,
    CustomResources,
)
from app.integrations.deployers.operators import KUBERNETES_DEPLOYERS
from app.integrations.deployers.port import deployment_name
from app.integrations.deployers.seldon_v2 import SeldonV2Deployer
from app.integrations.environments.cache import ModelEnvironment, read_requirements
from app.integrations.environments.tarball import EnvironmentPacker, PackedEnvironment
from tests.conftest import _TMP, HISTORY_START
from tests.k8s.conftest import END, adapters, job_row, k8s_settings, results_path
from tests.k8s_operator import ApiServer, PodPlan, PodRun, TestOperator, server_container
from tests.old_model import OldModel

DEPLOYERS = ("seldon", "seldon_v2", "kserve")
KIND = {"seldon": SELDON_DEPLOYMENT, "seldon_v2": SELDON_MODEL, "kserve": INFERENCE_SERVICE}


@dataclass(frozen=True)
class PackedOld:
    environment: ModelEnvironment
    packed: PackedEnvironment
    pack_s: float


@pytest.fixture(scope="session")
def packed_old(old_model: OldModel, operator: TestOperator) -> PackedOld:
    """The old model's environment as the worker builds it, packed once; the Seldon v2 server image set up from it.

    The cluster's standard Seldon v2 Server runs MLServer 1.6.1 (RETRO_SELDON_V2_MLSERVER_VERSION), the release the
    old environment holds: here that image's Python is an extracted copy of the tarball, and MLServer in it extracts
    the staged tarball again for the model's pool, as the real server does.
    """
    from app.integrations.wiring import make_environments

    cache = make_environments(k8s_settings("seldon"))
    assert cache is not None
    environment = cache.prepare(read_requirements(old_model.model_dir, what="the old model"))
    started = time.monotonic()
    packed = EnvironmentPacker(cache=cache).pack(environment)
    pack_s = time.monotonic() - started
    image = _TMP / "seldon-v2-mlserver-1.6.1-image"
    if not (image / "bin" / "python").exists():
        image.mkdir(parents=True, exist_ok=True)
        with tarfile.open(packed.path) as tar:
            tar.extractall(image, filter="tar")
    operator.seldon_v2_server_python = str(image / "bin" / "python")
    print(f"\nold environment packed: {packed.size_bytes / 1e6:.0f} MB in {pack_s:.1f} s (reused: {packed.reused})")
    return PackedOld(environment=environment, packed=packed, pack_s=pack_s)


def run_with_environment(job_id: uuid.UUID, settings: Any) -> Any:
    """The job as a worker runs it with model environments on (the session's cache: built and packed once)."""
    from app.db import get_session_factory
    from app.integrations.wiring import make_environments
    from worker.pipeline import run_retro_test

    with_envs = dataclasses.replace(adapters(settings), environments=make_environments(settings))
    return run_retro_test(job_id=job_id, sessions=get_session_factory(), adapters=with_envs, settings=settings)


def new_old_model_job() -> uuid.UUID:
    from app.db import get_session_factory
    from tests.factories import make_retro_test

    with get_session_factory()() as s, s.begin():
        return make_retro_test(s, start=HISTORY_START, end=END, model_name="legacy_churn", partner_prefix="k8s-old")


# The first one also builds the old stack, the model's environment and its tarball (minutes on a busy machine).
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("deployer", DEPLOYERS)
def test_the_old_model_scores_from_its_packed_environment_through_each_operator(
    deployer: str,
    cluster: ApiServer,
    operator: TestOperator,
    retro_data: None,
    old_model: OldModel,
    packed_old: PackedOld,
) -> None:
    from app.core.jobs import State

    settings = k8s_settings(deployer, deploy_ready_timeout_s=300)
    job_id = new_old_model_job()
    name = deployment_name(job_id)
    state = run_with_environment(job_id, settings)
    job = job_row(job_id)
    assert state == State.succeeded, (job.error_code, job.error_message)
    assert job.environment is not None and job.environment.key == packed_old.environment.key
    assert job.environment.server_version == "1.6.1"

    # What the operator was given: no init container, no index, no Python download; the staged folder instead.
    obj = operator.seen[name]
    text = str(obj["spec"])
    assert "initContainers" not in text and "uv " not in text and "UV_" not in text
    container = server_container(KIND[deployer], obj)
    assert KIND[deployer] == SELDON_MODEL or (container or {}).get("command") == ["sh", "-c", ENV_RUN_SCRIPT]
    if deployer == "seldon_v2":
        # On the cluster's standard Server: no Server of its own, a requirement the agent knows.
        assert "server" not in obj["spec"] and obj["spec"]["requirements"] == ["mlflow"]

    scores = pq.read_table(results_path(job.result_location) / "scores.parquet").to_pandas()
    merged = old_model.expected.merge(scores, on=["customer_id", "snapshot_date"], how="inner")
    assert len(merged) == len(old_model.expected) == len(scores)
    [column] = [c for c in scores.columns if c not in ("customer_id", "snapshot_date")]
    diff = float(np.abs(merged["expected"] - merged[column]).max())
    assert diff <= 1e-9, diff
    print(
        f"\n{deployer}: cold pod start (created to ready) {operator.cold_starts[name]:.1f} s with a "
        f"{packed_old.packed.size_bytes / 1e6:.0f} MB tarball; max |diff| {diff:.1e}"
    )


def test_a_pod_reaches_no_address_but_its_own_loopback(s3: str, operator: TestOperator) -> None:
    """What makes a hidden download fail: the S3 on this machine's loopback is out of the pod's reach."""
    probe = f"import urllib.request; urllib.request.urlopen({s3!r}, timeout=5); print('reached')"
    assert "reached" in subprocess.run(["python3", "-c", probe], capture_output=True, text=True).stdout
    folder = _TMP / "pod-probe"
    pod = PodRun.start(
        folder,
        PodPlan(command=["python3", "-c", probe], env={}, mounts={}, readable=[], http_port=1, grpc_port=2),
    )
    try:
        failure = pod.wait_ready("probe", timeout_s=30, alive=lambda: True)
    finally:
        log = (folder / "pod.log").read_text()
        pod.stop()
    assert failure is not None and "exited with code 1" in failure, failure
    assert "reached" not in log and ("Connection refused" in log or "Network is unreachable" in log), log


class BrokenTarball:
    """A deployer's packer stand-in that hands out a tarball that is not one."""

    def __init__(self, environment: ModelEnvironment) -> None:
        path = _TMP / "broken-environment.tar.gz"
        path.write_bytes(b"this is not a gzip file\n" * 100)
        self.packed = PackedEnvironment(
            path=path,
            sha256="0" * 64,
            size_bytes=path.stat().st_size,
            python=environment.python,
            server_version="1.6.1",
        )

    def pack(self, environment: ModelEnvironment) -> PackedEnvironment:
        return self.packed


UNDERLYING = {
    "broken tarball": {
        "seldon": "not in gzip format",
        "kserve": "not in gzip format",
        "seldon_v2": "ReadError",
    },
}


@pytest.mark.parametrize("deployer", DEPLOYERS)
def test_a_broken_tarball_fails_within_60_s_with_the_underlying_message(
    deployer: str, cluster: ApiServer, operator: TestOperator, registry: dict[str, str], packed_old: PackedOld
) -> None:
    from app.integrations.wiring import make_registry

    settings = k8s_settings(deployer)
    k8s = KUBERNETES_DEPLOYERS[deployer](settings=settings)
    k8s.pack = BrokenTarball(packed_old.environment).pack  # type: ignore[method-assign]
    model = make_registry(settings).resolve(name="legacy_churn", version="1")
    name = f"broken-env-{deployer.replace('_', '-')}"
    started = time.monotonic()
    try:
        deployment = k8s.start(name=name, job_id=name, model=model, environment=packed_old.environment)
        with pytest.raises(DeploymentFailed) as failed:
            k8s.wait_ready(deployment, timeout_s=300, should_stop=lambda: False)
    finally:
        k8s.stop(name)
    took = time.monotonic() - started
    message = str(failed.value.detail)
    assert UNDERLYING["broken tarball"][deployer] in message, message
    assert took < 60, took


@pytest.mark.parametrize("deployer", DEPLOYERS)
def test_an_unreachable_staging_bucket_fails_the_job_within_60_s_with_the_stores_message(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None, packed_old: PackedOld
) -> None:
    from app.core.jobs import State

    settings = k8s_settings(deployer, model_staging_url="s3://no-such-bucket/staging")
    job_id = new_old_model_job()
    started = time.monotonic()
    state = run_with_environment(job_id, settings)
    took = time.monotonic() - started
    job = job_row(job_id)
    assert state == State.failed
    assert job.error_code == "deployment_failed", job.error_code
    assert "cannot stage the model to s3://no-such-bucket/staging" in job.error_message
    assert "NoSuchBucket" in job.error_message or "does not exist" in job.error_message, job.error_message
    assert took < 60, took


def test_seldon_v2s_agent_refuses_a_folder_without_model_settings_and_no_requirement_it_knows(
    cluster: ApiServer, operator: TestOperator, registry: dict[str, str]
) -> None:
    """What every per-job-Server Model hit before the folder carried a model-settings.json."""
    from app.integrations.wiring import make_registry

    settings = k8s_settings("seldon_v2")
    k8s = SeldonV2Deployer(settings=settings)
    model = make_registry(settings).resolve(name="churn", version="1")
    name = "agent-rule"
    staged = replace(model, artifact_uri=k8s._staging.stage(model))
    body = k8s.manifest(name=name, job_id=name, model=staged)
    body["spec"]["requirements"] = [name]
    CustomResources(settings=settings).create(SELDON_MODEL, body)
    try:
        with pytest.raises(DeploymentFailed) as failed:
            k8s.wait_ready(k8s.deployment(name), timeout_s=60, should_stop=lambda: False)
    finally:
        k8s.stop(name)
    assert f"Can't create model-settings from requirements [{name}]" in str(failed.value.detail)
