"""Models staged to S3 for the operators' own downloaders, their failures, capacity waits, and `retrotest k8s check`.

The test operator fetches each model as its real operator does: rclone with the Secret in Seldon v1's or v2's
format, KServe's kserve-storage with the ServiceAccount's Secret; moto's S3 server on loopback holds the copies.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from app.core.model_types import ModelVersionInfo
from app.errors import DeploymentFailed
from app.integrations.deployers.operators import KUBERNETES_DEPLOYERS
from app.integrations.deployers.port import deployment_name
from app.integrations.deployers.seldon_v1 import SeldonDeployer
from app.integrations.deployers.staging import ModelStaging
from tests.conftest import _TMP, HISTORY_DAYS, ROWS_PER_DAY
from tests.k8s.conftest import BUCKET, WRONG_SECRETS, job_row, k8s_settings, new_job, results_path, run
from tests.k8s.test_k8s_deployers import KINDS, expected_scores  # noqa: F401  (a fixture)
from tests.k8s_operator import ApiServer, NoCapacity, TestOperator, artifact_uri

STAGED = f"s3://{BUCKET}/staging/models/"


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )


def staged_objects(s3: str) -> dict[str, Any]:
    """Key -> LastModified of every staged model file."""
    listed = s3_client(s3).list_objects_v2(Bucket=BUCKET, Prefix="staging/models/")
    return {o["Key"]: o["LastModified"] for o in listed.get("Contents") or []}


@pytest.fixture(scope="session")
def proxy_registry(s3: str, operator: TestOperator) -> Iterator[str]:
    """`mlflow server --artifacts-destination s3://…`, holding the churn model; its URL."""
    from app.demo_data import register_demo_model

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing"}
    env.update(AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [
            *(mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{_TMP / 'proxy-mlflow.db'}"),
            *("--artifacts-destination", f"s3://{BUCKET}/mlflow"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)
        register_demo_model(tracking_uri=url, artifact_root=None)
        yield url
    finally:
        import mlflow

        mlflow.set_tracking_uri(os.environ["RETRO_MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(os.environ["RETRO_MLFLOW_TRACKING_URI"])
        server.terminate()
        server.wait(20)


def test_through_a_registry_that_proxies_artifacts_each_operator_serves_the_staged_copy_and_jobs_reuse_it(
    s3: str,
    proxy_registry: str,
    cluster: ApiServer,
    operator: TestOperator,
    retro_data: None,
    expected_scores: pd.DataFrame,  # noqa: F811  (the fixture imported above)
) -> None:
    from app.core.jobs import State
    from app.integrations.wiring import make_registry

    before = staged_objects(s3)
    staged_uris = set()
    for deployer in KINDS:
        settings = k8s_settings(deployer, mlflow_tracking_uri=proxy_registry, mlflow_registry_uri=proxy_registry)
        model = make_registry(settings).resolve(name="churn", version="1")
        assert model.artifact_uri.startswith("mlflow-artifacts:/")
        job_id = new_job()
        state = run(job_id, settings)
        job = job_row(job_id)
        assert state == State.succeeded, (deployer, job.error_code, job.error_message)
        assert job.rows_scored == HISTORY_DAYS * ROWS_PER_DAY
        staged_uris.add(artifact_uri(KINDS[deployer], operator.seen[deployment_name(job_id)]))
        scores = pq.read_table(results_path(job.result_location) / "scores.parquet").to_pandas()
        merged = expected_scores.merge(scores, on=["customer_id", "snapshot_date"])
        assert len(merged) == len(expected_scores)
        assert np.abs(merged.e_churn - merged.p_churn).max() <= 1e-9
        if deployer == "seldon":
            first = {k: v for k, v in staged_objects(s3).items() if k not in before}
            assert any(k.endswith("/MLmodel") for k in first)
    # One copy, uploaded by the first job, fetched as it was by the two others.
    assert len(staged_uris) == 1 and next(iter(staged_uris)).startswith(STAGED)
    after = {k: v for k, v in staged_objects(s3).items() if k not in before}
    assert after == first


def test_a_model_version_is_staged_once_and_reaped_when_unused_for_the_ttl(s3: str, operator: TestOperator) -> None:
    settings = k8s_settings("kserve", model_staging_ttl_s=3600)
    staging = ModelStaging(settings=settings)
    folder = _TMP / "staging-sample"
    folder.mkdir(exist_ok=True)
    (folder / "MLmodel").write_text(f"sample {time.time()}\n")
    model = ModelVersionInfo(
        name="m", version="1", run_id=None, source="", artifact_uri=str(folder), inputs=(), outputs=()
    )
    uri = staging.servable(model, schemes=("s3",), operator="KServe").artifact_uri
    assert uri.startswith(STAGED)
    written = staged_objects(s3)[uri.removeprefix(f"s3://{BUCKET}/") + "/MLmodel"]
    time.sleep(1.1)
    assert staging.stage(model) == uri
    assert staged_objects(s3)[uri.removeprefix(f"s3://{BUCKET}/") + "/MLmodel"] == written  # not uploaded again
    digest = uri.rsplit("/", 1)[-1]
    assert digest not in staging.reap(now=time.time() + 3000)
    assert digest in staging.reap(now=time.time() + 3700)
    assert not any(k.startswith(uri.removeprefix(f"s3://{BUCKET}/")) for k in staged_objects(s3))


def test_without_a_staging_url_a_uri_the_operator_cannot_fetch_is_refused_plainly(operator: TestOperator) -> None:
    deployer = KUBERNETES_DEPLOYERS["seldon_v2"](settings=k8s_settings("seldon_v2", model_staging_url=""))
    model = ModelVersionInfo(
        name="m",
        version="1",
        run_id=None,
        source="",
        artifact_uri="mlflow-artifacts:/0/models/m-1/artifacts",
        inputs=(),
        outputs=(),
    )
    with pytest.raises(
        DeploymentFailed, match=r"cannot fetch the model from mlflow-artifacts:.*RETRO_MODEL_STAGING_URL"
    ):
        deployer.start(name="nostage", job_id="j", model=model)


def test_seldon_v1_with_protocol_v2_refuses_parameters_mlserver_would_ignore(operator: TestOperator) -> None:
    with pytest.raises(ValueError, match=r"RETRO_SELDON_PARAMETERS .* MLServer would silently ignore them"):
        SeldonDeployer(settings=k8s_settings("seldon", seldon_protocol="v2", seldon_parameters={"xtype": "DataFrame"}))
    SeldonDeployer(settings=k8s_settings("seldon", seldon_protocol="seldon", seldon_parameters={"xtype": "DataFrame"}))


UNDERLYING = {
    "wrong secret": {
        "seldon": "didn't find section in config file",
        "seldon_v2": "didn't find section in config file",
        "kserve": "Unable to locate credentials",
    },
}


@pytest.mark.parametrize("deployer", KINDS)
def test_a_wrong_secret_fails_the_job_within_60_s_with_the_downloaders_message(
    deployer: str, cluster: ApiServer, operator: TestOperator, retro_data: None
) -> None:
    from app.core.jobs import State

    settings = k8s_settings(deployer, k8s_storage_secret=WRONG_SECRETS[deployer], deploy_ready_timeout_s=300)
    job_id = new_job()
    started = time.monotonic()
    state = run(job_id, settings)
    elapsed = time.monotonic() - started
    job = job_row(job_id)
    assert state == State.failed
    assert UNDERLYING["wrong secret"][deployer] in job.error_message, job.error_message
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("deployer", KINDS)
def test_an_unreachable_model_fails_within_60_s_with_the_downloaders_message(
    deployer: str, cluster: ApiServer, operator: TestOperator
) -> None:
    settings = k8s_settings(deployer)
    k8s = KUBERNETES_DEPLOYERS[deployer](settings=settings)
    model = ModelVersionInfo(
        name="m",
        version="1",
        run_id=None,
        source="",
        artifact_uri=f"s3://{BUCKET}/nowhere/model",
        inputs=(),
        outputs=(),
    )
    name = f"unreachable-{deployer.replace('_', '-')}"
    started = time.monotonic()
    deployment = k8s.start(name=name, job_id=name, model=model)
    try:
        with pytest.raises(DeploymentFailed) as failed:
            k8s.wait_ready(deployment, timeout_s=300, should_stop=lambda: False)
    finally:
        k8s.stop(name)
    assert time.monotonic() - started < 60
    message = str(failed.value.detail)
    # kserve-storage says no model is there; rclone copies nothing from an empty prefix and the model server then
    # finds no MLmodel, as in a real pod.
    assert "No model found" in message or 'find an "MLmodel"' in message, message


@pytest.mark.parametrize("deployer", KINDS)
def test_a_capacity_shortage_waits_and_succeeds_when_capacity_frees(
    deployer: str, cluster: ApiServer, operator: TestOperator, registry: dict[str, str], caplog: Any
) -> None:
    from app.integrations.wiring import make_registry

    settings = k8s_settings(deployer)
    k8s = KUBERNETES_DEPLOYERS[deployer](settings=settings)
    model = make_registry(settings).resolve(name="churn", version="1")
    name = f"capacity-{deployer.replace('_', '-')}"
    freed = threading.Event()
    operator.scripts[name] = NoCapacity(freed)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            k8s.wait_ready(deployment, timeout_s=120, should_stop=lambda: False)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    deployment = k8s.start(name=name, job_id=name, model=model)
    try:
        with caplog.at_level("INFO", logger="app.integrations.deployers.kubernetes"):
            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(8)
            assert outcome == [] and waiter.is_alive(), outcome  # still waiting, not failed
            assert any("waiting for capacity" in r.getMessage() for r in caplog.records)
            freed.set()
            waiter.join(120)
        assert outcome == [None]
    finally:
        freed.set()
        k8s.stop(name)


def test_a_capacity_shortage_that_outlasts_the_deploy_timeout_says_so(
    cluster: ApiServer, operator: TestOperator
) -> None:
    k8s = KUBERNETES_DEPLOYERS["seldon_v2"](settings=k8s_settings("seldon_v2"))
    name = "capacity-timeout"
    operator.scripts[name] = NoCapacity(threading.Event())
    model = ModelVersionInfo(
        name="m", version="1", run_id=None, source="", artifact_uri=f"s3://{BUCKET}/x", inputs=(), outputs=()
    )
    deployment = k8s.start(name=name, job_id=name, model=model)
    try:
        with pytest.raises(DeploymentFailed, match=r"within 5 s; last state: waiting for capacity"):
            k8s.wait_ready(deployment, timeout_s=5, should_stop=lambda: False)
    finally:
        operator.scripts[name].freed.set()  # type: ignore[union-attr]
        k8s.stop(name)


def test_k8s_check_passes_a_correct_setup_and_names_what_a_broken_one_misses(
    s3: str, cluster: ApiServer, operator: TestOperator
) -> None:
    from typer.testing import CliRunner

    from app.cli import app
    from app.config import get_settings

    runner = CliRunner()
    for deployer in KINDS:
        get_settings.cache_clear()
        secret = k8s_settings(deployer).k8s_storage_secret
        env = {"RETRO_DEPLOYER": deployer, "RETRO_K8S_STORAGE_SECRET": secret}
        if (
            deployer == "kserve"
        ):  # Serverless with Knative's init containers off is refused (tests/k8s/test_cluster_rules.py)
            env["RETRO_KSERVE_DEPLOYMENT_MODE"] = "RawDeployment"
        good = runner.invoke(app, ["k8s", "check"], env=env)
        print(good.output)
        assert good.exit_code == 0, good.output
        # Five for every deployer, the images, and KServe's deployment mode or Seldon v2's ServerConfig.
        assert good.output.count("ok  ") == (6 if deployer == "seldon" else 7), good.output
        assert "warning: not pinned by digest" in good.output  # uv's image by tag, outside prod
    cluster.denied.add(("pods", "list"))
    get_settings.cache_clear()
    try:
        broken = runner.invoke(
            app,
            ["k8s", "check"],
            env={
                "RETRO_DEPLOYER": "seldon_v2",
                "RETRO_K8S_STORAGE_SECRET": WRONG_SECRETS["seldon_v2"],
                "RETRO_MODEL_STAGING_URL": "s3://no-such-bucket/staging",
            },
        )
        get_settings.cache_clear()
    finally:
        cluster.denied.clear()
    print(broken.output)
    assert broken.exit_code == 1
    assert "FAIL  permissions          not allowed: list pods" in broken.output
    assert "is named 'minio', not 's3'" in broken.output
    assert "FAIL  model staging        cannot write under s3://no-such-bucket/staging" in broken.output
